#!/bin/sh
# DMA buffers mapped into the VFIO container get IOVAs inside the ranges the IOMMU
# reports (39 bits on QEMU's intel-iommu), and the controller reaches them: an NVMe
# Identify Controller lands in a mapped buffer, and its completion fires MSI-X vector 0.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
on_vfio_pci "$pf" pcibus-vmtest vfio-dma "$pf" || fail "vfio-dma"
