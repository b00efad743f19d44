# DPDK helpers for the VM suite's `dpdk` profile (busybox sh). dpdk/vm/guest-tree installs
# this file as /usr/lib/pcibus-vm/dpdk.sh beside Debian's DPDK, dpdk-testpmd, the seed
# application (pcibus-dpdk-seed) and the drop-in (/opt/pcibus-dpdk/librte_bus_pci.so.23).
# A test sources "$PCIBUS_LIB" first, then this file.

DPDK_PMDS=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0
# Writing a command to a testpmd that has exited must fail, not kill the test (SIGPIPE).
trap "" PIPE
# The drop-in under its SONAME: LD_LIBRARY_PATH=$DPDK_DROPIN_DIR puts it before the stock
# library for the application's DT_NEEDED (EAL still dlopens the stock one as a plugin; the
# drop-in unregisters that second "pci" bus at its first scan, and logs it).
DPDK_DROPIN_DIR=/opt/pcibus-dpdk
# What the drop-in logs when it takes the stock bus off EAL's list.
DPDK_EVICTED='a second bus named "pci" is registered'
# What it logs while it cannot map BARs yet (dpdk/src/exports.rs, before BAR mapping).
DPDK_NO_MAPPING='mapping BARs is not implemented by pcibus yet'

# dpdk_setup: hugepages for EAL (256 MiB of 2 MiB pages, hugetlbfs on /dev/hugepages) and
# its runtime directory; skips the test without the DPDK tree in the initramfs.
dpdk_setup() {
	command -v dpdk-testpmd >/dev/null || {
		echo "skip: no dpdk-testpmd in the guest (dpdk/vm/guest-tree not run?)"
		exit 77
	}
	mkdir -p /dev/hugepages /run/dpdk
	grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts || mount -t hugetlbfs nodev /dev/hugepages ||
		fail "mount hugetlbfs"
	echo 128 >/proc/sys/vm/nr_hugepages
	n=$(cat /proc/sys/vm/nr_hugepages)
	[ "$n" -ge 64 ] || fail "only $n huge pages"
	echo "hugepages: $n x 2 MiB"
}

# dpdk_nics: the e1000e functions (8086:10d3), one per line, in address order.
dpdk_nics() {
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10d3 ] && echo "${d##*/}"
	done
	return 0
}

# dpdk_nic_pair: sets nic0 and nic1 to the profile's two e1000e NICs (fails the test
# without two) and prints them.
dpdk_nic_pair() {
	set -- $(dpdk_nics)
	[ $# -ge 2 ] || fail "expected two e1000e NICs, found: $*"
	nic0=$1
	nic1=$2
	echo "NICs: $nic0 $nic1"
}

# dpdk_to_vfio ADDR...: bind each device to vfio-pci (pcibus bind).
dpdk_to_vfio() {
	for _a in "$@"; do
		driver_is "$_a" vfio-pci && continue
		pcibus bind "$_a" vfio-pci || fail "pcibus bind $_a vfio-pci"
		driver_is "$_a" vfio-pci || fail "$_a not on vfio-pci after the bind"
	done
}

# dpdk_plugin_copy DIR: a private copy of the plugin directory with the drop-in in place of
# the stock librte_bus_pci.so.23.0 (real files: links into the directory it will shadow
# would loop), for `dpdk_in_plugin_ns DIR CMD...`.
dpdk_plugin_copy() {
	rm -rf "$1"
	cp -a "$DPDK_PMDS" "$1" || fail "copy $DPDK_PMDS"
	cp "$DPDK_DROPIN_DIR/librte_bus_pci.so.23" "$1/librte_bus_pci.so.23.0" || fail "put the drop-in in $1"
}

# dpdk_in_plugin_ns DIR CMD...: run CMD in a private mount namespace where DIR is
# bind-mounted over the plugin directory (so /usr/lib/x86_64-linux-gnu/librte_bus_pci.so.23,
# a link into it, is the drop-in too): the stock library is never loaded. It execs: run it
# in a background job or a subshell (testpmd_session and seed_start do).
dpdk_in_plugin_ns() {
	_dir=$1
	shift
	exec unshare -m sh -c 'mount --make-rprivate / 2>/dev/null; mount --bind "$0" '"$DPDK_PMDS"' && exec "$@"' "$_dir" "$@"
}

# tp_ready OUT PID: testpmd (PID) printed its prompt to OUT, or is gone.
tp_ready() {
	grep -q 'testpmd> ' "$1" || [ "$(proc_state "$2")" = Z ] || [ "$(proc_state "$2")" = gone ]
}

# testpmd_session OUT SECONDS WRAP... -- TESTPMD-ARGS...: run dpdk-testpmd -i (under the
# WRAP command, e.g. `env LD_LIBRARY_PATH=...`; `env` for none) with its stdin on a fifo,
# output to OUT; once the prompt is up: `start`, SECONDS of forwarding, `stop`,
# `show port stats all`, `quit`. Returns testpmd's status (124 if it had to be killed).
testpmd_session() {
	_out=$1
	_secs=$2
	shift 2
	_rc=0
	if tp_open "$_out" "$@"; then
		sleep 1
		tp_cmd start
		sleep "$_secs"
		# Who holds the devices while testpmd runs (the drop-in claims them).
		pcibus claims >"$_out.claims" 2>&1 || true
		tp_cmd stop
		sleep 2
		tp_cmd "show port stats all"
		sleep 2
	else
		echo "testpmd: no prompt within 180 s"
		_rc=1
	fi
	tp_close
	_r=$?
	[ $_rc = 0 ] || return $_rc
	return $_r
}

# port_stat OUT PORT FIELD: FIELD (RX-packets, RX-missed, RX-errors, RX-nombuf,
# TX-packets, TX-errors) of PORT in the last `show port stats all` in OUT.
port_stat() {
	awk -v port="$2" -v field="$3:" '
		/statistics for port/ { p = "" }
		/NIC statistics for port/ { p = $0; sub(/.*for port /, "", p); sub(/ .*/, "", p) }
		p == port { for (i = 1; i < NF; i++) if ($i == field) v = $(i + 1) }
		END { print v }' "$1"
}

# Packets a port may have sent that the other had not counted at `stop`: its RX ring and
# QEMU's queue behind a full ring.
IN_FLIGHT=1024

# dpdk_check_run LABEL OUT: the counters of a two-port flowgen run (testpmd_session's OUT);
# prints them, returns 1 (with the reason in WHY) unless each port sent at least 100
# packets, the other received them (less at most IN_FLIGHT, never more) and every error,
# missed and nombuf counter is 0.
dpdk_check_run() {
	WHY=
	for p in 0 1; do
		for f in RX-packets RX-missed RX-errors RX-nombuf TX-packets TX-errors; do
			eval "s_${p}_$(echo "$f" | tr - _)=\$(port_stat \"\$2\" $p $f)"
		done
	done
	echo "$1: port 0 TX $s_0_TX_packets RX $s_0_RX_packets (missed $s_0_RX_missed, errors $s_0_RX_errors/$s_0_TX_errors, nombuf $s_0_RX_nombuf);" \
		"port 1 TX $s_1_TX_packets RX $s_1_RX_packets (missed $s_1_RX_missed, errors $s_1_RX_errors/$s_1_TX_errors, nombuf $s_1_RX_nombuf)"
	for v in "$s_0_TX_packets" "$s_0_RX_packets" "$s_1_TX_packets" "$s_1_RX_packets"; do
		case $v in '' | *[!0-9]*) WHY="no port statistics in the output" && return 1 ;; esac
	done
	[ "$s_0_TX_packets" -ge 100 ] || { WHY="port 0 sent only $s_0_TX_packets packets"; return 1; }
	[ "$s_1_TX_packets" -ge 100 ] || { WHY="port 1 sent only $s_1_TX_packets packets"; return 1; }
	for e in "$s_0_RX_missed" "$s_0_RX_errors" "$s_0_TX_errors" "$s_0_RX_nombuf" \
		"$s_1_RX_missed" "$s_1_RX_errors" "$s_1_TX_errors" "$s_1_RX_nombuf"; do
		[ "$e" = 0 ] || { WHY="an error, missed or nombuf counter is not 0"; return 1; }
	done
	# What port A sent, port B received (less what was still in flight at stop), never more.
	for pair in "0 1" "1 0"; do
		set -- $pair
		eval "tx=\$s_$1_TX_packets rx=\$s_$2_RX_packets"
		[ "$rx" -le "$tx" ] || { WHY="port $2 received $rx > the $tx port $1 sent"; return 1; }
		[ $((tx - rx)) -le $IN_FLIGHT ] || { WHY="port $1 sent $tx, port $2 received only $rx"; return 1; }
	done
	return 0
}

# The forwarding run of dpdk_session: seconds of forwarding, testpmd's own arguments; the
# EAL arguments (DPDK_EAL) are the caller's.
DPDK_FORWARD_S=5
DPDK_APP="-i --forward-mode=flowgen --nb-cores=1 --rxq=1 --txq=1 --total-num-mbufs=8192"

# dpdk_session LABEL WRAP...: one testpmd run (EAL arguments $DPDK_EAL, --file-prefix=LABEL,
# then $DPDK_APP) under WRAP, output to /tmp/testpmd-LABEL.out (in OUT); prints its end,
# sets RUN_OK (1: dpdk_check_run passed and testpmd exited 0) and WHY.
dpdk_session() {
	label=$1
	shift
	out=/tmp/testpmd-$label.out
	t=$(now_ms)
	# shellcheck disable=SC2086
	testpmd_session "$out" $DPDK_FORWARD_S "$@" -- $DPDK_EAL --file-prefix="$label" -- $DPDK_APP
	rc=$?
	echo "--- testpmd ($label) exited $rc after $(($(now_ms) - t)) ms; its log:"
	grep -v '^testpmd> $' "$out" | grep -E -v '^ *$' | tail -n 60
	RUN_OK=0
	WHY=
	if dpdk_check_run "$label" "$out"; then
		[ $rc = 0 ] && RUN_OK=1 || WHY="testpmd exited $rc"
	fi
	[ -n "$WHY" ] || [ $RUN_OK = 1 ] || WHY="testpmd exited $rc"
}

# seed_start OUT PCI_ADDR WRAP...: start the seed application (pcibus-dpdk-seed, see
# dpdk/vm/seed.c) holding PCI_ADDR (on vfio-pci), under WRAP (`env` for none), output to
# OUT; sets SEED_PID and waits until it holds the device (fails the test otherwise).
# SEED_EAL_ARGS: more EAL arguments (e.g. `-a PF` to have the PF scanned too).
seed_start() {
	_out=$1
	_addr=$2
	shift 2
	rm -f "$_out"
	# shellcheck disable=SC2086
	"$@" pcibus-dpdk-seed -l 0 -n 1 --no-telemetry --file-prefix=seed$$ -a "$_addr" ${SEED_EAL_ARGS:-} \
		--log-level=lib.eal:debug >"$_out" 2>&1 &
	SEED_PID=$!
	_ready() { grep -q '^seed: holding' "$_out" || [ "$(proc_state $SEED_PID)" = Z ] || [ "$(proc_state $SEED_PID)" = gone ]; }
	wait_for 120 _ready
	grep -q '^seed: holding' "$_out" && return 0
	grep -E '^seed:|pcibus|PCI|EAL: (Error|Fail|Cannot)' "$_out" | tail -n 30
	return 1
}

# seed_write FILE VALUE STATUS_FILE: `echo VALUE > FILE` from another process, in the
# background; when the write returns, STATUS_FILE gets "STATUS MS". Sets REMOVE_PID.
seed_write() {
	rm -f "$3"
	(
		_t=$(now_ms)
		echo "$2" >"$1"
		echo "$? $(($(now_ms) - _t))" >"$3"
	) &
	REMOVE_PID=$!
}

# seed_remove PCI_ADDR STATUS_FILE: the seed's removal, `echo 1 > remove` of PCI_ADDR.
seed_remove() {
	seed_write "/sys/bus/pci/devices/$1/remove" 1 "$2"
}

# seed_disable_vfs PF STATUS_FILE: the SR-IOV form of the seed, `echo 0 > sriov_numvfs` of
# PF: the write holds the PF's device lock while each VF's removal waits for its holder.
seed_disable_vfs() {
	seed_write "/sys/bus/pci/devices/$1/sriov_numvfs" 0 "$2"
}

# seed_vf_setup: the SR-IOV form's start: the NVMe PF (SEED_PF) on nvme gets two VFs
# (autoprobe off), VF 1 (SEED_VF) goes to vfio-pci; SEED_EAL_ARGS allows the PF too, so the
# application's scan lists it (as one that scans every device would): with only the VF
# allowed, 22.11's scan skips the PF (rte_pci_ignore_device) and never reads its
# sriov_numvfs.
seed_vf_setup() {
	SEED_PF=$(nvme_pf) || fail "no NVMe controller"
	wait_for 20 driver_is "$SEED_PF" nvme || fail "PF $SEED_PF not on nvme at start"
	_dev=/sys/bus/pci/devices/$SEED_PF
	[ "$(cat "$_dev/sriov_numvfs")" = 0 ] || fail "VFs of $SEED_PF already enabled"
	echo 0 >"$_dev/sriov_drivers_autoprobe" || fail "sriov_drivers_autoprobe of $SEED_PF"
	echo 2 >"$_dev/sriov_numvfs" || fail "enable 2 VFs of $SEED_PF"
	SEED_VF=$(basename "$(readlink "$_dev/virtfn1")")
	[ -n "$SEED_VF" ] || fail "no virtfn1 under $SEED_PF"
	pcibus bind "$SEED_VF" vfio-pci >/dev/null || fail "pcibus bind $SEED_VF vfio-pci"
	SEED_EAL_ARGS="-a $SEED_PF"
	echo "PF $SEED_PF on nvme, VF $SEED_VF on vfio-pci"
}

# seed_expect_completion OUT STATUS_FILE WHAT LABEL: after seed_remove or seed_disable_vfs
# (WHAT names the write) with the drop-in: the application (SEED_PID, output OUT) must exit
# 0 within 30 s having had the event, a scan that returned 0 and a release that returned
# 0, and the write must complete with 0. Failures say "DROP-IN FAIL (LABEL)"; a stuck
# application gets its stacks and sysrq `w` in the log first.
seed_expect_completion() {
	_out=$1
	_status=$2
	_what=$3
	_label=$4
	_t=$(now_ms)
	_ok=1
	if wait_gone 30 "$SEED_PID"; then
		wait "$SEED_PID"
		_rc=$?
		echo "seed application exited $_rc after $(($(now_ms) - _t)) ms"
	else
		_rc=stuck
		echo "seed application still running after 30 s:"
		task_report "$SEED_PID"
		_ok=0
	fi
	_written=stuck
	if wait_gone 10 "$REMOVE_PID"; then
		read -r _written _took <"$_status"
		echo "the $_what write returned $_written after $_took ms"
	else
		echo "the $_what write is still blocked:"
		task_report "$REMOVE_PID"
	fi
	grep -E '^seed:|max_vfs|pcibus' "$_out" | tail -n 40
	if [ $_ok = 0 ]; then
		echo 8 >/proc/sys/kernel/printk
		echo w >/proc/sysrq-trigger
		sleep 1
		echo 4 >/proc/sys/kernel/printk
		fail "DROP-IN FAIL ($_label): the application did not finish (scan or release stuck); the PF stays wedged"
	fi
	grep -q '^seed: RTE_DEV_EVENT_REMOVE' "$_out" || fail "DROP-IN FAIL ($_label): no RTE_DEV_EVENT_REMOVE reached the application"
	grep -q '^seed: scan returned 0' "$_out" || fail "DROP-IN FAIL ($_label): rte_bus_scan did not return 0"
	grep -q '^seed: release returned 0' "$_out" || fail "DROP-IN FAIL ($_label): the release failed"
	[ "$_rc" = 0 ] || fail "DROP-IN FAIL ($_label): the application exited $_rc"
	[ "$_written" = 0 ] || fail "DROP-IN FAIL ($_label): the $_what write did not complete ($_written)"
}

# seed_assert_stock_deadlock OUT STATUS_FILE WHAT: after seed_remove or seed_disable_vfs
# (WHAT names the write: "remove", "sriov_numvfs=0") with Debian's library, asserts the
# deadlock the seed predicts: the removal request reached the application (output OUT),
# its scan started and has not returned after 15 s, its main thread waits in D state in
# sriov_numvfs_show, and the write (REMOVE_PID, STATUS_FILE still absent) waits in
# vfio_unregister_group_dev for the release; sysrq `w` logs every blocked task. Nothing in
# the guest can end it: the caller leaves it to /init's final sysrq reset.
seed_assert_stock_deadlock() {
	_out=$1
	_status=$2
	_what=$3
	_t=$(now_ms)
	_scanning() { grep -q '^seed: scan start' "$_out" || [ "$(proc_state $SEED_PID)" = gone ]; }
	wait_for 30 _scanning || true
	grep -q '^seed: RTE_DEV_EVENT_REMOVE' "$_out" || { grep '^seed:' "$_out"; fail "STOCK: no RTE_DEV_EVENT_REMOVE reached the application"; }
	grep -q '^seed: scan start' "$_out" || fail "STOCK: the application never started its scan"
	echo "removal request and scan start within $(($(now_ms) - _t)) ms of the $_what write; watching for 15 s"
	sleep 15
	grep '^seed:' "$_out"
	if grep -q '^seed: scan returned' "$_out"; then
		wait_gone 30 "$SEED_PID"
		fail "STOCK: the scan returned: no deadlock (did the scan skip the PF, or did the kernel not lock sriov_numvfs?)"
	fi
	_main=$(proc_state "$SEED_PID")
	_stack=$(cat "/proc/$SEED_PID/task/$SEED_PID/stack" 2>/dev/null)
	echo "application (pid $SEED_PID), after $(($(now_ms) - _t)) ms:"
	task_report "$SEED_PID"
	[ -e "$_status" ] && fail "STOCK: the $_what write returned ($(cat "$_status")) although the application holds the device"
	echo "the $_what write (pid $REMOVE_PID):"
	task_report "$REMOVE_PID"
	[ "$_main" = D ] || fail "STOCK: the scanning thread is in state $_main, not D"
	echo "$_stack" | grep -q sriov_numvfs_show || fail "STOCK: the scanning thread does not wait in sriov_numvfs_show (stack above)"
	grep -q vfio_unregister_group_dev "/proc/$REMOVE_PID/stack" ||
		fail "STOCK: the $_what write does not wait in vfio_unregister_group_dev (stack above)"
	echo 8 >/proc/sys/kernel/printk
	echo w >/proc/sysrq-trigger
	sleep 2
	echo 4 >/proc/sys/kernel/printk
	echo "STOCK DEADLOCK (as the seed predicts): the scan waits for the PF's device lock, the $_what write holding it waits for the release the scan delays; left to /init's final sysrq reset"
}

# task_report PID: state and kernel stack of each thread of PID.
task_report() {
	for _t in /proc/"$1"/task/*; do
		[ -r "$_t/stat" ] || continue
		echo "thread ${_t##*/} ($(cat "$_t/comm" 2>/dev/null)) state $(sed 's/.*) \(.\).*/\1/' "$_t/stat" 2>/dev/null)"
		[ -r "$_t/stack" ] && sed 's/^/    /' "$_t/stack"
	done
}

# tp_open OUT WRAP... -- TESTPMD-ARGS...: start dpdk-testpmd -i in the background with its
# stdin on a fifo (fd 7 of this shell) and wait for its prompt; sets TP_PID. tp_cmd sends a
# command, tp_close quits (and kills it if it does not go within 60 s).
tp_open() {
	_out=$1
	shift
	_wrap=
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		_wrap="$_wrap $1"
		shift
	done
	shift
	_fifo=/tmp/tp.in.$$
	rm -f "$_fifo"
	mkfifo "$_fifo"
	# shellcheck disable=SC2086
	$_wrap dpdk-testpmd "$@" <"$_fifo" >"$_out" 2>&1 &
	TP_PID=$!
	exec 7>"$_fifo"
	rm -f "$_fifo"
	wait_for 180 tp_ready "$_out" "$TP_PID" && grep -q 'testpmd> ' "$_out"
}
tp_cmd() {
	echo "$*" >&7
}
tp_close() {
	echo quit >&7
	exec 7>&-
	if ! wait_gone 60 "$TP_PID"; then
		kill -9 "$TP_PID" 2>/dev/null
		wait_gone 10 "$TP_PID"
		return 124
	fi
	wait "$TP_PID"
}
