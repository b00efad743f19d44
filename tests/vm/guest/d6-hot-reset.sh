#!/bin/sh
# A bus hot reset through the driver API (VFIO_DEVICE_PCI_HOT_RESET; DeviceBacking::
# hot_reset_info, hot_reset; `pcibus vfio reset --hot`): on the SR-IOV profile the NVMe
# PF sits alone behind a root port, so resetting its secondary bus resets it alone; the
# dry run names what would be reset, the reset is done, and the controller works after
# it (identify through the driver). On the nvme profile the controller is on the root
# bus, where no bus reset is possible: refused with the reason, never attempted.
. "$PCIBUS_LIB"
only_profiles sriov nvme
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
if [ "$PCIBUS_PROFILE" = nvme ]; then
	refused() {
		if pcibus vfio reset "$pf" --hot >/tmp/hot.out 2>&1; then
			cat /tmp/hot.out
			echo "FAIL: a hot reset on the root bus succeeded"
			return 1
		fi
		cat /tmp/hot.out
		grep -q 'reset refused' /tmp/hot.out || { echo "FAIL: no refusal said"; return 1; }
	}
	on_vfio_pci "$pf" refused || fail "hot reset on the root bus"
	echo "ok"
	exit 0
fi

hot() {
	pcibus vfio reset "$pf" --hot --dry-run | tee /tmp/hot.dry || return 1
	grep -q 'a bus reset would reset it alone' /tmp/hot.dry || { echo "FAIL: other devices in the reset"; return 1; }
	pcibus vfio reset "$pf" --hot | tee /tmp/hot.done || return 1
	grep -q 'hot reset: done' /tmp/hot.done || { dmesg | tail -25; echo "FAIL: hot reset not done"; return 1; }
	pcibus nvme identify "$pf" | tee /tmp/hot.id || return 1
	grep -q 'QEMU NVMe Ctrl' /tmp/hot.id || { echo "FAIL: controller not identified after the reset"; return 1; }
}
on_vfio_pci "$pf" hot || fail "hot reset"
echo "ok"
