#!/bin/sh
# The in-tree NVMe driver on QEMU's controller (issue 8): `pcibus nvme identify` agrees with
# what the kernel's nvme driver reports for the same device (model, serial, firmware,
# namespace size); data the kernel wrote reads back identically through pcibus, and data
# pcibus wrote (2 MiB: split by MDTS into 512 KiB commands, with PRP lists) reads back
# identically through the kernel; `--restore` gives the controller back to nvme.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "not bound to nvme at start"
wait_for 20 sh -c "ls /sys/bus/pci/devices/$pf/nvme/ >/dev/null 2>&1" || fail "no nvme controller device"
ctrl=$(ls "/sys/bus/pci/devices/$pf/nvme/" | head -1)
wait_for 20 test -b "/dev/${ctrl}n1" || fail "no /dev/${ctrl}n1"
trim() { sed 's/ *$//'; }
model=$(trim <"/sys/class/nvme/$ctrl/model")
serial=$(trim <"/sys/class/nvme/$ctrl/serial")
fw=$(trim <"/sys/class/nvme/$ctrl/firmware_rev")
sectors=$(cat "/sys/block/${ctrl}n1/size")
bytes=$((sectors * 512))
echo "kernel: $ctrl model '$model' serial '$serial' firmware '$fw' namespace $bytes bytes"

# The kernel writes 8 KiB at byte 64 KiB.
head -c 8192 /dev/urandom >/tmp/k.bin
dd if=/tmp/k.bin of="/dev/${ctrl}n1" bs=8192 seek=8 conv=fsync 2>/dev/null || fail "kernel write"
sync

pcibus nvme identify "$pf" --json >/tmp/id.json || fail "identify: $(cat /tmp/id.json)"
pcibus nvme identify "$pf" || fail "identify (text)"
[ "$(pci_driver "$pf")" = vfio-pci ] || fail "identify did not leave $pf on vfio-pci (no --restore)"
rc=0
check() { grep -q "\"$1\": $2" /tmp/id.json || { echo "FAIL: identify $1 is not $2: $(grep "\"$1\"" /tmp/id.json)"; rc=1; }; }
# nvme-cli's id-ctrl names (mn, sn, fr); the namespace's bytes are under "pcibus".
check mn "\"$model\""
check sn "\"$serial\""
check fr "\"$fw\""
check bytes "$bytes"

bs=$(grep '"block_size"' /tmp/id.json | head -1 | tr -dc 0-9)
echo "block size $bs"
pcibus nvme read "$pf" --lba $((65536 / bs)) --blocks $((8192 / bs)) -o /tmp/k.read || fail "pcibus read"
cmp /tmp/k.bin /tmp/k.read || { echo "FAIL: pcibus read something else than the kernel wrote"; rc=1; }

head -c 2097152 /dev/urandom >/tmp/p.bin
pcibus nvme write "$pf" --lba $((1048576 / bs)) -i /tmp/p.bin --restore || fail "pcibus write"
wait_for 20 driver_is "$pf" nvme || fail "--restore did not give $pf back to nvme"
wait_for 20 sh -c "ls /sys/bus/pci/devices/$pf/nvme/ >/dev/null 2>&1" || fail "no nvme controller device after restore"
ctrl=$(ls "/sys/bus/pci/devices/$pf/nvme/" | head -1)
wait_for 20 test -b "/dev/${ctrl}n1" || fail "no /dev/${ctrl}n1 after restore"
dd if="/dev/${ctrl}n1" of=/tmp/p.read bs=1048576 skip=1 count=2 2>/dev/null || fail "kernel read"
cmp /tmp/p.bin /tmp/p.read || { echo "FAIL: the kernel read something else than pcibus wrote"; rc=1; }
echo "data checks done"
exit $rc
