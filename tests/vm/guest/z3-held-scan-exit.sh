#!/bin/sh
# Never read what you hold (issue 6, §3): `pcibus-vmtest held-scan-exit` holds the
# NVMe controller through VFIO with the REQ eventfd registered and scans with every
# blocking attribute requested (like `pcibus list --read all`), sharing its removal
# registry, while a thread writes `remove`. On the REQ it drops the device; the removal
# must complete, the process must exit within seconds, and no scan may report a value
# read from the held device's blocking attributes (only HeldOpen / RemovalPending).
# A process stuck in such a read could never exit: its fd would keep the removal
# waiting, which keeps the read waiting. Runs after z2; brings the device back.
. "$PCIBUS_LIB"
need_pcibus

LIMIT=10
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"

t=$(now_ms)
pcibus-vmtest held-scan-exit "$pf" >/tmp/z3.out 2>&1 &
pid=$!
if wait_gone $LIMIT $pid; then
	wait $pid
	rc=$?
	took=$(($(now_ms) - t))
	cat /tmp/z3.out
	echo "held-scan-exit: process exited with $rc after $took ms"
else
	cat /tmp/z3.out
	echo "held-scan-exit: still running after $LIMIT s; thread states: $(thread_states $pid)"
	for s in /proc/$pid/task/*/stack; do
		[ -r "$s" ] && { echo "$s:"; cat "$s"; }
	done
	rc=timeout
fi
gone=yes
[ -e "$dev" ] && gone=no
echo "device directory gone after the run: $gone"

# Bring the controller back for whatever runs next.
back_on_nvme "$pf"
[ "$rc" = timeout ] && fail "the holding process did not exit within $LIMIT s"
[ "$gone" = yes ] || fail "the removal did not complete"
[ "$rc" = 0 ] || fail "held-scan-exit"
