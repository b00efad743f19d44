#!/bin/sh
# pcibus's NVMe driver against the kernel's, measured as the kernel is measured (issue 15
# §8): fio on /dev/nvmeXn1 with io_uring, io_uring with polled completions (--hipri on a
# poll queue), libaio and io_uring with a submission thread (sqpoll), against
# `pcibus nvme perf` (one queue, polled), pcibus with completion interrupts and pcibus
# hybrid (interrupts, but polling 50 us after each completion before sleeping), 4 KiB
# random reads at QD 1 and QD 32, in rounds that alternate the two so that TCG's drift
# hits both alike. A benchmark, not a test of speed: it fails only when a run fails or
# pcibus reports errors. Prints one `fio-table` line per run and a median table at the end.
#
#   tests/vm/run -k 6.12 -p nvme -T tests/vm/bench/nvme-fio.sh [--bench-rounds N]
#
# pcibus-host-bin: fio
# pcibus-timeout: 900
. "$PCIBUS_LIB"
need_pcibus
command -v fio >/dev/null || fail "no fio in the guest (the harness copies the host's: install fio on the host)"

rounds=$(sed -n 's/.*pcibus\.bench_rounds=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$rounds" ] || rounds=3
secs=3
pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "not bound to nvme at start"

# blockdev: waits for the controller's namespace 1 on the kernel's driver; prints it.
blockdev() {
	wait_for 20 nvme_blockdev "$pf" >/dev/null || fail "no block device of $pf on nvme"
	echo "/dev/$(nvme_blockdev "$pf")"
}

# One poll queue for --hipri: a module loaded by insmod ignores nvme.poll_queues= on the
# command line, so set the parameter and bind the controller again.
echo 1 >/sys/module/nvme/parameters/poll_queues || fail "cannot set nvme poll_queues"
echo "$pf" >/sys/bus/pci/drivers/nvme/unbind
echo "$pf" >/sys/bus/pci/drivers/nvme/bind
dev=$(blockdev)
poll=$(cat "/sys/block/${dev#/dev/}/queue/io_poll" 2>/dev/null)
echo "fio: $dev, io_poll=$poll, $(fio --version)"
[ "$poll" = 1 ] || echo "note: io_poll is not 1: the hipri row polls nothing"

out=/tmp/bench
mkdir -p $out
rc=0

# fio_run NAME QD ARGS...: one fio run; prints "iops p99_us".
fio_run() {
	_n=$1 _qd=$2
	shift 2
	fio --name="$_n" --filename="$dev" --direct=1 --rw=randread --bs=4k --iodepth="$_qd" \
		--time_based --runtime="$secs" --norandommap --randrepeat=0 --thread \
		--output-format=json "$@" >"$out/$_n-$_qd.json" 2>"$out/$_n-$_qd.err" ||
		{ echo "FAIL: fio $_n qd $_qd: $(cat "$out/$_n-$_qd.err")"; return 1; }
	_j=$out/$_n-$_qd.json
	_iops=$(sed -n 's/^ *"iops" : \([0-9.]*\),*$/\1/p' "$_j" | head -n 1)
	_p99=$(sed -n 's/^ *"99.000000" : \([0-9]*\),*$/\1/p' "$_j" | head -n 1)
	# CPU per I/O: fio's usr + sys percent of the job thread over its runtime (ms), per I/O
	# (the kernel's completion work runs in that thread or in interrupts it absorbs; an
	# sqpoll thread is not counted).
	_cpu=$(awk -F' : ' '/"usr_cpu"/ { u = $2 + 0 } /"sys_cpu"/ { s = $2 + 0 }
		/"total_ios"/ && !n { n = $2 + 0 } /"runtime"/ && !t { t = $2 + 0 }
		END { if (n) printf "%d", (u + s) / 100 * t * 1e6 / n; else print 0 }' "$_j")
	echo "${_iops%.*} $((${_p99:-0} / 1000)) $_cpu"
}

# pcibus_run NAME QD DEVARGS [PERF ARGS]: one pcibus perf run (the controller taken to vfio-pci and
# given back); prints "iops p99_us".
pcibus_run() {
	_n=$1 _qd=$2 _arg=$3
	shift 3
	pcibus nvme perf "$pf$_arg" --rw randread --bs 4k --qd "$_qd" --time "$secs" --json --restore "$@" \
		>"$out/$_n-$_qd.json" 2>"$out/$_n-$_qd.err" ||
		{ echo "FAIL: pcibus $_n qd $_qd: $(cat "$out/$_n-$_qd.err")"; return 1; }
	grep -q '"errors":0' "$out/$_n-$_qd.json" || { echo "FAIL: pcibus $_n qd $_qd had errors"; return 1; }
	_iops=$(sed 's/.*"iops":\([0-9]*\).*/\1/' "$out/$_n-$_qd.json")
	_p99=$(sed 's/.*"p99_us":\([0-9]*\).*/\1/' "$out/$_n-$_qd.json")
	_cpu=$(sed 's/.*"cpu_ns_per_io":\([0-9]*\).*/\1/' "$out/$_n-$_qd.json")
	echo "$_iops $_p99 $_cpu"
}

for r in $(seq 1 "$rounds"); do
	for qd in 1 32; do
		for row in io_uring io_uring-hipri libaio io_uring-sqpoll pcibus pcibus-irq pcibus-hybrid; do
			case $row in
			io_uring) res=$(fio_run "$row" $qd --ioengine=io_uring) ;;
			io_uring-hipri) res=$(fio_run "$row" $qd --ioengine=io_uring --hipri=1) ;;
			libaio) res=$(fio_run "$row" $qd --ioengine=libaio) ;;
			io_uring-sqpoll) res=$(fio_run "$row" $qd --ioengine=io_uring --sqthread_poll=1) ;;
			pcibus) res=$(pcibus_run "$row" $qd "") ;;
			pcibus-irq) res=$(pcibus_run "$row" $qd ",interrupts=1") ;;
			pcibus-hybrid) res=$(pcibus_run "$row" $qd ",interrupts=1" --spin-us 50) ;;
			esac
			case $row in
			pcibus*)
				# --restore gave the controller back to nvme: its block device comes back.
				wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme"
				dev=$(blockdev)
				;;
			esac
			case $res in
			FAIL*) echo "$res"; rc=1; continue ;;
			esac
			set -- $res
			echo "fio-table round=$r qd=$qd row=$row iops=$1 p99_us=$2 cpu_ns_per_io=$3 loadavg=$(cut -d' ' -f1 /proc/loadavg)"
			echo "$qd $row $1 $2 $3" >>"$out/all"
		done
	done
done

# Medians over the rounds, per depth and row.
echo "fio-summary: 4 KiB random reads, $rounds rounds of $secs s, medians of IOPS, p99 (us) and CPU per I/O (ns)"
for qd in 1 32; do
	for row in io_uring io_uring-hipri libaio io_uring-sqpoll pcibus pcibus-irq pcibus-hybrid; do
		med() { awk -v q="$qd" -v r="$row" -v c="$1" '$1 == q && $2 == r { print $c }' "$out/all" | sort -n |
			awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
		echo "fio-summary qd=$qd row=$row iops=$(med 3) p99_us=$(med 4) cpu_ns_per_io=$(med 5)"
	done
done
exit $rc
