#!/bin/sh
# Issue 16 §6: the in-tree edu driver (pcibus::drivers::edu; examples/edu.rs, installed as
# pcibus-edu) through the bus, on QEMU's edu. The bus binds edu to vfio-pci, the driver
# probes it (MSI) and self-tests it (liveness, an interrupt, 12!, a DMA round trip under the
# 28-bit limit). A sysfs remove while it is held completes within seconds: the bus answers
# the removal request from its event loop and the driver drops every handle. After a rescan
# the same process probes the device again (after its settle delay) and the self-test passes
# again. SIGTERM then ends it cleanly. Last, one probe with INTx (VFIO's automasked
# interrupt, unmasked by the driver after each acknowledgement).
. "$PCIBUS_LIB"
only_profiles devices
need_pcibus
command -v pcibus-edu >/dev/null || {
	echo "skip: pcibus-edu is not installed (tests/vm/run --no-binaries?)"
	exit 77
}

export PCIBUS_CLAIM_DIR=/tmp/claims
edu=$(pci_find 1234 11e8) || fail "no edu device"
dev=/sys/bus/pci/devices/$edu
echo "edu at $edu, on driver '$(pci_driver "$edu")'"

passed() { grep -c "edu: $edu self-test passed" /tmp/edu.out; }

pcibus-edu "$edu" --seconds 50 >/tmp/edu.out 2>&1 &
holder=$!
wait_for 20 grep -q "edu: ready" /tmp/edu.out || fail "pcibus-edu never got ready: $(cat /tmp/edu.out)"
[ "$(passed)" -eq 1 ] || fail "first self-test: $(cat /tmp/edu.out)"
grep -q "edu: $edu self-test passed: edu 1.0, MSI:" /tmp/edu.out || fail "not on MSI: $(cat /tmp/edu.out)"
driver_is "$edu" vfio-pci || fail "the bus did not bind $edu to vfio-pci (on '$(pci_driver "$edu")')"

t=$(now_ms)
echo 1 >"$dev/remove" || fail "remove failed"
took=$(($(now_ms) - t))
echo "removal completed in $took ms"
[ -e "$dev" ] && fail "$edu still present after remove"
[ $took -lt 5000 ] || fail "the removal waited $took ms for the release"
# The line comes after the device is closed, which is what lets the removal complete: it
# may come a moment after the removal did.
wait_for 5 grep -q "edu: $edu removed (vfio removal request), 0 handle(s) kept" /tmp/edu.out ||
	fail "the driver never let go on the request: $(cat /tmp/edu.out)"
[ "$(proc_state $holder)" != gone ] && [ "$(proc_state $holder)" != Z ] ||
	fail "pcibus-edu ended at the removal: $(cat /tmp/edu.out)"

t=$(now_ms)
echo 1 >/sys/bus/pci/rescan
wait_for 10 test -e "$dev" || fail "$edu did not come back on rescan"
wait_for 20 sh -c "[ \$(grep -c 'edu: $edu self-test passed' /tmp/edu.out) -ge 2 ]" ||
	fail "not probed and self-tested again after the rescan: $(cat /tmp/edu.out)"
echo "probed and self-tested again $(($(now_ms) - t)) ms after the rescan"

kill -TERM $holder
wait_gone 10 $holder || fail "pcibus-edu did not end on SIGTERM: $(cat /tmp/edu.out)"
wait $holder
rc=$?
cat /tmp/edu.out
[ $rc -eq 0 ] || fail "pcibus-edu failed (exit $rc)"
grep -q "edu: SIGTERM: detaching" /tmp/edu.out || fail "no SIGTERM seen"
grep -q "edu: $edu detached$" /tmp/edu.out || fail "$edu not detached cleanly"
grep -q "edu: done: 2 self-test(s) passed, 0 failed" /tmp/edu.out || fail "not two self-tests passed"
grep -q "FAILED" /tmp/edu.out && fail "a self-test failed"

# INTx: the driver unmasks after each acknowledgement, or the second interrupt (12!
# after the raised one) never arrives.
pcibus-edu "$edu" --kind intx --seconds 1 >/tmp/intx.out 2>&1 || fail "INTx run failed: $(cat /tmp/intx.out)"
cat /tmp/intx.out
grep -q "edu: $edu self-test passed: edu 1.0, INTx:" /tmp/intx.out || fail "INTx self-test did not pass"
echo "ok"
