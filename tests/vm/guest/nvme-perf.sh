#!/bin/sh
# `pcibus nvme perf` beside the kernel's nvme driver on the same controller, same guest
# (issue 8): 4 KiB random reads at QD 1 and QD 32 for 3 s each through the kernel
# (/dev/nvme*n1, O_DIRECT, one thread per queue slot) and through pcibus (one queue, polled,
# batched doorbells), plus pcibus at QD 32 with shadow doorbells off, pcibus with MSI-X
# completion interrupts (queues sleep instead of polling) at QD 1 and 32. Every pcibus run
# must end with zero errors; the figures are printed, never judged (speed is measured by
# tests/vm/bench/nvme-fio.sh against fio, on a quiet host).
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "not bound to nvme at start"
wait_for 20 sh -c "ls /sys/bus/pci/devices/$pf/nvme/ >/dev/null 2>&1" || fail "no nvme controller device"
ctrl=$(ls "/sys/bus/pci/devices/$pf/nvme/" | head -1)
wait_for 20 test -b "/dev/${ctrl}n1" || fail "no /dev/${ctrl}n1"
rc=0
for qd in 1 32; do
	pcibus-vmtest kernel-perf "/dev/${ctrl}n1" $qd 3 >/tmp/k$qd.json || fail "kernel perf qd $qd"
	echo "kernel qd $qd: $(cat /tmp/k$qd.json)"
done
for qd in 1 32; do
	pcibus nvme perf "$pf" --rw randread --bs 4k --qd $qd --time 3 --json >/tmp/p$qd.json || fail "pcibus perf qd $qd: $(cat /tmp/p$qd.json)"
	echo "pcibus qd $qd: $(cat /tmp/p$qd.json)"
	grep -q '"errors":0' /tmp/p$qd.json || { echo "FAIL: pcibus perf qd $qd had errors"; rc=1; }
	k=$(sed 's/.*"iops":\([0-9]*\).*/\1/' /tmp/k$qd.json)
	p=$(sed 's/.*"iops":\([0-9]*\).*/\1/' /tmp/p$qd.json)
	echo "qd $qd: pcibus $p IOPS, kernel $k IOPS"
	# A figure, not a verdict (a busy host moves it): tests/vm/bench/nvme-fio.sh measures.
	[ "$p" -ge "$k" ] || echo "note: pcibus slower than the kernel's synchronous reads at qd $qd this time"
done
pcibus nvme perf "$pf,shadow_doorbells=0" --rw randread --bs 4k --qd 32 --time 3 --json >/tmp/ps.json || fail "pcibus perf without shadow doorbells"
echo "pcibus qd 32, shadow doorbells off: $(cat /tmp/ps.json)"
grep -q '"errors":0' /tmp/ps.json || { echo "FAIL: pcibus perf without shadow doorbells had errors"; rc=1; }
for qd in 1 32; do
	pcibus nvme perf "$pf,interrupts=1" --rw randread --bs 4k --qd $qd --time 3 --json >/tmp/pi$qd.json || fail "pcibus perf with interrupts qd $qd: $(cat /tmp/pi$qd.json)"
	echo "pcibus qd $qd, MSI-X interrupts: $(cat /tmp/pi$qd.json)"
	grep -q '"errors":0' /tmp/pi$qd.json || { echo "FAIL: pcibus perf with interrupts qd $qd had errors"; rc=1; }
done
# Mixed reads and writes on two queues, with the latency histogram as CSV: the totals (the
# last "errors"/"ios" keys: per_queue comes first) and a line per queue.
total() { sed "s/.*\"$1\":\([0-9]*\).*/\1/" "$2"; }
pcibus nvme perf "$pf" --rw randrw --rwmixread 70 --bs 4k --qd 16 --time 2s --queues 2 --histogram /tmp/h.csv --json >/tmp/pm.json || fail "pcibus randrw: $(cat /tmp/pm.json)"
echo "pcibus randrw 70% reads qd 16 x 2 queues: $(cat /tmp/pm.json)"
[ "$(total errors /tmp/pm.json)" = 0 ] || { echo "FAIL: pcibus randrw had errors"; rc=1; }
[ "$(grep -o '"queue":' /tmp/pm.json | wc -l)" = 2 ] || { echo "FAIL: randrw: not one per_queue entry per queue"; rc=1; }
for k in min_us stdev_us p90_us p99_9_us p99_99_us reads writes; do
	grep -q "\"$k\":" /tmp/pm.json || { echo "FAIL: randrw: no $k"; rc=1; }
done
[ "$(total reads /tmp/pm.json)" -gt 0 ] && [ "$(total writes /tmp/pm.json)" -gt 0 ] || { echo "FAIL: randrw did not mix"; rc=1; }
[ "$(head -1 /tmp/h.csv)" = "low_ns,high_ns,count" ] || { echo "FAIL: histogram CSV header: $(head -1 /tmp/h.csv)"; rc=1; }
[ "$(tail -n +2 /tmp/h.csv | awk -F, '{ n += $3 } END { print n }')" = "$(total ios /tmp/pm.json)" ] || { echo "FAIL: histogram counts do not add up to the I/Os"; rc=1; }
pcibus nvme perf "$pf" --rw randwrite --bs 4k --qd 32 --time 2 --queues 2 --json --restore >/tmp/pw.json || fail "pcibus randwrite"
echo "pcibus randwrite qd 32 x 2 queues: $(cat /tmp/pw.json)"
[ "$(total errors /tmp/pw.json)" = 0 ] || { echo "FAIL: pcibus randwrite had errors"; rc=1; }
wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme"
exit $rc
