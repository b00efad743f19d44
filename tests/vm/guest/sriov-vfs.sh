#!/bin/sh
# Create the two VFs of QEMU's SR-IOV NVMe controller and check the sysfs links
# between PF and VFs; remove them again.
. "$PCIBUS_LIB"
only_profiles sriov

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "PF not bound to nvme"
[ "$(cat "$dev/sriov_totalvfs")" = 2 ] || fail "sriov_totalvfs is $(cat "$dev/sriov_totalvfs"), want 2"
[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "VFs already enabled"

# QEMU's VFs are offline until configured through the PF; nvme would fail to
# probe them, so keep drivers away.
echo 0 >"$dev/sriov_drivers_autoprobe" || fail "set sriov_drivers_autoprobe"
echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
for i in 0 1; do
	l=$dev/virtfn$i
	[ -L "$l" ] || fail "$l missing"
	vf=$(basename "$(readlink "$l")")
	vdev=/sys/bus/pci/devices/$vf
	[ -d "$vdev" ] || fail "VF $vf not in /sys/bus/pci/devices"
	[ "$(basename "$(readlink "$vdev/physfn")")" = "$pf" ] || fail "$vf physfn does not point to $pf"
	[ "$(cat "$vdev/class")" = 0x010802 ] || fail "$vf class $(cat "$vdev/class")"
	[ -z "$(pci_driver "$vf")" ] || fail "$vf bound to $(pci_driver "$vf") despite autoprobe 0"
	[ -e "$vdev/iommu_group" ] || fail "$vf has no iommu_group"
	echo "virtfn$i -> $vf (vendor $(cat "$vdev/vendor") device $(cat "$vdev/device"))"
done
[ ! -e "$dev/virtfn2" ] || fail "virtfn2 exists"

echo 0 >"$dev/sriov_numvfs" || fail "disable VFs"
[ ! -e "$dev/virtfn0" ] || fail "virtfn0 still there after disabling"
echo 1 >"$dev/sriov_drivers_autoprobe"
