#!/bin/sh
# Hotplug under I/O (issue 8): `pcibus nvme perf --hotplug` keeps 16 random reads in
# flight while the controller is (1) removed through sysfs and brought back by a rescan,
# three times (SPDK's sw_hotplug flow), then (2) unbound from vfio-pci by the operator (a
# removal request) and bound back. Each time the kernel's removal or unbind completes
# within a second, the load stops within a second (in-flight I/O fails fast), the process
# neither hangs nor dies, and the load resumes on the returned device.
. "$PCIBUS_LIB"
need_pcibus

export PCIBUS_CLAIM_DIR=/tmp/claims
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 20 driver_is "$pf" nvme || fail "not bound to nvme at start"

pcibus nvme perf "$pf" --rw randread --qd 16 --time 12 --hotplug --settle-ms 300 --json \
	>/tmp/hp.json 2>/tmp/hp.err &
perf=$!
wait_for 20 driver_is "$pf" vfio-pci || fail "perf never bound $pf: $(cat /tmp/hp.err)"
sleep 1
rc=0
attached() { [ "$(grep -c "attached again" /tmp/hp.err)" -ge "$1" ]; }
for i in 1 2 3; do
	t=$(now_ms)
	echo 1 >"$dev/remove" || fail "remove $i"
	took=$(($(now_ms) - t))
	echo "remove $i completed in $took ms"
	[ $took -lt 1000 ] || { echo "FAIL: remove $i took $took ms"; rc=1; }
	echo 1 >/sys/bus/pci/rescan
	wait_for 20 attached $i || fail "not attached again after rescan $i: $(cat /tmp/hp.err)"
	sleep 1
done
t=$(now_ms)
echo "$pf" >/sys/bus/pci/drivers/vfio-pci/unbind || fail "unbind"
took=$(($(now_ms) - t))
echo "unbind completed in $took ms"
[ $took -lt 1000 ] || { echo "FAIL: unbind took $took ms"; rc=1; }
echo "$pf" >/sys/bus/pci/drivers/vfio-pci/bind || fail "bind back to vfio-pci"
wait_for 20 attached 4 || fail "not attached again after the rebind: $(cat /tmp/hp.err)"
wait_gone 30 $perf || fail "perf did not end"
wait $perf
prc=$?
cat /tmp/hp.err | grep -v IOPS
cat /tmp/hp.json
[ $prc -eq 0 ] || fail "perf failed (exit $prc)"
hotplug_perf_ok /tmp/hp.json 4 removal || rc=1
pcibus bind "$pf" nvme || fail "could not give $pf back to nvme"
back_on_nvme "$pf"
exit $rc
