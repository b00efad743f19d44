#!/bin/sh
# Hotplug through the bus (issue 7; SPDK's issue 1605 is the counter-example): a bus with a
# test driver holds the allow-listed NVMe controller over VFIO. The controller is removed
# (sysfs `remove`): the driver gets the request and lets go, and the removal completes. It
# comes back (`rescan`): the bus reads it alone and, after its 200 ms settle delay, binds it
# to vfio-pci again and probes it. Dropping the bus then gives it back to nvme.
. "$PCIBUS_LIB"
need_pcibus

export PCIBUS_CLAIM_DIR=/tmp/claims
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"

pcibus-vmtest bus-replug "$pf" 40 >/tmp/bus.out 2>&1 &
holder=$!
wait_for 20 grep -q ready /tmp/bus.out || fail "bus never bound $pf: $(cat /tmp/bus.out)"

t=$(now_ms)
echo 1 >"$dev/remove" || fail "remove failed"
echo "removal completed in $(($(now_ms) - t)) ms"
[ -e "$dev" ] && fail "$pf still present after remove"
# The bus prints the event after it has closed the device, which is what lets the removal
# complete: the line may come a moment after the removal did.
wait_for 5 grep -q "remove $pf: vfio removal request" /tmp/bus.out || fail "the driver never got the request: $(cat /tmp/bus.out)"

t=$(now_ms)
echo 1 >/sys/bus/pci/rescan
wait_for 20 grep -q "bound 2 times" /tmp/bus.out || fail "not probed again after re-plug: $(cat /tmp/bus.out)"
echo "probed again $(($(now_ms) - t)) ms after the rescan"
wait_gone 10 $holder || fail "bus process did not exit"
wait $holder
rc=$?
cat /tmp/bus.out
[ $rc -eq 0 ] || fail "the bus process failed (exit $rc)"
wait_for 20 driver_is "$pf" nvme || fail "$pf not given back to nvme: on $(pci_driver "$pf")"
echo "$pf back on nvme"
