#!/bin/sh
# The bus with a driver, on VFIO (issue 7): a bus with a test driver binds the NVMe
# controller to vfio-pci itself, claims it and probes it (BAR 0 reads as a controller's).
# A second process's bus is refused the claim, naming the holder. An operator's unbind
# from vfio-pci reaches the driver as a removal request through the bus; the driver lets
# go, the bus closes the device, and the unbind completes.
. "$PCIBUS_LIB"
need_pcibus

export PCIBUS_CLAIM_DIR=/tmp/claims
pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"

pcibus-vmtest bus "$pf" 30 >/tmp/bus.out 2>&1 &
holder=$!
wait_for 20 grep -q ready /tmp/bus.out || fail "bus never bound $pf: $(cat /tmp/bus.out)"
[ "$(pci_driver "$pf")" = vfio-pci ] || fail "the bus did not bind $pf to vfio-pci"
pcibus claims

pcibus-vmtest bus "$pf" 2 >/tmp/second.out 2>&1 && fail "a second bus got $pf: $(cat /tmp/second.out)"
grep -q "claimed by PID $holder" /tmp/second.out || fail "the refusal does not name PID $holder: $(cat /tmp/second.out)"
echo "second process: $(cat /tmp/second.out)"

t=$(now_ms)
echo "$pf" >/sys/bus/pci/drivers/vfio-pci/unbind || fail "unbind failed"
took=$(($(now_ms) - t))
echo "unbind from vfio-pci completed in $took ms"
wait_gone 10 $holder || fail "bus process did not exit"
wait $holder
rc=$?
cat /tmp/bus.out
[ $rc -eq 0 ] || fail "the bus process failed (exit $rc)"
grep -q "remove $pf: vfio removal request" /tmp/bus.out || fail "the driver never got the removal request"
[ -z "$(pci_driver "$pf")" ] || fail "$pf still bound to $(pci_driver "$pf")"
[ $took -lt 3000 ] || fail "the unbind waited $took ms for the release"
pcibus claims --json | grep -q "$pf" && pcibus claims --json | grep "$pf" | grep -q '"live":true' && fail "claim still live"
pcibus bind "$pf" nvme || fail "could not give $pf back to nvme"
back_on_nvme "$pf"
