#!/bin/sh
# Issue 18, proof 4 (the seed, reproduced with DPDK itself), with the drop-in: the seed
# application (dpdk/vm/seed.c: a PMD of its own for QEMU's NVMe, NEED_MAPPING | INTR_RMV,
# an RTE_DEV_EVENT_REMOVE callback that defers the release, and an rte_bus_scan() before
# the release, as SPDK does) holds the SR-IOV PF through vfio-pci on the pcibus drop-in
# (LD_LIBRARY_PATH route), and another process writes 1 to the PF's sysfs `remove`. The
# removal request (VFIO's request notifier) reaches the callback; the scan returns with
# the PF not read again (the drop-in never reads the lock-taking sriov_numvfs), the
# release follows, and the removal completes. A rescan then
# brings the controller back on nvme.
#
# The stock library's half (the same scenario deadlocks) is dpdk-zz-seed-stock: it leaves
# the PF wedged until the VM's final reset, so it runs last.
# pcibus-timeout: 240
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "PF $pf not on nvme at start"
dpdk_to_vfio "$pf"

out=/tmp/seed-dropin.out
if ! seed_start "$out" "$pf" env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR; then
	back_on_nvme "$pf"
	if grep -q "$DPDK_NO_MAPPING" "$out"; then
		fail "DROP-IN FAIL (seed): the seed PMD's probe stops at rte_pci_map_device (BAR mapping not implemented in the drop-in yet): $(grep -m1 "$DPDK_NO_MAPPING" "$out")"
	fi
	fail "DROP-IN FAIL (seed): the seed application did not come to hold $pf"
fi
grep -q "$DPDK_EVICTED" "$out" || fail "DROP-IN FAIL (seed): no line saying the stock bus was evicted"
grep '^seed: probe' "$out"

seed_remove "$pf" /tmp/seed-dropin.rm
seed_expect_completion "$out" /tmp/seed-dropin.rm remove seed
# The rescan keeps what it knew of a device already probed (it reads nothing of it, the
# lock-taking sriov_numvfs never); a device it meets for the first time while its removal
# is pending gets max_vfs 0 with a log line. Either way the scan returned above: with the
# stock library it never does (dpdk-zz-seed-stock).
if grep -q "$pf: max_vfs 0: removal pending" "$out"; then
	echo "the rescan logged $pf's removal as pending"
fi
[ ! -e "/sys/bus/pci/devices/$pf" ] || fail "$pf still in sysfs after the removal"
back_on_nvme "$pf"
echo "DROP-IN PASS (seed): the scan returned with $pf skipped, the release followed, the removal completed"
