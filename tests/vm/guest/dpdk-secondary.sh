#!/bin/sh
# Issue 18, DPDK secondary processes: a primary and a secondary of one EAL instance
# (pcibus-dpdk-mp, dpdk/vm/mp.c, the same --file-prefix) on the two e1000e NICs
# (net_e1000_em) joined by one QEMU hub. The primary sets both ports up and waits; the
# secondary probes them (its bus maps the BARs at the primary's addresses, since the
# PMD's queues and register pointers are in EAL's shared memory), writes a value into an
# unused receive-address register of port 0 (RAL[15]), sends 256 frames of its own ether
# type on port 0's queue, receives them on port 1's queue, reads the statistics and cleans
# up (unmapping only its own view); the primary then reads RAL[15] through its own
# mapping, sends and receives 256 frames itself and exits. (e1000e has one queue per port
# in DPDK, so dpdk-testpmd's --num-procs split does not apply; hence the program.)
#
# Asserted for each good pair: both exit 0; each port's BAR0 address is the same in both
# processes; the secondary received its 256 frames and read back its RAL[15] value; after
# its exit Bus Master is still set on both NICs (sysfs config); the primary reads that
# value and then receives its own 256 frames; port 1's ipackets and port 0's opackets
# count at least the 512 frames. Pairs, in one boot:
#   1. stock + stock (Debian's library, the baseline);
#   2. drop-in + drop-in by LD_LIBRARY_PATH (both evict the stock bus);
#   3. drop-in + drop-in alone (the private plugin directory in a mount namespace); in 2
#      and 3, after the secondary has gone, `pcibus claims` shows both NICs still claimed
#      (active) by the primary's pid;
#   4. stock primary + drop-in secondary: the secondary probes no port (exit 3) and says
#      the primary recorded no mapping for the drop-in; the primary is unaffected;
#   5. drop-in primary (mount namespace) + stock secondary: the stock secondary gets
#      nothing to map (its EAL finds no VFIO_RESOURCE_LIST: exit 2, or no port: exit 3);
#      the primary is unaffected;
#   6. drop-in primary by LD_LIBRARY_PATH (Debian's library loaded too, evicted) + stock
#      secondary: the stock lists exist but are empty, the stock secondary finds no entry
#      for the NICs ("cannot find TAILQ entry") and probes no port (exit 3); the primary is
#      unaffected.
# Then, when the initramfs has uio_pci_generic (the dpdk profile's PROFILE_MODULES), the
# NICs move to it and pairs 1 to 3 run again through UIO (--iova-mode=pa): the drop-in's
# secondary maps the same resourceN files at the primary's addresses. For Debian's
# library only the secondary's part is asserted: its secondary opens /dev/uioN, and
# uio_pci_generic clears Bus Master when that fd is closed, so the primary's DMA stops at
# the secondary's exit (reported; the drop-in's secondary does not open it). Without the
# driver that part says "UIO pairs skipped" and the test stands on the VFIO pairs. The
# NICs end on vfio-pci.
# pcibus-timeout: 600
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

FRAMES=256
RAL_VALUE=0x5ec0dab1
# More EAL arguments for both processes (the UIO pairs: --iova-mode=pa).
EXTRA_EAL=

dpdk_nic_pair
dpdk_to_vfio "$nic0" "$nic1"
dpdk_plugin_copy /tmp/pmds-dropin

# mp_start OUT LCORE ROLE DIR PREFIX WRAP...: pcibus-dpdk-mp in the background under WRAP
# (`env ...` or `dpdk_in_plugin_ns DIR`); sets MP_PID.
mp_start() {
	_o=$1 _l=$2 _r=$3 _d=$4 _p=$5
	shift 5
	(
		# shellcheck disable=SC2086
		"$@" pcibus-dpdk-mp -l "$_l" -n 1 --no-telemetry --log-level=lib.eal:debug $EXTRA_EAL \
			--file-prefix="$_p" -a "$nic0" -a "$nic1" --proc-type="$_r" -- "$_r" "$_d"
	) >"$_o" 2>&1 &
	MP_PID=$!
}

# mp_end PID SECONDS: waits for PID (killed after SECONDS); its status, 124 if killed.
mp_end() {
	if ! wait_gone "$2" "$1"; then
		kill -9 "$1" 2>/dev/null
		wait_gone 10 "$1"
		return 124
	fi
	wait "$1"
}

primary_up() { [ -e "$1/primary-ready" ] || [ "$(proc_state "$2")" = Z ] || [ "$(proc_state "$2")" = gone ]; }

# pair LABEL PRIMARY-WRAP -- SECONDARY-WRAP: one primary/secondary run; sets P_OUT,
# S_OUT, P_RC, S_RC, CLAIMS (`pcibus claims` after the secondary ended), P_PID; prints
# the mp lines of both.
pair() {
	label=$1
	shift
	pw=
	while [ "$1" != -- ]; do
		pw="$pw $1"
		shift
	done
	shift
	dir=/tmp/mp-$label
	rm -rf "$dir"
	mkdir -p "$dir"
	P_OUT=$dir/primary.out S_OUT=$dir/secondary.out CLAIMS=$dir/claims
	# shellcheck disable=SC2086
	mp_start "$P_OUT" 0 primary "$dir" "mp-$label" $pw
	P_PID=$MP_PID
	wait_for 120 primary_up "$dir" "$P_PID"
	if [ -e "$dir/primary-ready" ]; then
		mp_start "$S_OUT" 1 secondary "$dir" "mp-$label" "$@"
		mp_end "$MP_PID" 120
		S_RC=$?
	else
		echo "$label: the primary never got ready"
		: >"$S_OUT"
		S_RC=-
	fi
	pcibus claims >"$CLAIMS" 2>&1 || true
	BM_AFTER=$(bus_master "$nic0")$(bus_master "$nic1")
	touch "$dir/secondary-done"
	mp_end "$P_PID" 120
	P_RC=$?
	echo "--- $label: primary exited $P_RC, secondary exited $S_RC"
	grep -h '^mp:' "$P_OUT" "$S_OUT"
	echo "--- $label: after the secondary, Bus Master of the NICs: $BM_AFTER; claims:"
	cat "$CLAIMS"
}

# bus_master ADDR: 1 if Bus Master is set in ADDR's Command register, else 0.
bus_master() {
	_b=$(od -A n -t u1 -j 4 -N 1 "/sys/bus/pci/devices/$1/config" | tr -d ' ')
	echo $(((_b >> 2) & 1))
}

# show_log OUT: the end of a process's log (on failure).
show_log() {
	echo "--- $1:"
	grep -E -v '^ *$' "$1" | tail -n 40
}

# mp_value OUT PATTERN FIELD-AFTER: the word after FIELD-AFTER on the first line matching
# PATTERN.
mp_value() {
	grep -m1 -E "$2" "$1" | awk -v k="$3" '{ for (i = 1; i < NF; i++) if ($i == k) { print $(i + 1); exit } }'
}

# primary_alone: the primary's own traffic and exit (every pair): sets WHY on failure.
primary_alone() {
	[ "$P_RC" = 0 ] || { WHY="the primary exited $P_RC"; return 1; }
	grep -q "^mp: primary sent $FRAMES received $FRAMES\$" "$P_OUT" ||
		{ WHY="the primary did not receive its $FRAMES frames"; return 1; }
	return 0
}

# good_pair: the assertions of a pair that must work; sets WHY on failure.
good_pair() {
	good_secondary || return 1
	[ "$BM_AFTER" = 11 ] || { WHY="Bus Master of the NICs after the secondary: $BM_AFTER, not 11"; return 1; }
	primary_alone || return 1
	grep -q "^mp: primary reads RAL15 $RAL_VALUE after the secondary\$" "$P_OUT" ||
		{ WHY="the primary does not see the secondary's RAL15 value"; return 1; }
	op=$(mp_value "$P_OUT" "^mp: primary stats" opackets)
	ip=$(mp_value "$P_OUT" "^mp: primary stats" ipackets)
	case "$op$ip" in '' | *[!0-9]*) WHY="no statistics from the primary"; return 1 ;; esac
	[ "$op" -ge $((2 * FRAMES)) ] && [ "$ip" -ge $((2 * FRAMES)) ] ||
		{ WHY="port 0 sent $op, port 1 received $ip: fewer than $((2 * FRAMES))"; return 1; }
	return 0
}

# good_secondary: the secondary's part of a pair that must work; sets WHY on failure.
good_secondary() {
	WHY=
	[ "$S_RC" = 0 ] || { WHY="the secondary exited $S_RC"; return 1; }
	for p in 0 1; do
		a=$(mp_value "$P_OUT" "^mp: primary port $p " bar0)
		b=$(mp_value "$S_OUT" "^mp: secondary port $p " bar0)
		case $a in '' | '(nil)' | 0x0) WHY="port $p: no BAR0 in the primary ($a)"; return 1 ;; esac
		[ "$a" = "$b" ] || { WHY="port $p: BAR0 at $a in the primary, $b in the secondary"; return 1; }
	done
	grep -q "^mp: secondary wrote RAL15 $RAL_VALUE, reads back $RAL_VALUE\$" "$S_OUT" ||
		{ WHY="the secondary did not read back its RAL15 value"; return 1; }
	grep -q "^mp: secondary sent $FRAMES received $FRAMES\$" "$S_OUT" ||
		{ WHY="the secondary did not receive its $FRAMES frames"; return 1; }
	return 0
}

# dropin_claims: both NICs claimed, active, by the primary after the secondary's exit.
dropin_claims() {
	for n in "$nic0" "$nic1"; do
		grep "^$n " "$CLAIMS" | grep -w "$P_PID" | grep -q active ||
			{ WHY="$n not claimed (active) by the primary (pid $P_PID) after the secondary"; return 1; }
	done
	return 0
}

failed=
verdict() {
	if [ "$1" = 0 ]; then
		echo "$2 PASS ($3)"
	else
		echo "$2 FAIL ($3): $WHY"
		show_log "$P_OUT"
		show_log "$S_OUT"
		failed="$failed $3"
	fi
}

# 1. The baseline: Debian's library in both.
pair stock env -- env
r=0
good_pair || r=1
[ $r = 1 ] || ! grep -q 'PCI (pcibus)' "$P_OUT" "$S_OUT" || { r=1; WHY="the drop-in answered in the stock run"; }
verdict $r BASELINE stock

# 2. The drop-in in both by LD_LIBRARY_PATH (Debian's library loaded as a plugin too).
pair dropin-ldpath env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR -- env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
r=0
good_pair || r=1
[ $r = 1 ] || dropin_claims || r=1
for f in "$P_OUT" "$S_OUT"; do
	[ $r = 1 ] || grep -q "$DPDK_EVICTED" "$f" || { r=1; WHY="$f: the stock bus was not evicted"; }
done
verdict $r DROP-IN dropin-ldpath

# 3. The drop-in alone in both (mount namespaces over the plugin directory).
pair dropin-mountns dpdk_in_plugin_ns /tmp/pmds-dropin -- dpdk_in_plugin_ns /tmp/pmds-dropin
r=0
good_pair || r=1
[ $r = 1 ] || dropin_claims || r=1
[ $r = 1 ] || ! grep -q "$DPDK_EVICTED" "$P_OUT" "$S_OUT" || { r=1; WHY="the stock bus was loaded in a namespace"; }
verdict $r DROP-IN dropin-mountns

# 4. Stock primary, drop-in secondary: the secondary maps nothing and says why.
pair mixed-stock-primary env -- env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
r=0
WHY=
primary_alone || r=1
[ $r = 1 ] || [ "$S_RC" = 3 ] || { r=1; WHY="the secondary exited $S_RC, not 3 (no port)"; }
[ $r = 1 ] || grep -q 'in a secondary process: the primary process recorded no mapping' "$S_OUT" ||
	{ r=1; WHY="no drop-in line saying the primary recorded no mapping"; }
[ $r = 1 ] || grep -q "^mp: primary reads RAL15 0 after the secondary\$" "$P_OUT" ||
	grep -q "^mp: primary reads RAL15 0x0 after the secondary\$" "$P_OUT" || { r=1; WHY="RAL15 changed"; }
[ $r = 1 ] || [ "$BM_AFTER" = 11 ] || { r=1; WHY="Bus Master after the secondary: $BM_AFTER"; }
[ $r = 1 ] || echo "mixed (stock primary): $(grep -m1 'in a secondary process' "$S_OUT")"
verdict $r MIXED stock-primary

# 5. Drop-in primary (alone), stock secondary: the secondary maps nothing.
pair mixed-dropin-primary dpdk_in_plugin_ns /tmp/pmds-dropin -- env
r=0
WHY=
primary_alone || r=1
case $S_RC in 2 | 3) ;; *) [ $r = 1 ] || { r=1; WHY="the stock secondary exited $S_RC, not 2 or 3"; } ;; esac
[ $r = 1 ] || ! grep -q '^mp: secondary port' "$S_OUT" || { r=1; WHY="the stock secondary has ports"; }
[ $r = 1 ] || grep -q "^mp: primary reads RAL15 0 after the secondary\$" "$P_OUT" ||
	grep -q "^mp: primary reads RAL15 0x0 after the secondary\$" "$P_OUT" || { r=1; WHY="RAL15 changed"; }
[ $r = 1 ] || [ "$BM_AFTER" = 11 ] || { r=1; WHY="Bus Master after the secondary: $BM_AFTER"; }
[ $r = 1 ] || echo "mixed (drop-in primary): stock secondary: $(grep -m1 -E 'tailq|TAILQ|Cannot|cannot' "$S_OUT")"
verdict $r MIXED dropin-primary

# 6. Drop-in primary with Debian's library loaded too (LD_LIBRARY_PATH), stock secondary.
pair mixed-ldpath-primary env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR -- env
r=0
WHY=
primary_alone || r=1
[ $r = 1 ] || [ "$S_RC" = 3 ] || { r=1; WHY="the stock secondary exited $S_RC, not 3 (no port)"; }
[ $r = 1 ] || grep -q 'cannot find TAILQ entry' "$S_OUT" || { r=1; WHY="no stock line saying it found no entry"; }
[ $r = 1 ] || [ "$BM_AFTER" = 11 ] || { r=1; WHY="Bus Master after the secondary: $BM_AFTER"; }
[ $r = 1 ] || echo "mixed (drop-in primary, LD_LIBRARY_PATH): stock secondary: $(grep -m1 'cannot find TAILQ entry' "$S_OUT")"
verdict $r MIXED ldpath-primary

# 7. The same through UIO, when the initramfs has uio_pci_generic.
uio_pairs=skipped
if [ -d /sys/bus/pci/drivers/uio_pci_generic ] || modprobe uio_pci_generic 2>/dev/null; then
	uio_ok=1
	for n in "$nic0" "$nic1"; do
		pcibus bind "$n" uio_pci_generic && driver_is "$n" uio_pci_generic || uio_ok=0
	done
	if [ $uio_ok = 1 ]; then
		uio_pairs=run
		EXTRA_EAL=--iova-mode=pa
		# Debian's 22.11 opens /dev/uioN in the secondary too, and uio_pci_generic clears Bus
		# Master when it is closed: after the secondary's exit the primary's DMA stops.
		# Only the secondary's part is asserted; the primary's fate is reported.
		pair uio-stock env -- env
		r=0
		good_secondary || r=1
		verdict $r BASELINE uio-stock
		echo "BASELINE (uio-stock): after the secondary's exit, Bus Master $BM_AFTER; $(grep -m1 '^mp: primary sent' "$P_OUT")"
		pair uio-dropin-ldpath env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR -- env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
		r=0
		good_pair || r=1
		[ $r = 1 ] || dropin_claims || r=1
		[ $r = 1 ] || grep -q "mapped through UIO" "$P_OUT" || { r=1; WHY="the primary's drop-in did not map through UIO"; }
		verdict $r DROP-IN uio-dropin-ldpath
		pair uio-dropin-mountns dpdk_in_plugin_ns /tmp/pmds-dropin -- dpdk_in_plugin_ns /tmp/pmds-dropin
		r=0
		good_pair || r=1
		[ $r = 1 ] || dropin_claims || r=1
		verdict $r DROP-IN uio-dropin-mountns
		EXTRA_EAL=
	else
		echo "UIO: cannot bind the NICs to uio_pci_generic"
		failed="$failed uio-bind"
	fi
	dpdk_to_vfio "$nic0" "$nic1"
else
	echo "UIO pairs skipped: no uio_pci_generic driver in this initramfs"
fi

rm -rf /tmp/pmds-dropin
[ -z "$failed" ] || fail "failed:$failed"
echo "secondary processes (VFIO; UIO $uio_pairs): stock, drop-in (both routes) share the BARs at one address; mixed pairs fail cleanly"
