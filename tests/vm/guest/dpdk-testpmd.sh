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
# pcibus-timeout: 420
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

dpdk_nic_pair
dpdk_to_vfio "$nic0" "$nic1"

DPDK_EAL="-l 0-1 -n 1 --no-telemetry --log-level=lib.eal:debug -a $nic0 -a $nic1"

failed=

# 1. The baseline: Debian's librte_bus_pci.
dpdk_session stock env
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
dpdk_session dropin-ldpath env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
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
dpdk_session dropin-mountns dpdk_in_plugin_ns /tmp/pmds-dropin
grep -q "$DPDK_EVICTED" "$out" && { RUN_OK=0; WHY="the stock bus was loaded in the mount namespace"; }
dropin_verdict dropin-mountns
rm -rf /tmp/pmds-dropin

[ -z "$failed" ] || fail "failed:$failed"
echo "baseline and drop-in (both routes): TX of each port = RX of the other, no errors"
