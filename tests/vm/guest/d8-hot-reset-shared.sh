#!/bin/sh
# A bus hot reset that would also reset a device someone else has. Process A
# (`pcibus-vmtest hold-claimed`) claims a device and keeps it open through VFIO, reading
# its config space and BAR0 all along; it exits 1 if they ever failed or changed.
#
# sriov profile: the PF (on the kernel's nvme driver) and its two VFs share the root
# port's secondary bus, each VF in an IOMMU group of its own. A holds VF 2; B's dry run
# for VF 1 (`pcibus vfio reset VF1 --hot --dry-run`) names the PF with its driver and
# VF 2 with A (PID, command) as also reset and not held; B's hot reset is refused with
# those reasons before the kernel is asked; the kernel, asked without pcibus's check
# (`pcibus-vmtest kernel-hot-reset`), refuses too (its errno is printed).
#
# devices profile: the two functions of one edu device behind root port rpb share the
# bus and, as Linux groups functions without ACS, one IOMMU group. A holds function 1,
# so B cannot even open function 0: the refusal names A. With A gone, B claims and opens
# both (`--with`) and the hot reset is done; both answer after it. With function 1 on
# pci-stub (a host driver that leaves the group viable), B holds the group, yet the
# reset is refused naming pci-stub: the kernel (asked without the check) refuses it too.
. "$PCIBUS_LIB"
only_profiles devices sriov
need_pcibus

group() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }
# works F: edu's id register through the driver API.
works() { pcibus vfio regs "$1" 0:0:32 | grep -q '0x010000ed$'; }
# hold F: A claims and opens F in the background ($apid); waits until it is ready.
hold() {
	rm -f /tmp/d8.stop
	pcibus-vmtest hold-claimed "$1" /tmp/d8.stop 300 >/tmp/d8.a 2>&1 &
	apid=$!
	wait_for 30 sh -c "grep -q 'ready\$' /tmp/d8.a || [ ! -e /proc/$apid ]"
	grep -q 'ready$' /tmp/d8.a || { cat /tmp/d8.a; fail "A did not get ready"; }
	cat /tmp/d8.a
}
# release: A is still there, is told to stop, and exits 0 (its device never changed).
release() {
	[ "$(proc_state $apid)" != gone ] || { cat /tmp/d8.a; fail "A ended early"; }
	touch /tmp/d8.stop
	wait_gone 20 $apid || fail "A did not end"
	wait $apid
	_rc=$?
	cat /tmp/d8.a
	[ $_rc = 0 ] || fail "A's device changed or stopped answering while B asked for the hot reset"
}
# refused F OUT: B's hot reset of F fails, saying it refused; output in OUT.
refused() {
	if pcibus vfio reset "$1" --hot >"$2" 2>&1; then
		cat "$2"
		fail "a hot reset of $1 that resets a device this process does not hold was done"
	fi
	cat "$2"
}

if [ "$PCIBUS_PROFILE" = sriov ]; then
	pf=$(nvme_pf) || fail "no NVMe controller"
	dev=/sys/bus/pci/devices/$pf
	wait_for 20 driver_is "$pf" nvme || fail "PF not bound to nvme at start"
	echo 0 >"$dev/sriov_drivers_autoprobe" || fail "set sriov_drivers_autoprobe"
	echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
	vf1=$(basename "$(readlink "$dev/virtfn0")")
	vf2=$(basename "$(readlink "$dev/virtfn1")")
	echo "PF $pf (group $(group "$pf"), $(pci_driver "$pf")), VFs $vf1 (group $(group "$vf1")) and $vf2 (group $(group "$vf2"))"
	for f in "$vf1" "$vf2"; do
		pcibus bind "$f" vfio-pci || fail "bind $f to vfio-pci"
	done
	hold "$vf2"
	pcibus vfio reset "$vf1" --hot --dry-run >/tmp/d8.dry 2>&1 || { cat /tmp/d8.dry; fail "dry run"; }
	cat /tmp/d8.dry
	grep -q "a bus reset would also reset: $pf, $vf2\$" /tmp/d8.dry || fail "the dry run does not name $pf and $vf2 as also reset"
	grep "affects $vf2" /tmp/d8.dry | grep -q "not held here: claimed by PID $apid (pcibus-vmtest)" ||
		fail "the dry run does not name A (PID $apid) as $vf2's holder"
	grep "affects $pf" /tmp/d8.dry | grep -q "not held here: bound to nvme, not vfio-pci" ||
		fail "the dry run does not say $pf is on nvme"
	refused "$vf1" /tmp/d8.hot
	grep 'reset refused' /tmp/d8.hot | grep "$vf2 (claimed by PID $apid (pcibus-vmtest)" | grep -q "$pf (bound to nvme" ||
		fail "the refusal does not name $vf2's holder and $pf's driver"
	pcibus-vmtest kernel-hot-reset "$vf1" || fail "the kernel hot reset the bus of a device another process holds"
	release
	echo 0 >"$dev/sriov_numvfs" || fail "disable the VFs"
	echo 1 >"$dev/sriov_drivers_autoprobe"
	echo "ok"
	exit 0
fi

f0= f1=
for d in /sys/bus/pci/devices/*; do
	a=${d##*/}
	case $a in 0000:00:*) continue ;; esac
	[ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ] || continue
	case $a in *.0) f0=$a ;; *.1) f1=$a ;; esac
done
[ -n "$f0" ] && [ -n "$f1" ] || fail "no two-function edu behind a root port"
g=$(group "$f0")
echo "edu functions $f0 (group $g) and $f1 (group $(group "$f1")), backend $PCIBUS_VFIO_BACKEND"
[ "$(group "$f1")" = "$g" ] || fail "the functions are in different IOMMU groups: this case expects one"
for f in "$f0" "$f1"; do
	pcibus bind "$f" vfio-pci || fail "bind $f to vfio-pci"
done

# --- A holds function 1, and with it their group -------------------------------------
hold "$f1"
for dry in --dry-run ""; do
	if pcibus vfio reset "$f0" --hot $dry >/tmp/d8.busy 2>&1; then
		cat /tmp/d8.busy
		fail "B opened $f0 while A holds its group"
	fi
	cat /tmp/d8.busy
	if [ "$PCIBUS_VFIO_BACKEND" = iommufd ]; then
		# The iommufd backend's refusal (binding to the iommufd) names the group, not yet
		# who holds it.
		grep -q "cannot be bound to this iommufd: its IOMMU group $g is in use elsewhere" /tmp/d8.busy ||
			fail "the refusal does not say the group is in use"
		continue
	fi
	grep -q "cannot open /dev/vfio/$g: the group is in use by another process" /tmp/d8.busy ||
		fail "the refusal does not say the group is in use"
	grep -q "open in PID $apid (pcibus-vmtest); its devices claimed: $f1 by PID $apid (pcibus-vmtest)" /tmp/d8.busy ||
		fail "the refusal does not name A (PID $apid) and its claim of $f1"
done
release

# --- B holds both ------------------------------------------------------------------------
pcibus vfio reset "$f0" --hot --with "$f1" >/tmp/d8.both 2>&1 || { cat /tmp/d8.both; fail "hot reset holding both"; }
cat /tmp/d8.both
grep -q "a bus reset would also reset: $f1\$" /tmp/d8.both || fail "$f1 not named as also reset"
grep -q 'hot reset: done' /tmp/d8.both || fail "hot reset not done"
works "$f0" || fail "$f0 does not answer after the hot reset"
works "$f1" || fail "$f1 does not answer after the hot reset"

# --- Function 1 on a host driver ----------------------------------------------------------
# Debian's kernels have pci-stub (a module tests/vm/run loads); the built 6.12-iommufd has
# no modules and no CONFIG_PCI_STUB: there the host-driver case is left out, saying so.
if [ ! -d /sys/bus/pci/drivers/pci-stub ]; then
	echo "SKIPPED the host-driver case: no pci-stub driver in this kernel"
	echo "ok"
	exit 0
fi
pcibus bind "$f1" pci-stub || fail "bind $f1 to pci-stub"
driver_is "$f1" pci-stub || fail "$f1 is on '$(pci_driver "$f1")', not pci-stub"
pcibus vfio reset "$f0" --hot --dry-run >/tmp/d8.dry 2>&1 || { cat /tmp/d8.dry; fail "dry run with $f1 on pci-stub"; }
cat /tmp/d8.dry
grep "affects $f1" /tmp/d8.dry | grep -q 'not held here: bound to pci-stub, not vfio-pci' ||
	fail "the dry run does not say $f1 is on pci-stub"
refused "$f0" /tmp/d8.stub
grep 'reset refused' /tmp/d8.stub | grep -q "$f1 (bound to pci-stub, not vfio-pci)" ||
	fail "the refusal does not name $f1 on pci-stub"
pcibus-vmtest kernel-hot-reset "$f0" || fail "the kernel hot reset the bus of a device on pci-stub"
pcibus bind "$f1" vfio-pci || fail "bind $f1 back to vfio-pci"
works "$f1" || fail "$f1 does not answer after pci-stub"
echo "ok"
