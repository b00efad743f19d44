#!/bin/sh
# DMA buffers mapped into the VFIO container get IOVAs inside the ranges the IOMMU
# reports (39 bits on QEMU's intel-iommu), and the controller reaches them: an NVMe
# Identify Controller lands in a mapped buffer, and its completion fires MSI-X vector 0.
# Then the same with the kernel's 2 MiB huge page pool filled (issue 14 §2): the 2 MiB
# buffer Identify lands in is one huge page, mapped, reached by the device, unmapped and
# mapped again whole (its munmaps checked), and the pool gets every page back.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
on_vfio_pci "$pf" pcibus-vmtest vfio-dma "$pf" || fail "vfio-dma"

pool=/proc/sys/vm/nr_hugepages
[ -w $pool ] || { echo "skip: no huge page pool in this kernel ($pool)"; exit 0; }
echo 4 >$pool
free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages 2>/dev/null)
[ "${free:-0}" -ge 1 ] || { echo 0 >$pool; fail "no free 2 MiB page after asking for 4 (free: $free)"; }
on_vfio_pci "$pf" pcibus-vmtest vfio-dma "$pf" >/tmp/dma-2m.out 2>&1
rc=$?
cat /tmp/dma-2m.out
after=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)
echo 0 >$pool
[ $rc = 0 ] || fail "vfio-dma with huge pages (exit $rc)"
grep -q "0x200000 bytes (huge pages)" /tmp/dma-2m.out || fail "the 2 MiB buffer was not on a huge page"
[ "$after" = "$free" ] || fail "huge pages not given back: $after free after, $free before"
echo "huge pages: the 2 MiB buffer on a 2 MiB page, reached by DMA, all $free free pages back"
