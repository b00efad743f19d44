#!/bin/sh
# Issue 18, proof 3: `dpdk-testpmd --hot-plug` forwarding (flowgen) on the two e1000e NICs;
# a sysfs `remove` of port 1's device from another process while it forwards. VFIO's
# request reaches testpmd (RTE_DEV_EVENT_REMOVE), which stops the port, closes and
# detaches it: the removal completes, testpmd lives on (no deadlock). A rescan brings the
# NIC back; bound to vfio-pci again, `port attach` + `port start all` bring the port back
# and it forwards again (RX and TX on both ports). First on Debian's librte_bus_pci (the
# baseline), then on the drop-in (LD_LIBRARY_PATH route).
# pcibus-timeout: 480
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

dpdk_nic_pair
dpdk_to_vfio "$nic0" "$nic1"
eal="-l 0-1 -n 1 --no-telemetry --log-level=lib.eal:debug -a $nic0 -a $nic1"
app="-i --hot-plug --forward-mode=flowgen --nb-cores=1 --rxq=1 --txq=1 --total-num-mbufs=8192"

# nic1_back: after a removal, rescan and put the NIC back on vfio-pci.
nic1_back() {
	[ -e "/sys/bus/pci/devices/$nic1" ] || echo 1 >/sys/bus/pci/rescan
	wait_for 10 test -e "/sys/bus/pci/devices/$nic1" || return 1
	dpdk_to_vfio "$nic1"
}

# hotplug LABEL WRAP...: one run; sets WHY on failure (empty on success).
hotplug() {
	label=$1
	shift
	out=/tmp/hotplug-$label.out
	WHY=
	if ! tp_open "$out" "$@" -- $eal --file-prefix="hp-$label" -- $app; then
		tp_close
		tail -n 40 "$out"
		WHY="testpmd gave no prompt"
		return
	fi
	tp_cmd start
	sleep 3
	t=$(now_ms)
	rm -f /tmp/hotplug.rm
	(echo 1 >"/sys/bus/pci/devices/$nic1/remove"; echo "$? $(($(now_ms) - t))" >/tmp/hotplug.rm) &
	rpid=$!
	if wait_gone 30 $rpid; then
		echo "$label: remove of $nic1 returned $(cat /tmp/hotplug.rm) (status, ms)"
	else
		echo "$label: the remove write is still blocked after 30 s:"
		task_report $rpid
		task_report "$TP_PID"
		WHY="the removal did not complete (testpmd did not release $nic1)"
		echo 8 >/proc/sys/kernel/printk; echo w >/proc/sysrq-trigger; sleep 1; echo 4 >/proc/sys/kernel/printk
		return
	fi
	sleep 2
	[ "$(proc_state "$TP_PID")" != gone ] && [ "$(proc_state "$TP_PID")" != Z ] || { WHY="testpmd died at the removal"; tail -n 40 "$out"; return; }
	tp_cmd stop
	nic1_back || { WHY="$nic1 did not come back on rescan"; tp_close; return; }
	# testpmd's stdout is a file, so block-buffered: what it printed is checked at the end.
	tp_cmd "port attach $nic1"
	sleep 5
	tp_cmd "port start all"
	sleep 3
	tp_cmd start
	sleep 4
	tp_cmd stop
	sleep 2
	tp_cmd "show port stats all"
	sleep 2
	tp_close
	rc=$?
	grep -E 'detach|attach|removed|closed|Port [0-9]+:|pcibus|Error|error' "$out" | grep -v '^EAL: *$' | tail -n 30
	for p in 0 1; do
		for f in RX-packets TX-packets; do
			v=$(port_stat "$out" $p $f)
			echo "$label after re-attach: port $p $f $v"
			case $v in '' | *[!0-9]*) WHY="${WHY:-no statistics of port $p after the re-attach}" ;; 0) WHY="${WHY:-port $p $f is 0 after the re-attach}" ;; esac
		done
	done
	grep -q 'Device is detached' "$out" || WHY="${WHY:-testpmd did not detach the removed port}"
	grep -q "Port [0-9]* is attached" "$out" || WHY="${WHY:-port attach $nic1 did not attach it}"
	[ $rc = 0 ] || WHY="${WHY:-testpmd exited $rc}"
}

failed=
hotplug stock env
if [ -z "$WHY" ]; then echo "BASELINE (stock librte_bus_pci) PASS"; else echo "BASELINE FAIL (stock): $WHY"; failed="$failed baseline"; fi
nic1_back || fail "$nic1 did not come back"

hotplug dropin-ldpath env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
grep -q "$DPDK_EVICTED" "$out" || WHY="${WHY:-no line saying the stock bus was evicted}"
if [ -z "$WHY" ]; then
	echo "DROP-IN PASS (hotplug)"
elif grep -q "$DPDK_NO_MAPPING" "$out"; then
	echo "DROP-IN FAIL (hotplug): net_e1000_em's probe stops at rte_pci_map_device (BAR mapping not implemented in the drop-in yet)"
	failed="$failed dropin"
else
	echo "DROP-IN FAIL (hotplug): $WHY"
	failed="$failed dropin"
fi
nic1_back || fail "$nic1 did not come back"
[ -z "$failed" ] || fail "failed:$failed"
