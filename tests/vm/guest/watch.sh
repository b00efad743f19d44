#!/bin/sh
# `pcibus watch --json` on a real kernel: the NVMe controller's remove (sysfs `remove`) and
# re-add (`rescan`), its unbind from and bind to nvme, and (sriov) its VFs' add and remove
# when SR-IOV is enabled and disabled each show up as a JSON line within 100 ms of the
# sysfs write returning; SIGINT ends it with status 0.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"
out=/tmp/watch.json
# --all: the event that tells the monitor is listening is not a PCI one.
pcibus watch --json --all >"$out" 2>/tmp/watch.err &
w=$!
# Until the socket is bound, events are missed: wait for one we cause ourselves.
n=0
until grep -q '"devpath":"/devices/virtual/mem/null"' "$out"; do
	echo change >/sys/devices/virtual/mem/null/uevent
	n=$((n + 1))
	[ $n -lt 50 ] || { kill $w; fail "watch never started: $(cat /tmp/watch.err)"; }
	sleep 0.1
done

rc=0
# seen ACTION ADDR: the line for it must be there within 100 ms of now.
seen() {
	t0=$(now_ms)
	until grep -q "\"action\":\"$1\",\"address\":\"$2\"" "$out"; do
		if [ $(($(now_ms) - t0)) -gt 100 ]; then
			echo "FAIL: no $1 of $2 within 100 ms"
			rc=1
			return 1
		fi
		sleep 0.01
	done
	echo "$1 $2: seen $(($(now_ms) - t0)) ms after the write returned"
}
# mapped ACTION ADDR TEXT: the event's line says what it changed in the device map.
mapped() {
	line=$(grep "\"action\":\"$1\",\"address\":\"$2\"" "$out" | tail -1)
	echo "$line" | grep -q "\"map\":{$3" || {
		echo "FAIL: $1 of $2: map change is not {$3...}: $line"
		rc=1
	}
}

echo 1 >"$dev/remove"
seen remove "$pf"
# The device leaves the map at the first event after its directory went: the kernel sends
# `unbind` (the driver lets go as part of the removal) before `remove`.
grep "\"address\":\"$pf\"" "$out" | grep -q '"map":{"change":"removed"' || {
	echo "FAIL: no event of $pf removed it from the map"
	rc=1
}
echo 1 >/sys/bus/pci/rescan
seen add "$pf"
mapped add "$pf" '"change":"added"'
wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme after rescan"
echo "$pf" >/sys/bus/pci/drivers/nvme/unbind
seen unbind "$pf"
mapped unbind "$pf" '"change":"updated",.*"driver":null'
echo "$pf" >/sys/bus/pci/drivers/nvme/bind
seen bind "$pf"
mapped bind "$pf" '"change":"updated",.*"driver":"nvme"'
grep "\"address\":\"$pf\"" "$out" | head -6
if [ "$PCIBUS_PROFILE" = sriov ]; then
	echo 0 >"$dev/sriov_drivers_autoprobe"
	echo 2 >"$dev/sriov_numvfs" || fail "enable 2 VFs"
	for i in 0 1; do
		seen add "$(basename "$(readlink "$dev/virtfn$i")")"
	done
	vf0=$(basename "$(readlink "$dev/virtfn0")")
	echo 0 >"$dev/sriov_numvfs" || fail "disable VFs"
	seen remove "$vf0"
	echo 1 >"$dev/sriov_drivers_autoprobe"
fi

kill -INT $w
wait_gone 5 $w || fail "pcibus watch did not exit on SIGINT"
wait $w
wrc=$?
[ $wrc = 0 ] || fail "pcibus watch exited $wrc on SIGINT"
echo "$(grep -c action "$out") events printed; exited 0 on SIGINT"
back_on_nvme "$pf"
exit $rc
