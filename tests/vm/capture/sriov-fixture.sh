#!/bin/sh
# Guest side of 'tests/vm/run --capture-fixture': enable the two VFs of the
# SR-IOV NVMe controller (PF on nvme, VFs left unbound) and print a sysfs
# snapshot between markers that carry the run's nonce, with its size and md5 so
# the host can check the serial console did not mangle it.
. "$PCIBUS_LIB"
only_profiles sriov

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "PF not bound to nvme"
echo 0 >"$dev/sriov_drivers_autoprobe" || fail "set sriov_drivers_autoprobe"
echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
[ -L "$dev/virtfn1" ] || fail "virtfn1 missing"
# Let the controller's reset work and the VF additions settle.
wait_for 20 sh -c 'ls /dev/nvme0n1 >/dev/null 2>&1' || echo "note: /dev/nvme0n1 did not appear"
sleep 1

pcibus-snapshot /sys >/tmp/snapshot 2>/tmp/snapshot.err || {
	cat /tmp/snapshot.err
	fail "snapshot failed"
}
cat /tmp/snapshot.err
[ -z "$(tail -c1 /tmp/snapshot)" ] || echo >>/tmp/snapshot
sum=$(md5sum </tmp/snapshot)
size=$(wc -c </tmp/snapshot)

# Nothing from the kernel may land between the markers.
echo 1 >/proc/sys/kernel/printk
echo "@@PCIBUS-CAPTURE-BEGIN $PCIBUS_NONCE"
cat /tmp/snapshot
echo "@@PCIBUS-CAPTURE-END $PCIBUS_NONCE ${sum%% *} $size"
echo 4 >/proc/sys/kernel/printk
