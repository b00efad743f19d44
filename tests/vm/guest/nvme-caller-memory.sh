#!/bin/sh
# NVMe I/O into the application's own memory on a real controller (issue 15 §7, the
# `spdk_mem_register` case): pages the test program allocates itself are registered with
# the controller (Controller::register_buffer: mapped into the VFIO container), a write
# goes out of their first half and a read comes back into their second, and the pages
# come back to the program unregistered, holding what the controller read.
. "$PCIBUS_LIB"
only_profiles nvme
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
on_vfio_pci "$pf" pcibus-vmtest nvme-caller-memory "$pf" || fail "nvme-caller-memory"
echo "ok"
