#!/bin/sh
# The seed deadlock in one process (`pcibus-vmtest seed`): it holds the controller
# through VFIO, a thread writes `remove`, the REQ eventfd marks the device in the
# removal registry, and a scan reading every blocking attribute keeps away from it;
# closing the device lets the removal finish and the next scan releases it.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 test "$(pci_driver "$pf")" = nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"
t=$(now_ms)
pcibus-vmtest seed "$pf"
rc=$?
echo "seed: $(($(now_ms) - t)) ms"

# Bring the controller back for whatever runs next.
if [ ! -e "$dev" ]; then
	t=$(now_ms)
	echo 1 >/sys/bus/pci/rescan
	wait_for 10 test -e "$dev" || fail "$pf did not come back on rescan"
	echo "rescan: $pf back in $(($(now_ms) - t)) ms"
fi
[ "$(pci_driver "$pf")" = vfio-pci ] && pcibus bind "$pf" nvme
wait_for 20 test "$(pci_driver "$pf")" = nvme || fail "$pf not on nvme at the end"
[ $rc = 0 ] || fail "seed"
