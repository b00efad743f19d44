#!/bin/sh
# Interrupts of every kind through the driver API (DeviceBacking::enable_interrupts,
# `pcibus vfio irq-test`) on devices that are not NVMe: QEMU's edu raises MSI and INTx
# through its BAR0 (0x60, acknowledged at 0x64); INTx arrives once per unmask (VFIO
# automasks it: without the unmask the second never arrives); the e1000e's MSI-X vectors
# each reach their own eventfd (VFIO's loopback trigger).
. "$PCIBUS_LIB"
only_profiles devices
need_pcibus

edu=$(pci_find 1234 11e8) || fail "no edu device"
nic=$(pci_find 8086 10d3) || fail "no e1000e"
for d in "$edu" "$nic"; do
	pcibus bind "$d" vfio-pci || fail "bind $d to vfio-pci"
done

pcibus vfio irq-test "$edu" --kind msi --edu 3 || fail "edu: 3 MSIs"
pcibus vfio irq-test "$edu" --kind intx --edu 3 || fail "edu: 3 INTx, each unmasked"
if pcibus vfio irq-test "$edu" --kind intx --edu 2 --no-unmask; then
	fail "edu: a second INTx arrived without an unmask"
fi
pcibus vfio irq-test "$edu" --kind best --json >/tmp/best.json || fail "edu: best kind"
grep -q '"enabled": "MSI"' /tmp/best.json || fail "edu's best kind is not MSI: $(cat /tmp/best.json)"
pcibus vfio irq-test "$edu" --kind msix --count 1 && fail "edu has no MSI-X, yet MSI-X was enabled"
pcibus vfio irq-test "$nic" --kind msix --count 4 --loopback --json >/tmp/nic.json ||
	fail "e1000e: 4 MSI-X vectors, loopback: $(cat /tmp/nic.json)"
# MSI-X can grow while enabled from 6.5 (VFIO_IRQ_INFO_NORESIZE absent), not before.
case $(uname -r) in
6.1.*) want=false ;;
*) want=true ;;
esac
grep -q "\"msix_resizable\": $want" /tmp/nic.json || fail "MSI-X resizable is not $want on $(uname -r): $(cat /tmp/nic.json)"
pcibus vfio irq-test "$nic" --kind intx --loopback || fail "e1000e: INTx, loopback"
echo "ok"
