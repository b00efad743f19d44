#!/bin/sh
# Open the NVMe controller through pcibus::vfio: BAR0 registers (CAP, VS), config
# space against sysfs, regions and IRQs against `pcibus vfio info --json`, reset.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 test "$(pci_driver "$pf")" = nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"
pcibus vfio info "$pf"
pcibus-vmtest vfio-open "$pf"
rc=$?
pcibus bind "$pf" nvme || fail "bind back to nvme"
echo >"$dev/driver_override"
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after rebinding"
[ $rc = 0 ] || fail "vfio-open"
