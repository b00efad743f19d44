#!/bin/sh
# SR-IOV driven by pcibus (issue 8): `pcibus nvme sriov PF --vfs 2 --io-check` releases the
# PF's flexible resources, resets it, enables 2 VFs, assigns each 2 VQ and 1 VI, sets them
# online, binds them to vfio-pci, opens them with the PF's VF token, brings their
# controllers up and drives the PF and both VFs at once (data checked, and each VF's data
# read back through the PF). While it holds everything up, the VFs are checked from
# outside (bound to vfio-pci, claimed); at the end SR-IOV is off and the PF back on nvme.
. "$PCIBUS_LIB"
only_profiles sriov
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 20 driver_is "$pf" nvme || fail "PF not bound to nvme at start"
[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "VFs already enabled"

# Without enable_sriov the command must say so, and change nothing.
param=/sys/module/vfio_pci/parameters/enable_sriov
if [ "$(cat $param)" != Y ]; then
	pcibus nvme sriov "$pf" --vfs 2 >/tmp/noparam.out 2>&1 && fail "ran without enable_sriov"
	grep -q enable-sriov /tmp/noparam.out || fail "no hint about --enable-sriov: $(cat /tmp/noparam.out)"
	echo "without enable_sriov: $(tail -1 /tmp/noparam.out)"
fi

t=$(now_ms)
pcibus nvme sriov "$pf" --vfs 2 --io-check --reset --enable-sriov --json --hold 4 >/tmp/sriov.json 2>/tmp/sriov.err &
pid=$!
# The first line comes while everything is up (or the command ended early).
up_or_gone() {
	grep -q '"vfs"' /tmp/sriov.json || [ "$(proc_state $pid)" = Z ] || [ "$(proc_state $pid)" = gone ]
}
wait_for 25 up_or_gone
grep -q '"vfs"' /tmp/sriov.json || { cat /tmp/sriov.err /tmp/sriov.json; fail "no output while holding"; }
echo "up after $(($(now_ms) - t)) ms"
head -1 /tmp/sriov.json >/tmp/up.json
[ "$(cat "$dev/sriov_numvfs")" = 2 ] || fail "sriov_numvfs is $(cat "$dev/sriov_numvfs") while up"
for i in 0 1; do
	vf=$(basename "$(readlink "$dev/virtfn$i")")
	driver_is "$vf" vfio-pci || fail "VF $vf on '$(pci_driver "$vf")', not vfio-pci"
	pcibus claims | grep -q "$vf" || fail "VF $vf not claimed"
	echo "VF $vf on vfio-pci, claimed"
done
wait_gone 25 $pid || fail "pcibus nvme sriov did not finish"
wait $pid
rc=$?
cat /tmp/sriov.err
tail -1 /tmp/sriov.json >/tmp/done.json
echo "--- output (while up)"
cat /tmp/up.json
echo "--- output (at the end)"
cat /tmp/done.json
echo "---"
[ $rc = 0 ] || fail "pcibus nvme sriov exited $rc"
echo "done after $(($(now_ms) - t)) ms"

# Both secondaries online with 2 VQ and 1 VI each, both VFs identified, I/O on all three.
n=$(grep -o '"online":true' /tmp/up.json | wc -l)
[ "$n" = 2 ] || fail "$n secondaries online, want 2"
[ "$(grep -o '"vq":2,' /tmp/up.json | wc -l)" = 2 ] || fail "VQ assignment"
[ "$(grep -o '"driver":"vfio-pci"' /tmp/up.json | wc -l)" = 3 ] || fail "not all three on vfio-pci"
[ "$(grep -o '"model":"QEMU NVMe Ctrl"' /tmp/up.json | wc -l)" = 3 ] || fail "not all three identified"
nio=$(grep -o '"role":"[pv]f"' /tmp/done.json | wc -l)
[ "$nio" = 3 ] || fail "I/O checked on $nio controllers, want 3"
grep -q '"ok":false' /tmp/done.json && fail "a step or an I/O check failed"
[ "$(grep -o '"read_through_pf":true' /tmp/done.json | wc -l)" = 2 ] || fail "the PF did not read back what both VFs wrote"
grep -q '"reset":true' /tmp/done.json || fail "the PF was not reset"
grep -q '"disabled":true' /tmp/done.json || fail "not disabled at the end"

# Taken down: no VFs, the PF back on nvme.
[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "sriov_numvfs is $(cat "$dev/sriov_numvfs") at the end"
[ ! -e "$dev/virtfn0" ] || fail "virtfn0 still there"
pcibus bind "$pf" nvme || fail "bind $pf back to nvme"
echo >"$dev/driver_override"
wait_for 20 driver_is "$pf" nvme || fail "PF not back on nvme"
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after rebinding $pf"
echo "PF back on nvme"
