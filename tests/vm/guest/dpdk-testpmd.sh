#!/bin/sh
# Issue 18, proof 2: Debian's dpdk-testpmd drives two e1000e NICs (82574L, net_e1000_em)
# joined by one QEMU hub, first on Debian's librte_bus_pci (the baseline), then on the
# drop-in (LD_LIBRARY_PATH route: the stock bus, loaded as a plugin too, must be evicted),
# then on the drop-in alone (a private plugin directory bind-mounted in a mount namespace:
# the stock library never loaded), all in one boot. Each run forwards for a few seconds in
# `flowgen` mode (each port transmits generated packets and drops what it receives, i.e.
# txonly plus an RX poll) and then reads `show port stats all`: port 0's TX-packets must
# equal port 1's RX-packets and the other way round (within what was in flight at `stop`),
# with no RX/TX errors, no missed packets and no mbuf shortage.
#
# Until the drop-in maps BARs (rte_pci_map_device), net_e1000_em's probe fails on it: the
# drop-in runs then FAIL with "DROP-IN FAIL ... rte_pci_map_device" after the baseline.
# pcibus-timeout: 420
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

FORWARD_S=5
# Packets a port may have sent that the other had not counted at `stop`: its RX ring and
# QEMU's queue behind a full ring.
IN_FLIGHT=1024

set -- $(dpdk_nics)
[ $# -ge 2 ] || fail "expected two e1000e NICs, found: $*"
nic0=$1
nic1=$2
echo "NICs: $nic0 $nic1"
dpdk_to_vfio "$nic0" "$nic1"

eal="-l 0-1 -n 1 --no-telemetry --log-level=lib.eal:debug -a $nic0 -a $nic1"
app="-i --forward-mode=flowgen --nb-cores=1 --rxq=1 --txq=1 --total-num-mbufs=8192"

# check_run LABEL OUT: the counters of one run; prints them, returns 1 (with the reason
# in WHY) if they do not match.
check_run() {
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

# session LABEL WRAP...: one testpmd run; prints its end, sets RUN_OK and WHY.
session() {
	label=$1
	shift
	out=/tmp/testpmd-$label.out
	t=$(now_ms)
	testpmd_session "$out" $FORWARD_S "$@" -- $eal --file-prefix="$label" -- $app
	rc=$?
	echo "--- testpmd ($label) exited $rc after $(($(now_ms) - t)) ms; its log:"
	grep -v '^testpmd> $' "$out" | grep -E -v '^ *$' | tail -n 60
	RUN_OK=0
	WHY=
	if check_run "$label" "$out"; then
		[ $rc = 0 ] && RUN_OK=1 || WHY="testpmd exited $rc"
	fi
	[ -n "$WHY" ] || [ $RUN_OK = 1 ] || WHY="testpmd exited $rc"
}

failed=

# 1. The baseline: Debian's librte_bus_pci.
session stock env
if [ $RUN_OK = 1 ]; then
	grep -q 'PCI (pcibus)' "$out" && fail "BASELINE: the pcibus drop-in answered in the stock run"
	echo "BASELINE (stock librte_bus_pci) PASS"
else
	echo "BASELINE FAIL (stock librte_bus_pci): $WHY"
	failed="$failed baseline"
fi

# dropin_verdict LABEL: a drop-in run's result line. The drop-in claims the devices it
# maps (pcibus's claims directory, SPDK's lock files): `pcibus claims` during the run
# names both NICs, held by testpmd.
dropin_verdict() {
	if [ $RUN_OK = 1 ]; then
		for n in "$nic0" "$nic1"; do
			grep "$n" "$out.claims" | grep -q testpmd || {
				RUN_OK=0
				WHY="$n not claimed by testpmd during the run: $(cat "$out.claims")"
			}
		done
	fi
	if [ $RUN_OK = 1 ]; then
		echo "DROP-IN PASS ($1)"
		return 0
	fi
	if grep -q "$DPDK_NO_MAPPING" "$out"; then
		echo "DROP-IN FAIL ($1): net_e1000_em's probe stops at rte_pci_map_device (BAR mapping not implemented in the drop-in yet): $(grep -m1 "$DPDK_NO_MAPPING" "$out")"
	else
		echo "DROP-IN FAIL ($1): $WHY"
	fi
	failed="$failed $1"
}

# 2. The drop-in first on the library path; the stock bus gets loaded as a plugin too.
session dropin-ldpath env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
if grep -q "$DPDK_EVICTED" "$out"; then
	echo "drop-in (LD_LIBRARY_PATH): the stock bus was evicted: $(grep -m1 "$DPDK_EVICTED" "$out")"
else
	RUN_OK=0
	WHY="no line saying the stock bus was evicted (\"$DPDK_EVICTED\"): is the drop-in loaded?"
fi
[ "$(grep -c 'Bus pci wants IOVA' "$out")" -le 1 ] || { RUN_OK=0; WHY="two pci buses chose an IOVA mode"; }
dropin_verdict dropin-ldpath

# 3. The drop-in alone: a private plugin directory over the real one, in a mount namespace.
dpdk_plugin_copy /tmp/pmds-dropin
session dropin-mountns dpdk_in_plugin_ns /tmp/pmds-dropin
grep -q "$DPDK_EVICTED" "$out" && { RUN_OK=0; WHY="the stock bus was loaded in the mount namespace"; }
dropin_verdict dropin-mountns
rm -rf /tmp/pmds-dropin

[ -z "$failed" ] || fail "failed:$failed"
echo "baseline and drop-in (both routes): TX of each port = RX of the other, no errors"
