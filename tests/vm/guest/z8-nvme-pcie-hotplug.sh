#!/bin/sh
# PCIe hot-unplug under I/O: `pcibus nvme perf --hotplug` keeps 16 random reads in flight
# while the host unplugs the controller with QMP device_del (the guest's hotplug driver,
# acpiphp with QEMU 7.2's q35, removes it: vfio asks the holder to let go with a REQ
# first, then the slot is ejected) and plugs it in again with device_add, twice. Each
# time the device leaves the guest, the load stops within a second (in-flight I/O fails
# fast), the process neither hangs nor dies, the device comes back on the kernel's nvme
# (it is a new device: no driver_override) and pcibus takes it back to vfio-pci after the
# settle delay, and the load resumes.
# shellcheck disable=SC2317 # the small functions below are called through wait_for
# shellcheck source=../lib.sh
. "$PCIBUS_LIB"
only_profiles hotplug
need_pcibus

export PCIBUS_CLAIM_DIR=/tmp/claims
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 20 driver_is "$pf" nvme || fail "not bound to nvme at start"

# The controller as tests/vm/run's hotplug profile has it; its namespace stays in the
# subsystem while it is unplugged and comes back with it.
del='{"execute":"device_del","arguments":{"id":"nvme0"}}'
add='{"execute":"device_add","arguments":{"driver":"nvme","id":"nvme0","bus":"rp0","serial":"feed","subsys":"subsys0"}}'

pcibus nvme perf "$pf" --rw randread --qd 16 --time 20 --hotplug --settle-ms 300 --json \
	>/tmp/php.json 2>/tmp/php.err &
perf=$!
wait_for 20 driver_is "$pf" vfio-pci || fail "perf never bound $pf: $(cat /tmp/php.err)"
sleep 1

# bad MESSAGE: fail with what the guest looks like (device, perf's threads and their kernel
# stacks, perf's events, the kernel log: console shows warnings only), and stop perf.
bad() {
	echo "FAIL: $*"
	echo "--- $pf in sysfs: $([ -e "$dev" ] && echo "yes, on '$(pci_driver "$pf")'" || echo no)"
	echo "--- perf (pid $perf): $(proc_state $perf), threads: $(thread_states $perf)"
	for s in "/proc/$perf/task/"*/stack; do
		[ -r "$s" ] && echo "$s:" && cat "$s"
	done
	echo "--- perf's stderr:"
	cat /tmp/php.err
	echo "--- dmesg:"
	dmesg | tail -n 40
	kill $perf 2>/dev/null
	exit 1
}
gone() { [ ! -e "$dev" ]; }
present() { [ -e "$dev" ]; }
running() { case $(proc_state $perf) in Z | gone) return 1 ;; esac; }
removed() { [ "$(grep -c " removed (" /tmp/php.err)" -ge "$1" ]; }
attached() { [ "$(grep -c "attached again" /tmp/php.err)" -ge "$1" ]; }
# drivers_seen T0: the drivers the returned device has had, in order, polled every 10 ms
# until it is on vfio-pci (or 10 s), each with its time since T0: "nvme@80ms vfio-pci@470ms".
drivers_seen() {
	_last=
	_n=1000
	while [ $_n -gt 0 ]; do
		_d=$(pci_driver "$pf")
		if [ -n "$_d" ] && [ "$_d" != "$_last" ]; then
			printf '%s@%sms ' "$_d" $(($(now_ms) - $1))
			_last=$_d
		fi
		[ "$_d" = vfio-pci ] && return 0
		_n=$((_n - 1))
		sleep 0.01
	done
}

rc=0
for i in 1 2; do
	running || bad "perf is not running before unplug $i"
	t=$(now_ms)
	# Acknowledged once QEMU has deleted the device: the guest has removed it and
	# ejected the slot.
	qmp "$del" 30 || bad "device_del $i: $QMP_REPLY"
	took=$(($(now_ms) - t))
	gone || bad "$pf still in sysfs after QEMU deleted it"
	echo "unplug $i: $pf gone, QEMU's DEVICE_DELETED after $took ms"
	[ $took -lt 5000 ] || { echo "FAIL: unplug $i took $took ms"; rc=1; }
	wait_for 2 removed $i || bad "perf did not report removal $i"
	running || bad "perf died with the device (unplug $i)"

	t=$(now_ms)
	qmp "$add" || bad "device_add $i: $QMP_REPLY"
	wait_for 10 present || bad "$pf did not come back after device_add $i; now: $(ls /sys/bus/pci/devices)"
	echo "plug $i: $pf present after $(($(now_ms) - t)) ms"
	seen=$(drivers_seen "$t")
	echo "plug $i: drivers: $seen"
	case $seen in
	nvme@*vfio-pci@*) ;;
	*) echo "FAIL: plug $i: expected nvme, then vfio-pci; saw: '$seen'"; rc=1 ;;
	esac
	wait_for 10 attached $i || bad "not attached again after plug $i"
	echo "plug $i: load resumes $(($(now_ms) - t)) ms after device_add"
	[ "$(nvme_pf)" = "$pf" ] || bad "the controller came back at $(nvme_pf), not $pf"
	sleep 1
done

wait_gone 40 $perf || bad "perf did not end"
wait $perf
prc=$?
grep -v IOPS /tmp/php.err
cat /tmp/php.json
[ $prc -eq 0 ] || fail "perf failed (exit $prc)"
hotplug_perf_ok /tmp/php.json 2 unplug || rc=1
pcibus bind "$pf" nvme || fail "could not give $pf back to nvme"
back_on_nvme "$pf"
wait_for 20 sh -c 'ls /dev/nvme*n1 >/dev/null 2>&1' || fail "no namespace on nvme at the end: $(ls /dev/nvme*)"
exit $rc
