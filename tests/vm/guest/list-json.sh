#!/bin/sh
# `pcibus list --json` agrees with the sysfs files of every device (ids, class,
# revision, NUMA node, driver, IOMMU group, physfn), with ids from config space and
# from the id files; on the sriov profile also with two VFs enabled.
. "$PCIBUS_LIB"
need_pcibus

pcibus list || fail "pcibus list failed"
pcibus-vmtest list-json || fail "pcibus list --json disagrees with sysfs"

[ "$PCIBUS_PROFILE" = sriov ] || exit 0
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "PF not bound to nvme"
echo 0 >"$dev/sriov_drivers_autoprobe" || fail "set sriov_drivers_autoprobe"
echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
echo "with 2 VFs enabled:"
pcibus-vmtest list-json
rc=$?
echo 0 >"$dev/sriov_numvfs"
echo 1 >"$dev/sriov_drivers_autoprobe"
[ $rc = 0 ] || fail "pcibus list --json disagrees with sysfs (VFs enabled)"
