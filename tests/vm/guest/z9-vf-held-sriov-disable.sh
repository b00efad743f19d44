#!/bin/sh
# The seed deadlock in its SR-IOV form (issue 14 §1). `echo 0 > PF/sriov_numvfs` holds
# the PF's device lock while it removes each VF, and a VF on vfio-pci waits for its
# holder to close it. `pcibus-vmtest held-scan-exit VF --pf PF` holds VF 1 through vfio
# and scans with every blocking attribute requested; this script writes sriov_numvfs=0
# from another process. The holder's scans must never read (nor time out reading) the
# PF's lock-taking attributes while it holds the VF; it gets the REQ, releases and exits,
# and the sriov_numvfs write completes. On main before the fix the PF's reads were
# submitted, timed out, and a holder exiting then stayed a zombie with a thread in D
# state while sriov_numvfs=0 never completed.
. "$PCIBUS_LIB"
only_profiles sriov
need_pcibus

LIMIT=20
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 20 driver_is "$pf" nvme || fail "PF not bound to nvme at start"
[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "VFs already enabled"

# QEMU's VFs are offline until configured through the PF: keep drivers away, then put VF 1
# on vfio-pci (its own IOMMU group; the PF stays on nvme).
echo 0 >"$dev/sriov_drivers_autoprobe" || fail "set sriov_drivers_autoprobe"
echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
vf=$(basename "$(readlink "$dev/virtfn1")")
pcibus bind "$vf" vfio-pci || fail "bind VF $vf to vfio-pci"

t=$(now_ms)
pcibus-vmtest held-scan-exit "$vf" --pf "$pf" >/tmp/z9.out 2>&1 &
pid=$!
holding() {
	grep -q "holding; waiting" /tmp/z9.out || [ "$(proc_state $pid)" = Z ] || [ "$(proc_state $pid)" = gone ]
}
wait_for 20 holding
grep -q "holding; waiting" /tmp/z9.out || { cat /tmp/z9.out; fail "the holder did not get ready"; }
# Let it scan a while with the VF held, then disable SR-IOV from this shell.
sleep 1
tw=$(now_ms)
rm -f /tmp/z9.numvfs
(echo 0 >"$dev/sriov_numvfs"; echo "$? $(($(now_ms) - tw))" >/tmp/z9.numvfs) &
wpid=$!

if wait_gone $LIMIT $pid; then
	wait $pid
	rc=$?
	cat /tmp/z9.out
	echo "holder exited with $rc after $(($(now_ms) - t)) ms"
else
	cat /tmp/z9.out
	echo "holder still running after $LIMIT s; thread states: $(thread_states $pid)"
	for s in /proc/$pid/task/*/stack; do
		[ -r "$s" ] && { echo "$s:"; cat "$s"; }
	done
	rc=timeout
fi
numvfs=stuck
if wait_gone 10 $wpid; then
	read -r wrc took </tmp/z9.numvfs
	echo "sriov_numvfs=0 returned $wrc after $took ms"
	numvfs=$wrc
fi
[ "$rc" = timeout ] && fail "the holder did not exit within $LIMIT s (sriov_numvfs write: $numvfs)"
[ "$numvfs" = 0 ] || fail "sriov_numvfs=0 did not complete ($numvfs)"
[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "sriov_numvfs reads $(cat "$dev/sriov_numvfs") afterwards"
[ ! -e "/sys/bus/pci/devices/$vf" ] || fail "VF $vf still there"
echo 1 >"$dev/sriov_drivers_autoprobe"
driver_is "$pf" nvme || fail "PF left nvme"
[ "$rc" = 0 ] || fail "held-scan-exit"
