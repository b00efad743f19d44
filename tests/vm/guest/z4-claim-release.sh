#!/bin/sh
# Removal awareness across processes (issue 7): a process claims the NVMe controller and
# holds it through vfio; a second process is refused the claim, naming the holder. When
# the removal comes (sysfs `remove`), the holder marks its claim "releasing" and keeps the
# device 3 s more; meanwhile `pcibus list --read all --timeout 5000` in another process
# reports the controller removal-pending at once, without waiting out its 5 s deadline.
. "$PCIBUS_LIB"
need_pcibus

export PCIBUS_CLAIM_DIR=/tmp/claims
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"

pcibus-vmtest claim-release "$pf" 3 >/tmp/holder.out 2>&1 &
holder=$!
wait_for 10 grep -q ready /tmp/holder.out || fail "holder not ready: $(cat /tmp/holder.out)"
pcibus-vmtest try-claim "$pf" || fail "a second process got the claim"
pcibus claims

echo 1 >"$dev/remove" &
wait_for 10 sh -c "pcibus claims --json | grep -q releasing" || fail "claim never marked releasing: $(cat /tmp/holder.out)"
t=$(now_ms)
pcibus list --json --read all --timeout 5000 >/tmp/list.json
lrc=$?
took=$(($(now_ms) - t))
line=$(json_device /tmp/list.json "$pf")
echo "pcibus list during the release: exit $lrc in $took ms"
echo "    $line"
rc=0
[ $took -lt 2000 ] || { echo "FAIL: the listing took $took ms: it waited for reads of a device being released"; rc=1; }
echo "$line" | grep -q '"kind":"timed_out"' && { echo "FAIL: reads of $pf timed out instead of being skipped"; rc=1; }
echo "$line" | grep -q '"kind":"removal_pending"' || { echo "FAIL: $pf not reported removal pending"; rc=1; }
echo "$line" | grep -q "\"removal_reasons\":\\[\"being released by PID $holder " || { echo "FAIL: $pf not reported as released by PID $holder"; rc=1; }

wait_gone 15 $holder || fail "holder did not exit"
cat /tmp/holder.out
wait_for 10 test ! -e "$dev" || fail "removal did not complete after the release"
echo "removal completed"
back_on_nvme "$pf"
exit $rc
