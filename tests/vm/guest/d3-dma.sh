#!/bin/sh
# DMA with constraints on real VFIO (tests/vm/tools/dma_test.rs, DeviceBacking::alloc_dma_with,
# map_dma/unmap_dma, DmaPool): IOVAs under a 28-bit limit, aligned, device-read-only
# mappings accepted by the kernel (type1: READ without WRITE; iommufd: READABLE only),
# caller memory mapped and given back only after the unmap, a pool, a limit nothing fits
# under refused, and nothing leaked.
. "$PCIBUS_LIB"
only_profiles devices
need_pcibus

edu=$(pci_find 1234 11e8) || fail "no edu device"
pcibus bind "$edu" vfio-pci || fail "bind $edu to vfio-pci"
pcibus-dma-test "$edu" --address-bits 28 --read-only >/tmp/dma1 2>&1
rc=$?
cat /tmp/dma1
[ $rc = 0 ] || fail "dma_test --address-bits 28 --read-only exited $rc"
pcibus-dma-test "$edu" --address-bits 32 --align 0x10000 --numa 0 >/tmp/dma2 2>&1
rc=$?
cat /tmp/dma2
[ $rc = 0 ] || fail "dma_test --address-bits 32 --align 0x10000 exited $rc"
grep -v '^ok:' /tmp/dma1 /tmp/dma2 | grep -qi 'fail' && fail "a check failed"
echo "ok"
