#!/bin/sh
# Issue 18, the seed in its SR-IOV form on Debian's librte_bus_pci (the baseline of
# tests/vm/guest/dpdk-seed-vf.sh): the seed application holds VF 1 of the SR-IOV NVMe
# through vfio-pci and another process writes 0 to the PF's sriov_numvfs. The write holds
# the PF's device lock while the VF's removal waits for the application; the application's
# deferred release waits for its rte_bus_scan(), and the stock scan reads the PF's
# sriov_numvfs, which waits for that lock. Asserted as in dpdk-zz-seed-stock
# (seed_assert_stock_deadlock). It leaves the PF, and PCI rescan/remove, wedged until the
# VM's final reset, so it is not in the profile (dpdk-zz-seed-stock already ends that
# boot): run it on its own,
#   tests/vm/run -k 6.12 -p dpdk -T dpdk/vm/seed-vf-stock.sh
# pcibus-timeout: 180
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

seed_vf_setup

out=/tmp/seed-vf-stock.out
seed_start "$out" "$SEED_VF" env ||
	fail "STOCK: the seed application did not come to hold $SEED_VF on Debian's librte_bus_pci"
grep -q 'PCI (pcibus)' "$out" && fail "STOCK: the pcibus drop-in answered in the stock run"
grep '^seed: probe' "$out"

seed_disable_vfs "$SEED_PF" /tmp/seed-vf-stock.rm
seed_assert_stock_deadlock "$out" /tmp/seed-vf-stock.rm sriov_numvfs=0
