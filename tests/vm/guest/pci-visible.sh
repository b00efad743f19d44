#!/bin/sh
# The emulated NVMe controller is enumerated, has the NVMe class code and is
# bound to the nvme driver.
. "$PCIBUS_LIB"

pf=$(nvme_pf) || { ls -l /sys/bus/pci/devices; fail "no device with class 0x010802"; }
echo "nvme controller at $pf: vendor $(cat /sys/bus/pci/devices/$pf/vendor) device $(cat /sys/bus/pci/devices/$pf/device)"
case $pf in
????:??:??.?) ;;
*) fail "unexpected sysfs name $pf" ;;
esac
wait_for 10 driver_is "$pf" nvme || fail "driver is '$(pci_driver "$pf")', want nvme"
[ -e "/sys/bus/pci/devices/$pf/iommu_group" ] || fail "$pf has no iommu_group (is intel-iommu on?)"
