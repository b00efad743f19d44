#!/bin/sh
# Both VFIO backends in one guest (issue 9), on a kernel that has iommufd (the built
# 6.12-iommufd; Debian's kernels skip): `pcibus vfio info` names the backend each time;
# DMA map/unmap cost of each backend (pcibus-vmtest dma-bench); `pcibus nvme identify`
# the same through both; `pcibus nvme perf` 4 KiB random reads at QD 1 and 32 through each,
# zero errors; and the errors that name what is missing (no vfio-dev/, no group mode, the
# group in use by the group backend). Runs in the iommufd boot only (the group boot would repeat it); prints the
# figures for BENCHMARKS.md.
. "$PCIBUS_LIB"
need_pcibus
[ -e /dev/iommu ] || { echo "no /dev/iommu: this kernel has no iommufd"; exit 77; }
only_backends iommufd

pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "not bound to nvme at start"
rc=0
# expect_error WHAT TEXT COMMAND...: COMMAND must fail with TEXT in its message.
expect_error() {
	_what=$1
	_text=$2
	shift 2
	if "$@" >/tmp/err.out 2>&1; then
		echo "FAIL: $_what: succeeded"
		rc=1
	elif grep -q "$_text" /tmp/err.out; then
		echo "$_what: $(cat /tmp/err.out)"
	else
		echo "FAIL: $_what: expected '$_text' in: $(cat /tmp/err.out)"
		rc=1
	fi
}
# The errors name what is missing: a device still on nvme has no vfio-dev/.
expect_error "iommufd, device on nvme" "no vfio-dev/ directory in sysfs: it is not bound to vfio-pci (driver: nvme)" \
	pcibus --vfio-backend iommufd vfio info "$pf"
pcibus bind "$pf" vfio-pci || fail "bind $pf to vfio-pci"
# A kernel without the group mode (CONFIG_VFIO_CONTAINER off) has no /dev/vfio/vfio: take
# the node away for a moment.
mv /dev/vfio/vfio /tmp/vfio-container
expect_error "group, no /dev/vfio/vfio" "the kernel has no VFIO group mode" \
	pcibus --vfio-backend group vfio info "$pf"
mv /tmp/vfio-container /dev/vfio/vfio
# The group open through the group backend elsewhere: iommufd cannot have the device.
PCIBUS_VFIO_BACKEND=group pcibus-vmtest hold "$pf" 3 >/tmp/hold.out 2>&1 &
holder=$!
wait_for 5 grep -q "REQ eventfd registered" /tmp/hold.out || fail "the holder did not open $pf: $(cat /tmp/hold.out)"
expect_error "iommufd while the group is open" "its IOMMU group [0-9]* is in use elsewhere" \
	pcibus --vfio-backend iommufd vfio info "$pf"
wait "$holder"
ls -l /dev/iommu /dev/vfio/ /dev/vfio/devices/ 2>&1
for b in group iommufd auto; do
	pcibus --vfio-backend $b vfio info "$pf" --json >/tmp/info-$b.json || fail "vfio info --vfio-backend $b: $(cat /tmp/info-$b.json)"
	got=$(grep -o '"backend": *"[a-z]*"' /tmp/info-$b.json | sed 's/.*"\([a-z]*\)"$/\1/')
	want=$b
	[ $b = auto ] && want=iommufd
	echo "vfio info --vfio-backend $b: backend $got, $(grep -o '"ioas": *[a-z0-9]*' /tmp/info-$b.json)"
	[ "$got" = "$want" ] || { echo "FAIL: --vfio-backend $b opened through $got"; rc=1; }
done
pcibus --vfio-backend iommufd vfio info "$pf"
pcibus-vmtest dma-bench "$pf" || { echo "FAIL: dma-bench"; rc=1; }
pcibus bind "$pf" nvme || fail "bind $pf back to nvme"
echo >"/sys/bus/pci/devices/$pf/driver_override"
wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme"

for b in group iommufd; do
	pcibus --vfio-backend $b nvme identify "$pf" --json >/tmp/id-$b.json || fail "identify through $b: $(cat /tmp/id-$b.json)"
done
# The same controller, the same answer, whichever backend mapped the buffer.
cmp /tmp/id-group.json /tmp/id-iommufd.json || { echo "FAIL: identify differs between the backends"; rc=1; }
# Twice each, alternating, so that a drift of the emulator during the run shows.
for qd in 1 32; do
	for round in 1 2; do
		for b in group iommufd; do
			f=/tmp/p-$b-$qd-$round.json
			pcibus --vfio-backend $b nvme perf "$pf" --rw randread --bs 4k --qd $qd --time 3 --json >$f || fail "perf through $b qd $qd: $(cat $f)"
			echo "perf $b qd $qd round $round: $(cat $f)"
			grep -q '"errors":0' $f || { echo "FAIL: perf through $b qd $qd had errors"; rc=1; }
		done
	done
	iops() { sed 's/.*"iops":\([0-9]*\).*/\1/' "$1"; }
	echo "qd $qd: group $(iops /tmp/p-group-$qd-1.json) $(iops /tmp/p-group-$qd-2.json) IOPS, iommufd $(iops /tmp/p-iommufd-$qd-1.json) $(iops /tmp/p-iommufd-$qd-2.json) IOPS"
done
[ "$(pci_driver "$pf")" = vfio-pci ] && pcibus bind "$pf" nvme
echo >"/sys/bus/pci/devices/$pf/driver_override"
wait_for 20 driver_is "$pf" nvme || fail "$pf not back on nvme at the end"
exit $rc
