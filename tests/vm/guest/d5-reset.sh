#!/bin/sh
# Resets through the driver API with their method reported (DeviceBacking::reset_info,
# reset, hot_reset_info; `pcibus vfio reset`): the NVMe controller has a function-level
# reset, which is done; edu has none (QEMU gives it no FLR and no PM reset) and sits on
# the root bus, so the reset is refused with the reason, never attempted blindly.
. "$PCIBUS_LIB"
only_profiles nvme devices
need_pcibus

if [ "$PCIBUS_PROFILE" = nvme ]; then
	pf=$(nvme_pf) || fail "no NVMe controller"
	reset_nvme() {
		pcibus vfio reset "$pf" --dry-run | tee /tmp/dry || return 1
		grep -q 'function reset by flr' /tmp/dry || { echo "FAIL: no FLR reported"; return 1; }
		pcibus vfio reset "$pf" | tee /tmp/done || return 1
		grep -q 'function reset: done' /tmp/done || { echo "FAIL: reset not done"; return 1; }
	}
	on_vfio_pci "$pf" reset_nvme || fail "NVMe reset"
	echo "ok"
	exit 0
fi

edu=$(pci_find 1234 11e8) || fail "no edu device"
pcibus bind "$edu" vfio-pci || fail "bind $edu to vfio-pci"
pcibus vfio reset "$edu" --dry-run | tee /tmp/edu.dry || fail "edu dry run"
grep -q 'no function reset' /tmp/edu.dry || fail "edu reported a function reset"
if pcibus vfio reset "$edu" >/tmp/edu.reset 2>&1; then
	cat /tmp/edu.reset
	fail "a reset of edu, which has none, succeeded"
fi
cat /tmp/edu.reset
grep -q 'reset refused' /tmp/edu.reset || fail "no refusal said"
# The device still works after the refusal: its id register through the driver API.
pcibus vfio regs "$edu" 0:0:32 | grep -q '0x010000ed$' || fail "edu unreadable after the refused reset"
echo "ok"
