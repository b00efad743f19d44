#!/bin/sh
# Hangs in the kernel in D state, like a driver deadlock would: a FUSE mount
# whose daemon never answers INIT makes every lookup wait uninterruptibly.
# The guest watchdog must dump this task (sysrq w) and reset the VM.
mkdir -p /mnt/fuse
exec 3<>/dev/fuse
mount -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 fuse /mnt/fuse || exit 1
cat /mnt/fuse/x
