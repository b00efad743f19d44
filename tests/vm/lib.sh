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

# ---------------------------------------------------------------- the removal matrix
# Issue 14 §6: each cell holds a device with `pcibus-matrix hold DEV MODE` (tests/vm/
# tools/matrix.rs: a bus with the NVMe driver, in the state MODE), makes the device leave as
# EVENT says once the holder is ready, and checks: the event's write returns, the holder
# exits cleanly (its own checks: removal reported, claim gone, no scan timed out, fds and
# locked memory back), no task stays in D state, no live claim is left, and the blocks
# the holder stamped before the event read back through the kernel's driver afterwards.
# Each cell prints `@@PCIBUS-MATRIX kernel=K backend=B event=E mode=M result=R ms=N
# [why=...]`; MATRIX_FAILS counts the failed ones (the script fails at the end, so that
# every cell is reported).

MATRIX_FAILS=0

# Tasks in D state now, one /proc/PID/task/TID per line.
d_state_tasks() {
	for _s in /proc/[0-9]*/task/[0-9]*/stat; do
		[ "$(sed 's/.*) \(.\).*/\1/' "$_s" 2>/dev/null)" = D ] && echo "${_s%/stat}"
	done
}

# Tasks in D state now and still 2 s later, with their stacks; nothing if none.
stuck_tasks() {
	_st_a=$(d_state_tasks)
	[ -n "$_st_a" ] || return 0
	sleep 2
	_st_b=$(d_state_tasks)
	for _st_t in $_st_a; do
		if echo "$_st_b" | grep -qx "$_st_t"; then
			echo "$_st_t ($(cat "$_st_t/comm" 2>/dev/null)) in D state for 2 s:"
			cat "$_st_t/stack" 2>/dev/null
		fi
	done
}

# The block device of namespace 1 of controller $1 (e.g. nvme0n1), once the kernel's
# driver has it. With native multipath (a controller in an nvme-subsys) the controller
# has only the hidden path nvmeScCn1; the device node is the subsystem's nvmeSn1.
nvme_blockdev() {
	for _nb in /sys/bus/pci/devices/"$1"/nvme/nvme*/nvme*n1; do
		[ -e "$_nb" ] || continue
		_nb=$(basename "$_nb" | sed 's/c[0-9]*n/n/')
		[ -b "/dev/$_nb" ] && { echo "$_nb"; return 0; }
	done
	return 1
}

# matrix_event EVENT DEV: what makes DEV leave (remove, unbind, sriov, unplug) or
# disturbs it (reset: a function reset by another process; rmmod: vfio-pci unloaded).
matrix_event() {
	case $1 in
	remove) echo 1 >"/sys/bus/pci/devices/$2/remove" ;;
	unbind) echo "$2" >/sys/bus/pci/drivers/vfio-pci/unbind ;;
	sriov) echo 0 >"/sys/bus/pci/devices/$MATRIX_PF/sriov_numvfs" ;;
	unplug) qmp '{"execute":"device_del","arguments":{"id":"nvme0"}}' 30 ;;
	reset) echo 1 >"/sys/bus/pci/devices/$2/reset" ;;
	rmmod)
		# An open vfio device pins its driver's module: the unload must be refused at
		# once, not wait for the holder.
		if rmmod vfio_pci 2>/tmp/rmmod.err; then
			echo "rmmod vfio_pci succeeded while $2 was held"
			insmod /lib/modules/vfio_pci.ko
			return 1
		fi
		echo "rmmod refused: $(cat /tmp/rmmod.err)"
		;;
	*) echo "unknown event $1"; return 2 ;;
	esac
}

# Puts controller $1 back on nvme after a cell (rescan if it was removed).
matrix_restore() {
	_mr=/sys/bus/pci/devices/$1
	# After a QMP unplug the device must be plugged in again first (MATRIX_READD: the
	# device_add command).
	[ -e "$_mr" ] || [ -z "${MATRIX_READD:-}" ] || qmp "$MATRIX_READD" 30 || return 1
	[ -e "$_mr" ] || echo 1 >/sys/bus/pci/rescan
	wait_for 10 test -e "$_mr" || return 1
	driver_is "$1" nvme || pcibus bind "$1" nvme >/dev/null || return 1
	wait_for 20 driver_is "$1" nvme
}

_matrix_result() {
	echo "@@PCIBUS-MATRIX kernel=$PCIBUS_KERNEL backend=$PCIBUS_VFIO_BACKEND event=$1 mode=$2 result=$3 ms=$4${5:+ why=$5}"
	[ "$3" = FAIL ] && MATRIX_FAILS=$((MATRIX_FAILS + 1))
	return 0
}

# matrix_cell EVENT MODE DEV [--bar-only]: one cell (see above). With --bar-only (an
# offline VF) no blocks are stamped or checked, and the device is not restored.
matrix_cell() {
	_ev=$1
	_mode=$2
	_dev=$3
	_opt=${4:-}
	_out=/tmp/matrix-$_ev-$_mode.out
	_why=
	echo "--- cell: $_ev while $_mode ($_dev)"
	_t0=$(now_ms)
	pcibus-matrix hold "$_dev" "$_mode" $_opt >"$_out" 2>&1 &
	_hpid=$!
	_n=400
	until grep -q "matrix: ready\|matrix: probing" "$_out" || [ "$(proc_state $_hpid)" = gone ] ||
		[ "$(proc_state $_hpid)" = Z ] || [ $_n -le 0 ]; do
		_n=$((_n - 1))
		sleep 0.1
	done
	if ! grep -q "matrix: ready\|matrix: probing" "$_out"; then
		cat "$_out"
		kill $_hpid 2>/dev/null
		_matrix_result "$_ev" "$_mode" FAIL $(($(now_ms) - _t0)) "holder never ready"
		matrix_restore "$_dev"
		return 0
	fi
	# In probe mode the probe sleeps 3 s: act in the middle of it.
	[ "$_mode" = probe ] && sleep 1
	_te=$(now_ms)
	rm -f /tmp/matrix-ev
	(
		matrix_event "$_ev" "$_dev"
		echo "$? $(($(now_ms) - _te))" >/tmp/matrix-ev
	) >/tmp/matrix-ev.out 2>&1 &
	_epid=$!
	# A disturbance does not make the device leave: once it is over, an unbind does.
	case $_ev in reset | rmmod)
		wait_gone 20 $_epid || _why="$_ev did not return within 20 s"
		echo "$_dev" >/sys/bus/pci/drivers/vfio-pci/unbind &
		;;
	esac
	if wait_gone 45 $_hpid; then
		wait $_hpid
		_hrc=$?
	else
		_hrc=stuck
		echo "holder still running after 45 s; threads: $(thread_states $_hpid)"
		for _s in /proc/$_hpid/task/*/stack; do
			[ -r "$_s" ] && { echo "$_s:"; cat "$_s"; }
		done
	fi
	wait_gone 20 $_epid || true
	cat "$_out"
	cat /tmp/matrix-ev.out 2>/dev/null
	_evr=stuck
	[ -r /tmp/matrix-ev ] && read -r _evr _evms </tmp/matrix-ev
	echo "event $_ev returned $_evr after ${_evms:-?} ms; holder exit $_hrc"
	_stuck=$(stuck_tasks)
	[ -n "$_stuck" ] && echo "$_stuck"
	[ "$_evr" = 0 ] || _why="${_why:+$_why; }the $_ev event returned $_evr"
	[ "$_hrc" = 0 ] || _why="${_why:+$_why; }the holder exited $_hrc"
	[ -z "$_stuck" ] || _why="${_why:+$_why; }tasks stuck in D state"
	if pcibus claims --json 2>/dev/null | grep "$_dev" | grep -q '"live":true'; then
		_why="${_why:+$_why; }a live claim is left"
	fi
	if [ "$_opt" != --bar-only ]; then
		if matrix_restore "$_dev"; then
			_seed=$(sed -n 's/.*matrix: stamped .* seed=\([0-9]*\).*/\1/p' "$_out")
			_blk=
			wait_for 10 nvme_blockdev "$_dev" && _blk=$(nvme_blockdev "$_dev")
			if [ -z "$_seed" ]; then
				[ "$_mode" = probe ] || _why="${_why:+$_why; }no blocks were stamped"
			elif [ -z "$_blk" ]; then
				_why="${_why:+$_why; }no block device after the restore"
			else
				_got=$(dd if="/dev/$_blk" bs=512 skip=4096 count=8 2>/dev/null |
					grep -o "pcibus-matrix lba=[0-9]* seed=$_seed" | wc -l)
				echo "stamps read back through /dev/$_blk: $_got of 8"
				[ "$_got" = 8 ] || _why="${_why:+$_why; }$_got of 8 stamped blocks read back"
			fi
		else
			_why="${_why:+$_why; }$_dev did not come back on nvme"
		fi
	fi
	if [ -z "$_why" ]; then
		_matrix_result "$_ev" "$_mode" PASS $(($(now_ms) - _t0))
	else
		_matrix_result "$_ev" "$_mode" FAIL $(($(now_ms) - _t0)) "$_why"
	fi
}

# matrix_row EVENT: the matrix's row for EVENT on the NVMe controller, one cell per holder
# state, then matrix_done.
matrix_row() {
	_row_pf=$(nvme_pf) || fail "no NVMe controller"
	wait_for 20 driver_is "$_row_pf" nvme || fail "$_row_pf not on nvme at start"
	for _row_mode in idle io probe leak panic scan; do
		matrix_cell "$1" "$_row_mode" "$_row_pf"
	done
	matrix_done
}

# matrix_done: fail the test if a cell failed.
matrix_done() {
	[ "$MATRIX_FAILS" = 0 ] || fail "$MATRIX_FAILS cell(s) of the removal matrix failed (@@PCIBUS-MATRIX lines)"
}

# pci_find VENDOR DEVICE: print the sysfs name of the first PCI device with these ids
# (4 hex digits each, as in lspci -n), or fail.
pci_find() {
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/vendor")" = "0x$1" ] && [ "$(cat "$d/device")" = "0x$2" ] || continue
		echo "${d##*/}"
		return 0
	done
	return 1
}
