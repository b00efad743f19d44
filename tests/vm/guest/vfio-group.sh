#!/bin/sh
# Two functions of one IOMMU group open at once (`pcibus-vmtest vfio-group`), with the
# boot's VFIO backend: the second open reuses the group the first opened in the container
# (iommufd: binds to the same iommufd), a second container is refused (group: EBUSY;
# iommufd: EPERM for the group's other device, EINVAL for a device open already), and the
# container keeps its IOVA space (and DMA mappings) after the devices close, until it
# goes itself. QEMU's q35 has such a group: the ICH9
# functions at 00:1f.* (LPC bridge, SATA, SMBus) share one, and the guest has no
# drivers for them. The two that are not bridges are bound to vfio-pci; the LPC bridge
# stays unbound, which keeps the group viable.
. "$PCIBUS_LIB"
need_pcibus

pick=""
for g in /sys/kernel/iommu_groups/*; do
	cands=""
	ok=1
	for d in "$g"/devices/*; do
		a=${d##*/}
		drv=$(pci_driver "$a")
		[ -z "$drv" ] || [ "$drv" = vfio-pci ] || { ok=0; break; }
		case $(cat "$d/class") in
		0x06*) ;; # bridges stay unbound
		*) cands="$cands $a" ;;
		esac
	done
	[ $ok = 1 ] || continue
	set -- $cands
	[ $# -ge 2 ] && { pick="$1 $2"; echo "group ${g##*/}: $(ls "$g/devices" | tr '\n' ' ')"; break; }
done
[ -n "$pick" ] || { echo "skip: no IOMMU group with two unbound non-bridge functions"; exit 77; }
set -- $pick
a=$1
b=$2
for x in "$a" "$b"; do
	pcibus bind "$x" vfio-pci || fail "bind $x to vfio-pci"
done
t=$(now_ms)
pcibus-vmtest vfio-group "$a" "$b"
rc=$?
echo "vfio-group: $(($(now_ms) - t)) ms"
for x in "$a" "$b"; do
	pcibus unbind "$x" || fail "unbind $x"
	echo >"/sys/bus/pci/devices/$x/driver_override"
done
[ $rc = 0 ] || fail "vfio-group"
