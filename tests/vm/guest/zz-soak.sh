#!/bin/sh
# The chaos soak (issue 14 §7), profile `soak` (hotplug's machine; opt-in): `pcibus-soak`
# (tests/vm/tools/soak.rs) runs a storage service on the library — a bus with the NVMe driver,
# a writer stamping blocks (LBA, generation, checksum), 32 random reads in flight — while
# N random events make the controller leave and come back: sysfs remove + rescan, or an
# unbind + bind back. At the end every stamped block is read back. (QMP unplugs are left
# out: QEMU 7.2 sometimes never reports DEVICE_DELETED after the guest let go, so the
# controller could not be plugged in again — once in 6 unplugs here; z8 and z15 cover
# unplugs, with a retry of the boot.)
# It fails on any corrupt or lost block, a removal or re-attach that hangs (30 s), a task
# stuck in D state, or fds/maps that grow. N: `tests/vm/run -p soak --soak-events N`
# (default 100; CI runs 20: QEMU 7.2 hangs in longer soaks). Prints `soak: summary ...` for BENCHMARKS.md.
# pcibus-timeout: 5400
. "$PCIBUS_LIB"
only_profiles soak
need_pcibus

events=$(sed -n 's/.*pcibus\.soak_events=\([0-9]*\).*/\1/p' /proc/cmdline)
: "${events:=100}"
pf=$(nvme_pf) || fail "no NVMe controller"
wait_for 20 driver_is "$pf" nvme || fail "$pf not on nvme at start"
t=$(now_ms)
# One malloc arena: glibc gives threads new arenas (each a mapping and its pages) up to
# 8 per core, which reads as growth of maps and RSS over the first events; a leak is
# what the soak looks for.
PCIBUS_TRACE_HANDLES=1 MALLOC_ARENA_MAX=1 pcibus-soak "$pf" "$events" --kinds remove,unbind
rc=$?
echo "soak: $events events in $(($(now_ms) - t)) ms, exit $rc"
matrix_restore "$pf" || fail "$pf did not come back on nvme after the soak"
[ $rc = 0 ] || fail "pcibus-soak"
