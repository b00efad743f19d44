#!/bin/sh
# Registers and BARs through the driver API (RegisterIo, DeviceBacking::bar_info and
# map_bar_range; `pcibus vfio info` and `pcibus vfio regs`) on devices that are not NVMe:
# the e1000e's I/O-port BAR through VFIO's region read/write (its IOADDR/IODATA window
# reaches the same STATUS register as its memory BAR; 8-byte I/O accesses refused), edu's
# 32-bit registers (id, the inverting liveness register) and a window of its BAR, and a
# modern virtio-rng's 8- and 16-bit common-configuration fields.
. "$PCIBUS_LIB"
only_profiles devices
need_pcibus

edu=$(pci_find 1234 11e8) || fail "no edu device"
nic=$(pci_find 8086 10d3) || fail "no e1000e"
rng=$(pci_find 1af4 1044) || fail "no modern virtio-rng"
for d in "$edu" "$nic" "$rng"; do
	pcibus bind "$d" vfio-pci || fail "bind $d to vfio-pci"
done

# The BARs without mapping them.
pcibus vfio info "$nic" >/tmp/nic.info || fail "vfio info $nic"
cat /tmp/nic.info
grep -Eq 'BAR2 +io +size 0x20 ' /tmp/nic.info || fail "e1000e's BAR2 is not a 32-byte I/O BAR"
grep -Eq 'BAR0 +mem32 +size 0x20000 ' /tmp/nic.info || fail "e1000e's BAR0 is not 128 KiB of 32-bit memory"
pcibus vfio info "$edu" >/tmp/edu.info || fail "vfio info $edu"
grep -Eq 'BAR0 +mem32 +size 0x100000 +mmap' /tmp/edu.info || fail "edu's BAR0 is not 1 MiB, mappable: $(cat /tmp/edu.info)"

# The e1000e's STATUS (0x8), through the I/O BAR (IOADDR at 0, IODATA at 4) and BAR0.
pcibus vfio regs "$nic" 2:0:32=0x8 2:4:32 0:0x8:32 >/tmp/nic.regs || fail "e1000e regs: $(cat /tmp/nic.regs)"
cat /tmp/nic.regs
io=$(sed -n 's/^BAR2+0x4 r32 (io) \(0x[0-9a-f]*\)$/\1/p' /tmp/nic.regs)
mem=$(sed -n 's/^BAR0+0x8 r32 \(0x[0-9a-f]*\)$/\1/p' /tmp/nic.regs)
[ -n "$io" ] && [ "$io" = "$mem" ] || fail "STATUS through the I/O BAR ($io) is not STATUS through BAR0 ($mem)"
pcibus vfio regs "$nic" 2:0:8 2:0:16 >/tmp/nic.narrow || fail "e1000e narrow I/O reads: $(cat /tmp/nic.narrow)"
grep -q '^BAR2+0x0 r8 (io) 0x08$' /tmp/nic.narrow || fail "8-bit IOADDR read: $(cat /tmp/nic.narrow)"
grep -q '^BAR2+0x0 r16 (io) 0x0008$' /tmp/nic.narrow || fail "16-bit IOADDR read: $(cat /tmp/nic.narrow)"
if pcibus vfio regs "$nic" 2:0:64 >/tmp/nic.wide; then
	fail "an 8-byte access to an I/O BAR was not refused"
fi
grep -q 'refused' /tmp/nic.wide || fail "no refusal said: $(cat /tmp/nic.wide)"

# edu: the id, the liveness register (reads back the inverse), and a window of BAR0.
pcibus vfio regs "$edu" 0:0:32 0:4:32=0x12345678 0:4:32 >/tmp/edu.regs || fail "edu regs: $(cat /tmp/edu.regs)"
grep -q '^BAR0+0x0 r32 0x010000ed$' /tmp/edu.regs || fail "edu id: $(cat /tmp/edu.regs)"
grep -q '^BAR0+0x4 r32 0xedcba987$' /tmp/edu.regs || fail "edu liveness: $(cat /tmp/edu.regs)"
if pcibus vfio regs "$edu" --window 0x4+0x4 0:0:32=0x1 0:0:32 0:4:32 >/tmp/edu.win; then
	fail "an access outside the window was not refused: $(cat /tmp/edu.win)"
fi
grep -q '^BAR0+0x0 r32 0xfffffffe$' /tmp/edu.win || fail "window offset 0 is not edu's liveness register: $(cat /tmp/edu.win)"
grep -q '^BAR0+0x4 r32 refused' /tmp/edu.win || fail "the access past the window: $(cat /tmp/edu.win)"

# virtio-rng (modern): common configuration at BAR4 offset 0; num_queues (16-bit at
# 0x12) is 1, device_status (8-bit at 0x14) takes ACKNOWLEDGE and reads it back, and
# the 16-bit num_queues beside it is untouched by the 8-bit write.
pcibus vfio regs "$rng" 4:0x12:16 4:0x14:8=0x1 4:0x14:8 4:0x12:16 4:0x14:8=0x0 >/tmp/rng.regs ||
	fail "virtio-rng regs: $(cat /tmp/rng.regs)"
cat /tmp/rng.regs
[ "$(grep -c '^BAR4+0x12 r16 0x0001$' /tmp/rng.regs)" = 2 ] || fail "virtio-rng num_queues: $(cat /tmp/rng.regs)"
grep -q '^BAR4+0x14 r8 0x01$' /tmp/rng.regs || fail "virtio-rng device_status: $(cat /tmp/rng.regs)"
echo "ok"
