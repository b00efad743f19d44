#!/bin/sh
# The hotplug monitor on a real kernel (`pcibus-uevent`, tests/vm/tools/uevent_dump.rs): while
# it listens, the NVMe controller is removed through sysfs and rescanned, unbound from and
# bound to nvme, and (sriov) its 2 VFs enabled and disabled; each event must arrive within
# 100 ms with the right PCI_SLOT_NAME. It leaves the controller on nvme.
. "$PCIBUS_LIB"
command -v pcibus-uevent >/dev/null || { echo "skip: pcibus-uevent is not installed (tests/vm/run --no-binaries?)"; exit 77; }
pf=$(nvme_pf) || fail "no NVMe controller"
pcibus-uevent
rc=$?
back_on_nvme "$pf"
exit $rc
