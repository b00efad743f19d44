#!/bin/sh
# Issue 18, the seed in its SR-IOV form with DPDK itself, on the drop-in: the seed
# application (dpdk/vm/seed.c; QEMU's NVMe VFs have the PF's id 1b36:0010, so its PMD
# takes them) holds VF 1 of the SR-IOV PF through vfio-pci (drop-in, LD_LIBRARY_PATH
# route), and another process writes 0 to the PF's sriov_numvfs. That write holds the
# *PF's* device lock while the VF's removal waits for the application; the request reaches
# the application's RTE_DEV_EVENT_REMOVE callback, which scans before it releases. Debian's
# bus reads every PF's sriov_numvfs in that scan and would wait on the lock the write holds
# (dpdk/vm/seed-vf-stock.sh asserts it; it wedges the PF, so it is not in the profile);
# the drop-in never reads it: the scan returns, the release follows, the write completes.
# pcibus-timeout: 240
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

seed_vf_setup
pf=$SEED_PF
vf=$SEED_VF

out=/tmp/seed-vf-dropin.out
seed_start "$out" "$vf" env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR ||
	fail "DROP-IN FAIL (seed-vf): the seed application did not come to hold $vf"
grep -q "$DPDK_EVICTED" "$out" || fail "DROP-IN FAIL (seed-vf): no line saying the stock bus was evicted"
grep '^seed: probe' "$out"

seed_disable_vfs "$pf" /tmp/seed-vf-dropin.rm
seed_expect_completion "$out" /tmp/seed-vf-dropin.rm sriov_numvfs=0 seed-vf
[ "$(cat "/sys/bus/pci/devices/$pf/sriov_numvfs")" = 0 ] || fail "sriov_numvfs of $pf is not 0 afterwards"
[ ! -e "/sys/bus/pci/devices/$vf" ] || fail "VF $vf still in sysfs"
echo 1 >"/sys/bus/pci/devices/$pf/sriov_drivers_autoprobe"
driver_is "$pf" nvme || fail "PF $pf left nvme"
echo "DROP-IN PASS (seed-vf): the scan returned, the release followed, sriov_numvfs=0 completed"
