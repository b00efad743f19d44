#!/bin/sh
# Move the NVMe controller from nvme to vfio-pci with driver_override, check
# that its VFIO group node appears, then give it back to nvme.
. "$PCIBUS_LIB"

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
group=$(basename "$(readlink "$dev/iommu_group")")
echo "$pf is in iommu group $group"
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"

echo "$pf" >"$dev/driver/unbind" || fail "unbind from nvme"
echo vfio-pci >"$dev/driver_override" || fail "set driver_override"
echo "$pf" >/sys/bus/pci/drivers_probe || fail "drivers_probe"
[ "$(pci_driver "$pf")" = vfio-pci ] || fail "driver is '$(pci_driver "$pf")' after probe, want vfio-pci"
wait_for 5 test -c "/dev/vfio/$group" || { ls -l /dev/vfio; fail "/dev/vfio/$group missing"; }
[ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio missing"

echo "$pf" >"$dev/driver/unbind" || fail "unbind from vfio-pci"
wait_for 5 test ! -e "/dev/vfio/$group" || fail "/dev/vfio/$group still there after unbind"
echo >"$dev/driver_override" || fail "clear driver_override"
echo "$pf" >/sys/bus/pci/drivers_probe || fail "drivers_probe back"
[ "$(pci_driver "$pf")" = nvme ] || fail "driver is '$(pci_driver "$pf")' after rebind, want nvme"
# The controller must come back usable: its char device reappears.
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after rebinding"
