#!/bin/sh
# The removal matrix (issue 14 §6), the row for a PCIe hot-unplug (QMP device_del of the
# controller behind root port rp0; the guest removes it through ACPI hotplug, vfio asks the
# holder to let go, then the slot is ejected), against every holder state of
# examples/matrix.rs. Each cell plugs the controller in again (device_add) before it checks
# the stamped blocks. See matrix_cell in lib.sh for the checks.
# pcibus-timeout: 240
. "$PCIBUS_LIB"
only_profiles hotplug
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "$pf not on nvme at start"
MATRIX_READD='{"execute":"device_add","arguments":{"driver":"nvme","id":"nvme0","bus":"rp0","serial":"feed","subsys":"subsys0"}}'
for mode in idle io probe leak panic scan; do
	matrix_cell unplug "$mode" "$pf"
done
matrix_done
