#!/bin/sh
# Open the NVMe controller through pcibus::vfio: BAR0 registers (CAP, VS), config
# space against sysfs, regions and IRQs against `pcibus vfio info --json`, reset.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
vfio_open() {
	pcibus vfio info "$1" && pcibus-vmtest vfio-open "$1"
}
on_vfio_pci "$pf" vfio_open "$pf" || fail "vfio-open"
