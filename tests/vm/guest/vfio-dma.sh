#!/bin/sh
# DMA buffers mapped into the VFIO container get IOVAs inside the ranges the IOMMU
# reports (39 bits on QEMU's intel-iommu), and the controller reaches them: an NVMe
# Identify Controller lands in a mapped buffer.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 test "$(pci_driver "$pf")" = nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"
pcibus-vmtest vfio-dma "$pf"
rc=$?
pcibus bind "$pf" nvme || fail "bind back to nvme"
echo >"$dev/driver_override"
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after rebinding"
[ $rc = 0 ] || fail "vfio-dma"
