#!/bin/sh
# A device error through the driver API (issue 16 §4): the bus holds a virtio-rng with an
# AER capability behind a PCIe root port (devices profile) with a driver that keeps devices on errors; the host
# injects an uncorrectable, non-fatal error (a poisoned TLP) into it through QEMU's
# pcie_aer_inject_error. The kernel's AER service on the root port runs its recovery,
# vfio-pci signals the device's ERR eventfd, and the bus asks the driver
# (Driver::error_detected) and reports BusEvent::Error; the driver keeps the device.
#
# QEMU 7.2 routes an error message upwards only from functions with SERR# Enable set in
# their Command register (and through bridges with SERR# Enable in Bridge Control): the
# Device Control register's per-severity enables, which Linux sets for native AER, are
# honoured only from QEMU 8.0 (commit "hw/pci/aer: Add missing routing for AER errors").
# The test sets those bits itself, through sysfs, once the device is held.
. "$PCIBUS_LIB"
only_profiles devices
need_pcibus

nic=
for d in /sys/bus/pci/devices/*; do
	a=${d##*/}
	case $a in 0000:00:*) continue ;; esac
	[ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1044 ] && nic=$a
done
[ -n "$nic" ] || fail "no virtio-rng behind a root port"
root=$(basename "$(dirname "$(readlink -f "/sys/bus/pci/devices/$nic")")")
echo "virtio-rng $nic behind $root (driver $(pci_driver "$root"))"
# The kernel's AER service on the port (CONFIG_PCIEAER: Debian's kernels; the kernel
# tests/vm/build-kernel builds has none) is what reports the error to vfio-pci.
if [ ! -e "/sys/bus/pci/devices/$root/aer_rootport_total_err_fatal" ]; then
	echo "skip: $root has no AER service (kernel built without CONFIG_PCIEAER)"
	exit 77
fi

pcibus-vmtest aer-wait "$nic" 20 >/tmp/aer.out 2>&1 &
pid=$!
ready() { grep -q '^aer: ready' /tmp/aer.out || [ "$(proc_state $pid)" = gone ]; }
wait_for 15 ready
grep -q '^aer: ready' /tmp/aer.out || { cat /tmp/aer.out; fail "aer-wait did not get ready"; }
# setbits16 DEVICE OFFSET MASK: sets bits of a 16-bit config register through sysfs.
setbits16() {
	_f=/sys/bus/pci/devices/$1/config
	_v=$(($(od -An -tu2 -j "$2" -N2 "$_f" | tr -d ' ') | $3))
	printf "$(printf '\\%03o\\%03o' $((_v & 255)) $((_v >> 8)))" |
		dd of="$_f" bs=1 seek="$2" count=2 conv=notrunc 2>/dev/null
	echo "$1 config $2: $(od -An -tx2 -j "$2" -N2 "$_f")"
}
# Device Control's error reporting enables (Linux sets them for native AER; shown, and
# set if a reset cleared them).
express() { pcibus show "$1" | sed -n 's/.*capability 0x10 PCI Express at 0x\([0-9a-f]*\).*/\1/p' | head -1; }
for d in "$nic" "$root"; do
	at=$(express "$d")
	[ -n "$at" ] || fail "no PCI Express capability found for $d"
	setbits16 "$d" $((0x$at + 8)) 0xf || fail "DEVCTL of $d"
done
setbits16 "$nic" 4 0x100 || fail "SERR# on $nic"
setbits16 "$root" 4 0x100 || fail "SERR# on $root"
setbits16 "$root" 62 0x2 || fail "bridge SERR# on $root"
qmp '{"execute":"human-monitor-command","arguments":{"command-line":"pcie_aer_inject_error aerdev POISON_TLP"}}' ||
	{ cat /tmp/aer.out; fail "QMP pcie_aer_inject_error: $QMP_REPLY"; }
echo "injected: $QMP_REPLY"
wait_gone 25 $pid || fail "aer-wait did not finish"
wait $pid
rc=$?
cat /tmp/aer.out
dmesg | grep -i -E "aer|$nic" | tail -8
[ $rc = 0 ] || fail "no error reported through the bus"
grep -q 'error of .* reported, the driver keeps the device' /tmp/aer.out || fail "no error event"
echo "ok"
