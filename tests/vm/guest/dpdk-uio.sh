#!/bin/sh
# Issue 18: the drop-in's UIO path (dpdk/src/uio_pci/) on a real kernel. Both e1000e NICs
# are bound to uio_pci_generic (the dpdk profile's initramfs loads uio and uio_pci_generic)
# and Debian's dpdk-testpmd forwards on them as dpdk-testpmd.sh does on vfio-pci (flowgen,
# TX of each port = RX of the other, no errors), with --iova-mode=pa (UIO has no IOMMU
# mapping of its own: the NICs DMA to physical addresses, which iommu=pt's identity domain
# lets through QEMU's intel-iommu; with `--kernel-args iommu=nopt` every run sends nothing
# and the kernel logs DMAR read faults). Three runs in one boot: Debian's library
# (BASELINE), the drop-in by LD_LIBRARY_PATH, the drop-in alone (mount namespace). In each
# drop-in run the drop-in's log says it mapped both NICs through UIO, `pcibus claims` shows
# both claimed by testpmd, and the ports whose link state change interrupt (UIO INTx)
# arrived are those of the stock run. At the end the NICs go back to vfio-pci, where the
# other dpdk tests expect them.
# pcibus-timeout: 420
. "$PCIBUS_LIB"
only_profiles dpdk
need_pcibus
. /usr/lib/pcibus-vm/dpdk.sh
dpdk_setup

dpdk_nic_pair

[ -d /sys/bus/pci/drivers/uio_pci_generic ] ||
	fail "no uio_pci_generic driver (modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' '))"

# to_uio ADDR: bind ADDR to uio_pci_generic; prints its uio instance.
to_uio() {
	if ! pcibus bind "$1" uio_pci_generic; then
		echo "--- dmesg:"
		dmesg | tail -n 20
		fail "pcibus bind $1 uio_pci_generic failed (INTx masking refused?)"
	fi
	driver_is "$1" uio_pci_generic || fail "$1 not on uio_pci_generic after the bind"
	u=$(ls "/sys/bus/pci/devices/$1/uio" 2>/dev/null)
	[ -n "$u" ] || fail "$1 on uio_pci_generic has no uio instance"
	[ -c "/dev/$u" ] || fail "$1: no /dev/$u"
	echo "$1: uio_pci_generic, $u (irq $(cat "/sys/bus/pci/devices/$1/irq"))"
}

# Whatever happens, the NICs end on vfio-pci (the other dpdk tests bind from there).
back_to_vfio() {
	dpdk_to_vfio "$nic0" "$nic1"
}

to_uio "$nic0"
to_uio "$nic1"

DPDK_EAL="-l 0-1 -n 1 --no-telemetry --log-level=lib.eal:debug --iova-mode=pa -a $nic0 -a $nic1"
failed=

# lsc_ports: the ports (0, 1) of this run that reported a link state change event, which
# reaches testpmd as a UIO INTx interrupt (read from /dev/uioN, unmasked through config).
lsc_ports() {
	for p in 0 1; do
		grep -q "Port $p: link state change event" "$out" && printf '%s' "$p"
	done
	return 0
}

# iova_pa: after a run, EAL's IOVA mode line (PA, or the run fails), the ports whose link
# state change interrupt arrived, and what the drop-in logged (without its per-device
# max_vfs lines).
iova_pa() {
	echo "$label: $(grep -m1 'Selected IOVA mode' "$out"); link state change interrupts on ports: $(lsc_ports)"
	grep 'PCI (pcibus)' "$out" | grep -v ': max_vfs' | sort | uniq -c | tail -n 20
	grep -q "Selected IOVA mode 'PA'" "$out" || { RUN_OK=0; WHY="EAL did not select IOVA mode PA"; }
}

# 1. The baseline: Debian's librte_bus_pci.
dpdk_session uio-stock env
iova_pa
# The drop-in must deliver the interrupts the stock bus delivers in the same boot.
stock_lsc=$(lsc_ports)
if [ $RUN_OK = 1 ]; then
	grep -q 'PCI (pcibus)' "$out" && { back_to_vfio; fail "BASELINE: the pcibus drop-in answered in the stock run"; }
	echo "BASELINE (stock librte_bus_pci, uio_pci_generic) PASS"
else
	echo "BASELINE FAIL (stock librte_bus_pci, uio_pci_generic): $WHY"
	failed="$failed baseline"
fi

# uio_verdict LABEL: a drop-in run's result line. Both NICs mapped through UIO by the
# drop-in (its debug line) and claimed by testpmd during the run.
uio_verdict() {
	if [ $RUN_OK = 1 ]; then
		for n in "$nic0" "$nic1"; do
			grep -q "PCI (pcibus): $n: mapped through UIO" "$out" || {
				RUN_OK=0
				WHY="no line saying the drop-in mapped $n through UIO"
			}
			grep "$n" "$out.claims" | grep -q testpmd || {
				RUN_OK=0
				WHY="$n not claimed by testpmd during the run: $(cat "$out.claims")"
			}
		done
		[ "$(lsc_ports)" = "$stock_lsc" ] || {
			RUN_OK=0
			WHY="link state change interrupts on ports '$(lsc_ports)', the stock run's on '$stock_lsc'"
		}
	fi
	if [ $RUN_OK = 1 ]; then
		echo "DROP-IN PASS ($1): $(grep -m1 "PCI (pcibus): $nic0: mapped through UIO" "$out")"
		return 0
	fi
	echo "DROP-IN FAIL ($1): $WHY"
	failed="$failed $1"
}

# 2. The drop-in first on the library path (the stock bus, loaded as a plugin, evicted).
dpdk_session uio-dropin-ldpath env LD_LIBRARY_PATH=$DPDK_DROPIN_DIR
iova_pa
grep -q "$DPDK_EVICTED" "$out" || { RUN_OK=0; WHY="no line saying the stock bus was evicted: is the drop-in loaded?"; }
uio_verdict uio-dropin-ldpath

# 3. The drop-in alone: a private plugin directory over the real one, in a mount namespace.
dpdk_plugin_copy /tmp/pmds-dropin
dpdk_session uio-dropin-mountns dpdk_in_plugin_ns /tmp/pmds-dropin
iova_pa
grep -q "$DPDK_EVICTED" "$out" && { RUN_OK=0; WHY="the stock bus was loaded in the mount namespace"; }
uio_verdict uio-dropin-mountns
rm -rf /tmp/pmds-dropin

back_to_vfio
[ -z "$failed" ] || fail "failed:$failed"
echo "uio_pci_generic, --iova-mode=pa: baseline and drop-in (both routes): TX of each port = RX of the other, no errors"
