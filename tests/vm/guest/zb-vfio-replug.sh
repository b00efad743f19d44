#!/bin/sh
# A VFIO container survives its device's hot removal (issue 14 §2). `pcibus-vmtest
# replug` keeps ONE container for the whole run: it reads the NVMe controller's Identify
# by DMA, then three times removes it (sysfs `remove`; on the REQ it drops its BAR
# mapping and the device), unmaps the DMA regions that outlived it (no leak), rescans,
# binds it to vfio-pci again, reopens it in the same container and reads Identify into
# new regions. With the group backend the kernel (6.1 and 6.12 alike) detaches the group
# when its last device goes and releases the container's IOMMU with it, and the group
# number comes back for the new device: the container must forget the dead group (no
# ENODEV on reopen) and set the IOMMU up again. With iommufd the IOAS keeps its mappings;
# the same steps must pass.
# Runs after the other removal tests; brings the controller back on nvme.
. "$PCIBUS_LIB"
need_pcibus

ROUNDS=3
LIMIT=50
pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"

t=$(now_ms)
pcibus-vmtest replug "$pf" $ROUNDS >/tmp/zb.out 2>&1 &
pid=$!
if wait_gone $LIMIT $pid; then
	wait $pid
	rc=$?
	cat /tmp/zb.out
	echo "replug: process exited with $rc after $(($(now_ms) - t)) ms"
else
	cat /tmp/zb.out
	echo "replug: still running after $LIMIT s; thread states: $(thread_states $pid)"
	for s in /proc/$pid/task/*/stack; do
		[ -r "$s" ] && { echo "$s:"; cat "$s"; }
	done
	rc=timeout
fi

# Give the controller back for whatever runs next (it may be removed, or on vfio-pci).
back_on_nvme "$pf"
[ "$rc" = timeout ] && fail "replug did not finish within $LIMIT s"
[ "$rc" = 0 ] || fail "replug"
