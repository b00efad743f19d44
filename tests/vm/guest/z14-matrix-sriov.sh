#!/bin/sh
# The removal matrix (issue 14 §6), the row for `echo 0 > PF/sriov_numvfs` while a VF is
# held: the PF's device lock is held while each VF is removed, and the held VF's removal
# waits for its holder. The holder holds VF 1 (only mapping BAR 0: QEMU's VFs are offline
# until the PF assigns them resources) in every state of tests/vm/tools/matrix.rs but mid-I/O
# (an offline VF has no I/O queues). See matrix_cell in lib.sh for the checks.
# pcibus-timeout: 240
. "$PCIBUS_LIB"
only_profiles sriov
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 20 driver_is "$pf" nvme || fail "PF not bound to nvme at start"
MATRIX_PF=$pf
echo 0 >"$dev/sriov_drivers_autoprobe" || fail "set sriov_drivers_autoprobe"
for mode in idle probe leak panic scan; do
	[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "sriov_numvfs is $(cat "$dev/sriov_numvfs") before a cell"
	echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
	vf=$(basename "$(readlink "$dev/virtfn1")")
	matrix_cell sriov "$mode" "$vf" --bar-only
done
echo "@@PCIBUS-MATRIX kernel=$PCIBUS_KERNEL backend=$PCIBUS_VFIO_BACKEND event=sriov mode=io result=SKIP ms=0 why=an offline VF has no I/O queues"
echo 1 >"$dev/sriov_drivers_autoprobe"
driver_is "$pf" nvme || fail "PF left nvme"
matrix_done
