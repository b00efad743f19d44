# Helpers for guest tests written in shell (busybox sh). Installed in the
# initramfs as $PCIBUS_LIB; a test uses it with: . "$PCIBUS_LIB"

# Print a message and fail the test.
fail() {
	echo "FAIL: $*"
	exit 1
}

# skip_unless WHAT VALUE CHOICE...: skip the test (reported as SKIP) unless VALUE is one
# of the CHOICEs.
skip_unless() {
	_what=$1
	_value=$2
	shift 2
	for _c in "$@"; do
		[ "$_value" = "$_c" ] && return 0
	done
	echo "skip: $_what $_value is not one of: $*"
	exit 77
}

# Skip the test unless the VM runs one of the given profiles.
only_profiles() { skip_unless profile "$PCIBUS_PROFILE" "$@"; }

# Skip the test unless the VM runs with one of the given VFIO backends
# (PCIBUS_VFIO_BACKEND: group, iommufd or auto, compared as given: auto is not resolved
# to what pcibus picks).
only_backends() { skip_unless "VFIO backend" "$PCIBUS_VFIO_BACKEND" "$@"; }

# Print the sysfs name (DDDD:BB:DD.F) of the first NVMe controller (class
# 0x010802) that is not a virtual function.
nvme_pf() {
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/class")" = 0x010802 ] || continue
		[ -e "$d/physfn" ] && continue
		echo "${d##*/}"
		return 0
	done
	return 1
}

# Print the name of the driver bound to PCI device $1, or nothing.
pci_driver() {
	l=/sys/bus/pci/devices/$1/driver
	[ -e "$l" ] && basename "$(readlink "$l")"
	return 0
}

# driver_is PCI_ADDRESS DRIVER: whether the device is bound to DRIVER now (for wait_for,
# which re-runs it; `wait_for N test "$(pci_driver ...)" = X` would not re-read).
driver_is() {
	[ "$(pci_driver "$1")" = "$2" ]
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.1 s until it succeeds (COMMAND's
# arguments are expanded once, when wait_for is called).
wait_for() {
	n=$(($1 * 10))
	shift
	while ! "$@"; do
		n=$((n - 1))
		[ $n -gt 0 ] || return 1
		sleep 0.1
	done
}

# Skip the test unless the pcibus binaries are installed (tests/vm/run builds them
# unless --no-binaries).
need_pcibus() {
	for b in pcibus pcibus-vmtest; do
		command -v "$b" >/dev/null || {
			echo "skip: $b is not installed (tests/vm/run --no-binaries?)"
			exit 77
		}
	done
}

# Milliseconds since boot (10 ms resolution, from /proc/uptime).
now_ms() {
	read -r up _ </proc/uptime
	s=${up%.*}
	cs=${up#*.}
	echo $((s * 1000 + ${cs#0} * 10))
}

# The JSON object of device $2 in the output of 'pcibus list --json' in file $1
# (one object per line).
json_device() {
	grep "\"address\":\"$2\"" "$1"
}

# The state letter of process $1 (R, S, D, Z...) from /proc/PID/stat, or "gone".
proc_state() {
	if [ -r "/proc/$1/stat" ]; then
		# comm may hold spaces: the state follows the last ')'.
		sed 's/.*) \(.\).*/\1/' "/proc/$1/stat" 2>/dev/null || echo gone
	else
		echo gone
	fi
}

# The states of every thread of process $1, e.g. "Z D".
thread_states() {
	for t in /proc/"$1"/task/*; do
		[ -r "$t/stat" ] && sed 's/.*) \(.\).*/\1/' "$t/stat" 2>/dev/null
	done | tr '\n' ' '
}

# wait_gone SECONDS PID: wait until process PID has exited (without wait(1), which
# could hang on a process stuck in the kernel). Fails if it is still there.
wait_gone() {
	n=$(($1 * 10))
	while [ -e "/proc/$2" ] && [ "$(proc_state "$2")" != Z ]; do
		n=$((n - 1))
		[ $n -gt 0 ] || return 1
		sleep 0.1
	done
}

# on_vfio_pci PF COMMAND...: run COMMAND with NVMe controller PF bound to vfio-pci, then
# give it back to nvme (override cleared, /dev/nvme* back). Returns COMMAND's status;
# fails the test if the device cannot be moved either way.
on_vfio_pci() {
	_pf=$1
	shift
	wait_for 10 driver_is "$_pf" nvme || fail "$_pf not bound to nvme at start"
	pcibus bind "$_pf" vfio-pci || fail "bind $_pf to vfio-pci"
	"$@"
	_rc=$?
	pcibus bind "$_pf" nvme || fail "bind $_pf back to nvme"
	echo >"/sys/bus/pci/devices/$_pf/driver_override"
	wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after rebinding $_pf"
	return $_rc
}

# back_on_nvme PF: after a test that may have removed the NVMe controller PF, bring it back
# (rescan) and onto nvme, for whatever runs next; fails the test if it cannot.
back_on_nvme() {
	_pf=$1
	_dev=/sys/bus/pci/devices/$_pf
	if [ ! -e "$_dev" ]; then
		_t=$(now_ms)
		echo 1 >/sys/bus/pci/rescan
		wait_for 10 test -e "$_dev" || fail "$_pf did not come back on rescan"
		echo "rescan: $_pf back in $(($(now_ms) - _t)) ms"
	fi
	[ "$(pci_driver "$_pf")" = vfio-pci ] && pcibus bind "$_pf" nvme
	wait_for 20 driver_is "$_pf" nvme || fail "$_pf not on nvme at the end"
}

# hotplug_perf_ok JSON N WHAT: the summary of `pcibus nvme perf --hotplug --json` in file
# JSON counts N removals and N re-attaches, the load stopped within a second of each WHAT
# (e.g. "removal", "unplug"), and some I/O completed. Prints a FAIL line for each miss;
# returns 1 if there was one.
hotplug_perf_ok() {
	_json=$1
	_n=$2
	_ok=0
	grep -q "\"removals\":$_n" "$_json" || { echo "FAIL: not $_n removals counted"; _ok=1; }
	grep -q "\"reattaches\":$_n" "$_json" || { echo "FAIL: not $_n re-attaches counted"; _ok=1; }
	for _ms in $(sed 's/.*"removal_drain_ms":\[\([0-9,]*\)\].*/\1/' "$_json" | tr , ' '); do
		[ "$_ms" -lt 1000 ] || { echo "FAIL: the load took $_ms ms to stop after the $3"; _ok=1; }
	done
	_ios=$(sed 's/.*"ios":\([0-9]*\).*/\1/' "$_json")
	[ "$_ios" -gt 0 ] || { echo "FAIL: no I/O completed"; _ok=1; }
	return $_ok
}

# qmp JSON [SECONDS]: have the host send one QMP command to this VM's QEMU (see "Asking
# the host for QMP commands" in tests/vm/README.md). The request goes out on the second
# serial port, /dev/ttyS1, and the host answers on it. Sets QMP_REPLY to QEMU's reply (one
# line of JSON, or the host's reason) and returns 0 if QEMU did the command, 1 if not or if
# no answer came within SECONDS (default 60). A device_del returns once QEMU has deleted
# the device (its DEVICE_DELETED event), so the same id can be device_add'ed at once.
qmp() {
	QMP_REPLY=
	_qmp_n=$((${_qmp_n:-0} + 1))
	_qmp_id=$$.$_qmp_n
	_qmp_t=$(now_ms)
	[ -c /dev/ttyS1 ] || { echo "qmp: no /dev/ttyS1 (not run by tests/vm/run?)" >&2; return 1; }
	# Open before asking: the UART drops what arrives while the port is closed, and
	# raw -echo so that the answer is not echoed back to the host.
	exec 3<>/dev/ttyS1
	stty raw -echo <&3
	echo "qmp $_qmp_id -> $1" >&2
	printf '@@PCIBUS-QMP %s %s\n' "$_qmp_id" "$1" >&3
	_qmp_end=$((_qmp_t + ${2:-60} * 1000))
	while :; do
		_qmp_left=$(((_qmp_end - $(now_ms) + 999) / 1000))
		# shellcheck disable=SC3045 # busybox sh's read has -t
		if [ $_qmp_left -le 0 ] || ! read -r -t $_qmp_left _qmp_line <&3; then
			exec 3<&-
			QMP_REPLY="no answer from the host within ${2:-60} s"
			echo "qmp $_qmp_id <- $QMP_REPLY" >&2
			return 1
		fi
		# Skip anything else, such as the late answer to an earlier test's request.
		case $_qmp_line in "@@PCIBUS-QMP-ACK $_qmp_id "*) break ;; esac
	done
	exec 3<&-
	_qmp_line=${_qmp_line#"@@PCIBUS-QMP-ACK $_qmp_id "}
	_qmp_rc=${_qmp_line%% *}
	QMP_REPLY=${_qmp_line#* }
	echo "qmp $_qmp_id <- $QMP_REPLY ($(($(now_ms) - _qmp_t)) ms)" >&2
	[ "$_qmp_rc" = 0 ]
}
