#!/bin/sh
# A removal that waits for another process: `pcibus-vmtest hold` keeps the PF open
# through VFIO and ignores the kernel's removal request while `remove` blocks holding
# the device lock. Meanwhile `pcibus list --read all --timeout 500` must answer within
# a second, list the PF and report its lock-taking attributes as timed out, while a
# plain `cat sriov_numvfs` hangs in D state. After the holder lets go, the removal
# completes, the cat ends and the PF is gone; a rescan brings it back.
# Named z1-* so that it runs after the tests that need the device.
. "$PCIBUS_LIB"
only_profiles sriov
need_pcibus

HOLD=8
pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"
[ "$(cat "$dev/sriov_numvfs")" = 0 ] || fail "VFs enabled: bind the PF without VFs"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"

pcibus-vmtest hold "$pf" $HOLD >/tmp/hold.out 2>&1 &
holdpid=$!
wait_for 10 grep -q '^hold: open' /tmp/hold.out || { cat /tmp/hold.out; fail "the holder did not open $pf"; }

t0=$(now_ms)
(
	echo 1 >"$dev/remove"
	echo "rc=$?" >/tmp/remove.rc
) &
rmpid=$!
wait_for 10 grep -q 'removal request 1' /tmp/hold.out || { cat /tmp/hold.out; fail "no removal request reached the holder"; }
echo "REQ reached the holder $(($(now_ms) - t0)) ms after the remove write; remover state $(proc_state $rmpid)"

# The hazard: a plain read of sriov_numvfs.
cat "$dev/sriov_numvfs" >/tmp/cat.out 2>&1 &
catpid=$!
tcat=$(now_ms)

# pcibus, from another process, reading every blocking attribute.
t1=$(now_ms)
pcibus list --json --read all --timeout 500 >/tmp/pending.json 2>/tmp/pending.err &
lpid=$!
n=0
while ! grep -q '^]' /tmp/pending.json 2>/dev/null; do
	n=$((n + 1))
	[ $n -lt 250 ] || break
	sleep 0.02
done
list_ms=$(($(now_ms) - t1))
grep -q '^]' /tmp/pending.json || fail "pcibus list wrote no complete listing within 5 s"
echo "pcibus list --read all --timeout 500: listing complete after $list_ms ms"
[ -s /tmp/pending.err ] && sed 's/^/  stderr: /' /tmp/pending.err

line=$(json_device /tmp/pending.json "$pf")
[ -n "$line" ] || { cat /tmp/pending.json; fail "$pf not listed while its removal is pending"; }
echo "  $line"
problems=$(echo "$line" | grep -o '"attribute":"[a-z_]*","kind":"[a-z_]*","errno":[0-9a-z]*,"error":"[^"]*"' | sed 's/"attribute":"\([a-z_]*\)",.*"error":"\([^"]*\)"/\1: \2/')
echo "problems of $pf during the pending removal (kernel $PCIBUS_KERNEL):"
echo "$problems" | sed 's/^/  /'
# verdict ATTR: "timed out", "returned" or the error text.
verdict() {
	p=$(echo "$problems" | grep "^$1: ")
	case $p in
	"") echo returned ;;
	*"timed out"*) echo "timed out" ;;
	*) echo "${p#*: }" ;;
	esac
}
for a in sriov_numvfs sriov_vf_total_msix driver_override uevent; do
	echo "@@PCIBUS-MEASURE kernel=$PCIBUS_KERNEL attr=$a during-pending-removal=$(verdict $a | tr ' ' _)"
done
[ "$(verdict sriov_numvfs)" = "timed out" ] || fail "sriov_numvfs: $(verdict sriov_numvfs), want timed out"
case $PCIBUS_KERNEL in
6.1) want="timed out" ;; # uevent_show and driver_override_show take the device lock
*) want=returned ;;      # 6.12: they no longer do
esac
for a in driver_override uevent; do
	[ "$(verdict $a)" = "$want" ] || fail "$a on $PCIBUS_KERNEL: $(verdict $a), want $want"
done
[ "$list_ms" -lt 1000 ] || fail "pcibus list took $list_ms ms"

# The plain cat is stuck, uninterruptibly, 2 s on.
while [ "$(now_ms)" -lt $((tcat + 2000)) ]; do sleep 0.1; done
cstate=$(proc_state $catpid)
echo "cat sriov_numvfs after $(($(now_ms) - tcat)) ms: state $cstate"
[ "$cstate" = D ] || fail "cat sriov_numvfs is in state $cstate, want D (blocked)"
[ -e "$dev" ] || fail "$pf vanished while held"

# And pcibus list, having answered, has exited (status 3: the scan ran, some reads asked
# for did not answer) although reads it started are
# stuck in the kernel: the CLI runs its work in a child that lets go of the caller's
# streams, so neither a shell waiting for it nor one reading its output to end of file
# hangs. (Threads stuck in D keep their own process alive: that is the child's, not the
# one the caller waits for.)
# Every thread must be gone (a zombie leader with threads in D is the failure).
n=20
while [ -n "$(thread_states $lpid | tr -d 'Z ')" ]; do
	n=$((n - 1))
	[ $n -gt 0 ] || fail "pcibus list answered but has not exited: thread states $(thread_states $lpid)"
	sleep 0.1
done
wait $lpid
lrc=$?
[ $lrc = 3 ] || fail "pcibus list exited $lrc, want 3 (reads that did not answer)"
list_ended=yes
echo "pcibus list: exited 3, $(($(now_ms) - t1)) ms after it started"
t2=$(now_ms)
(
	x=$(pcibus list --read all --timeout 300)
	echo "lines=$(echo "$x" | wc -l)" >/tmp/subst.out
) &
substpid=$!
wait_gone 3 $substpid || fail "\$(pcibus list --read all) did not complete while the removal is pending"
echo "\$(pcibus list --read all --timeout 300) completed in $(($(now_ms) - t2)) ms: $(cat /tmp/subst.out)"
echo "@@PCIBUS-MEASURE kernel=$PCIBUS_KERNEL pcibus-list-output-ms=$list_ms pcibus-list-process-ended-before-release=$list_ended"

# The holder lets go: the removal completes.
wait $holdpid || { cat /tmp/hold.out; fail "the holder failed"; }
trel=$(now_ms)
cat /tmp/hold.out
wait_gone 10 $rmpid || fail "remove still blocked 10 s after the holder released $pf"
rm_ms=$(($(now_ms) - trel))
wait $rmpid
echo "remove finished $rm_ms ms after the release ($(cat /tmp/remove.rc)), $(($(now_ms) - t0)) ms after it began"
grep -q 'rc=0' /tmp/remove.rc || fail "remove failed"
wait_gone 5 $catpid || fail "cat sriov_numvfs still blocked after the removal"
wait $catpid
echo "cat sriov_numvfs ended $(($(now_ms) - trel)) ms after the release: $(cat /tmp/cat.out)"

[ ! -e "$dev" ] || fail "$dev still exists"
pcibus list --json >/tmp/after.json || fail "pcibus list after the removal"
[ -z "$(json_device /tmp/after.json "$pf")" ] || fail "$pf still listed after the removal"
echo "$pf is gone from pcibus list"

t=$(now_ms)
echo 1 >/sys/bus/pci/rescan
wait_for 10 test -e "$dev" || fail "$pf did not come back on rescan"
wait_for 20 driver_is "$pf" nvme || fail "$pf not on nvme after rescan"
echo "rescan: $pf back on nvme in $(($(now_ms) - t)) ms"
