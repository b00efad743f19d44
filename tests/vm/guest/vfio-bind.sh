#!/bin/sh
# Move the NVMe controller from nvme to vfio-pci with driver_override, check
# that its VFIO group node appears (and, on a kernel with iommufd, its device cdev
# /dev/vfio/devices/vfioN named by vfio-dev/ in sysfs), then give it back to nvme.
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
if [ -e /dev/iommu ]; then
	cdev=$(ls "$dev/vfio-dev" 2>/dev/null | head -1)
	[ -n "$cdev" ] || fail "no vfio-dev/ entry under $dev on a kernel with /dev/iommu"
	wait_for 5 test -c "/dev/vfio/devices/$cdev" || { ls -l /dev/vfio/devices; fail "/dev/vfio/devices/$cdev missing"; }
	echo "device cdev /dev/vfio/devices/$cdev ($(cat "$dev/vfio-dev/$cdev/dev"))"
fi

echo "$pf" >"$dev/driver/unbind" || fail "unbind from vfio-pci"
wait_for 5 test ! -e "/dev/vfio/$group" || fail "/dev/vfio/$group still there after unbind"
[ -z "${cdev:-}" ] || wait_for 5 test ! -e "/dev/vfio/devices/$cdev" || fail "/dev/vfio/devices/$cdev still there after unbind"
echo >"$dev/driver_override" || fail "clear driver_override"
echo "$pf" >/sys/bus/pci/drivers_probe || fail "drivers_probe back"
[ "$(pci_driver "$pf")" = nvme ] || fail "driver is '$(pci_driver "$pf")' after rebind, want nvme"
# The controller must come back usable: its char device reappears.
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after rebinding"
