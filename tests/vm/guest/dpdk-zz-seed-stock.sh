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

HOLD_S=15
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

t=$(now_ms)
seed_remove "$pf" /tmp/seed-stock.rm
scanning() { grep -q '^seed: scan start' "$out" || [ "$(proc_state $SEED_PID)" = gone ]; }
wait_for 30 scanning || true
grep -q '^seed: RTE_DEV_EVENT_REMOVE' "$out" || { grep '^seed:' "$out"; fail "STOCK: no RTE_DEV_EVENT_REMOVE reached the application"; }
grep -q '^seed: scan start' "$out" || fail "STOCK: the application never started its scan"
echo "removal request and scan start after $(($(now_ms) - t)) ms; watching for $HOLD_S s"
sleep $HOLD_S
grep '^seed:' "$out"
if grep -q '^seed: scan returned' "$out"; then
	wait_gone 30 "$SEED_PID"
	fail "STOCK: the scan returned: no deadlock (did the scan skip the PF, or did the kernel not lock sriov_numvfs?)"
fi
main=$(proc_state "$SEED_PID")
stack=$(cat "/proc/$SEED_PID/task/$SEED_PID/stack" 2>/dev/null)
echo "application (pid $SEED_PID), after $(($(now_ms) - t)) ms:"
task_report "$SEED_PID"
[ -e "/tmp/seed-stock.rm" ] && fail "STOCK: the remove write returned ($(cat /tmp/seed-stock.rm)) although the application holds the PF"
echo "the remove write (pid $REMOVE_PID):"
task_report "$REMOVE_PID"
[ "$main" = D ] || fail "STOCK: the scanning thread is in state $main, not D"
echo "$stack" | grep -q sriov_numvfs_show || fail "STOCK: the scanning thread does not wait in sriov_numvfs_show (stack above)"
grep -q vfio_unregister_group_dev "/proc/$REMOVE_PID/stack" ||
	fail "STOCK: the remove write does not wait in vfio_unregister_group_dev (stack above)"
echo 8 >/proc/sys/kernel/printk
echo w >/proc/sysrq-trigger
sleep 2
echo 4 >/proc/sys/kernel/printk
echo "STOCK DEADLOCK (as the seed predicts): the scan waits for the PF's device lock, the removal holding it waits for the release the scan delays; left to /init's final sysrq reset"
