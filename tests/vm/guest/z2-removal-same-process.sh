#!/bin/sh
# The seed deadlock in one process (`pcibus-vmtest seed`): it holds the controller
# through VFIO, a thread writes `remove`, the REQ eventfd marks the device in the
# removal registry, and a scan reading every blocking attribute keeps away from it;
# closing the device lets the removal finish and the next scan releases it.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"
pcibus bind "$pf" vfio-pci || fail "bind to vfio-pci"
t=$(now_ms)
pcibus-vmtest seed "$pf"
rc=$?
echo "seed: $(($(now_ms) - t)) ms"

# Bring the controller back for whatever runs next.
back_on_nvme "$pf"
[ $rc = 0 ] || fail "seed"
