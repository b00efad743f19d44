#!/bin/sh
# Issue 16 §4: SR-IOV through the library (Bus::set_vfs; pcibus-vmtest bus-set-vfs): the
# bus holds the PF on vfio-pci, its driver is asked, 200 VFs are refused (more than
# TotalVFs, read from config space), 2 VFs appear at the addresses computed from the PF's
# VF offset and stride, and 0 takes them away again; the PF goes back to nvme.
. "$PCIBUS_LIB"
only_profiles sriov
need_pcibus

pf=$(nvme_pf) || fail "no NVMe PF"
param=/sys/module/vfio_pci/parameters/enable_sriov
old=$(cat "$param")
echo Y >"$param" || fail "cannot set enable_sriov"
pcibus-vmtest bus-set-vfs "$pf"
rc=$?
echo "$old" >"$param"
[ $rc = 0 ] || fail "bus-set-vfs exited $rc"
[ "$(cat "/sys/bus/pci/devices/$pf/sriov_numvfs")" = 0 ] || fail "VFs left: $(cat "/sys/bus/pci/devices/$pf/sriov_numvfs")"
wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme (on '$(pci_driver "$pf")')"
echo "ok"
