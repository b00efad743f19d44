#!/bin/sh
# The removal matrix (issue 14 §6), the row for sysfs `remove` (the kernel asks the holder
# to let go through the REQ, holding the device lock), against every holder state of
# tests/vm/tools/matrix.rs (idle, mid-I/O at QD 32, mid-probe, a driver that leaks a handle, a
# driver that panics in remove, a scan with every blocking attribute at the same moment).
# See matrix_cell in lib.sh for what each cell checks.
# pcibus-timeout: 240
. "$PCIBUS_LIB"
only_profiles nvme
need_pcibus

matrix_row remove
