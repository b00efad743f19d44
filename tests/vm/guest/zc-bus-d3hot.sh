#!/bin/sh
# Issue 14 §4: a held device its driver put in D3hot faults on a BAR access; the bus
# reports a fault (sysfs power_state D3hot), not a removal, and keeps the device.
. "$PCIBUS_LIB"
need_pcibus
pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 10 driver_is "$pf" nvme || fail "$pf not bound to nvme at start"
pcibus-vmtest bus-d3hot "$pf" || fail "bus-d3hot"
wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme"
