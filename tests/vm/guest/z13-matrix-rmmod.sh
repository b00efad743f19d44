#!/bin/sh
# The removal matrix (issue 14 §6), the row for `rmmod vfio_pci` while the device is held
# (an open device pins the module: the unload must be refused at once; an unbind then ends
# the cell), against every holder state of tests/vm/tools/matrix.rs (idle, mid-I/O at QD 32,
# mid-probe, a driver that leaks a handle, a driver that panics in remove, a scan with
# every blocking attribute at the same moment). See matrix_cell in lib.sh for what each
# cell checks.
# pcibus-timeout: 240
. "$PCIBUS_LIB"
only_profiles nvme
need_pcibus
if [ ! -e /lib/modules/vfio_pci.ko ]; then
	echo "SKIP: vfio-pci is built into this kernel ($PCIBUS_KERNEL): it cannot be unloaded"
	exit 77
fi

matrix_row rmmod
