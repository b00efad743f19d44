#!/bin/sh
# Issue 18, proof 4 (the seed, reproduced with DPDK itself), with Debian's librte_bus_pci:
# the seed application (dpdk/vm/seed.c) holds the SR-IOV PF through vfio-pci and another
# process writes 1 to the PF's sysfs `remove`, exactly as dpdk-seed does with the drop-in.
# The removal takes the PF's device lock and waits for the holder; the holder's deferred
# release waits for its rte_bus_scan(), and the stock scan reads the PF's sriov_numvfs,
# which waits for that device lock: a deadlock in the kernel that nothing in the guest can
# break (the scanning thread waits for the mutex in D state, and a SIGKILL cannot end a
# task stuck there, so the vfio file is never closed; the removal waits in
# vfio_unregister_group_dev, sending the request again and again).
#
# Asserted: the removal request reached the application, its scan started and has not
# returned after 15 s, its main thread is in D state in sriov_numvfs_show (its kernel
# stack is printed), and the `remove` write waits in vfio_unregister_group_dev;
# sysrq `w` puts every blocked task's stack in the log. The test then passes and leaves
# the deadlock in place: the PF (and PCI rescan/remove, whose global lock the removal
# holds) stays wedged until /init's final sysrq reset, which is why this test runs last
# (the `zz` in its name) and never tries a poweroff.
# pcibus-timeout: 180
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "PF $pf not on nvme at start"
dpdk_to_vfio "$pf"

out=/tmp/seed-stock.out
if ! seed_start "$out" "$pf" env; then
	back_on_nvme "$pf"
	fail "STOCK: the seed application did not come to hold $pf on Debian's librte_bus_pci"
fi
grep -q 'PCI (pcibus)' "$out" && fail "STOCK: the pcibus drop-in answered in the stock run"
grep '^seed: probe' "$out"

seed_remove "$pf" /tmp/seed-stock.rm
seed_assert_stock_deadlock "$out" /tmp/seed-stock.rm remove
