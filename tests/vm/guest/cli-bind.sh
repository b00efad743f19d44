#!/bin/sh
# `pcibus bind` moves the NVMe controller to vfio-pci and back to nvme, `pcibus unbind`
# leaves it without a driver; after each step the driver link and `pcibus list --json`
# say so. A bind to a driver that is not loaded fails and leaves the device where it was.
. "$PCIBUS_LIB"
need_pcibus

pf=$(nvme_pf) || fail "no NVMe controller"
dev=/sys/bus/pci/devices/$pf
wait_for 10 driver_is "$pf" nvme || fail "not bound to nvme at start"

# expect_driver DRIVER: the link and the listing agree on DRIVER ("" for none).
expect_driver() {
	got=$(pci_driver "$pf")
	[ "$got" = "$1" ] || fail "driver link says '$got', want '$1'"
	pcibus list --json >/tmp/list.json || fail "pcibus list --json failed"
	line=$(json_device /tmp/list.json "$pf")
	[ -n "$line" ] || fail "$pf missing from pcibus list --json"
	if [ -z "$1" ]; then want='"driver":null'; else want="\"driver\":\"$1\""; fi
	case $line in
	*"$want"*) ;;
	*) fail "pcibus list --json shows $(echo "$line" | grep -o '"driver":[^,]*'), want $want" ;;
	esac
	echo "  driver link and pcibus list agree: ${1:-(none)}; driver_override $(cat "$dev/driver_override")"
}

# step DESCRIPTION COMMAND...: run a pcibus command, time it, fail if it fails.
step() {
	what=$1
	shift
	t=$(now_ms)
	out=$("$@" 2>&1) || fail "$what: '$*' failed: $out"
	echo "$what: '$*' -> $out ($(($(now_ms) - t)) ms)"
}

group=$(basename "$(readlink "$dev/iommu_group")")
step "to vfio-pci" pcibus bind "$pf" vfio-pci
expect_driver vfio-pci
wait_for 5 test -c "/dev/vfio/$group" || fail "/dev/vfio/$group missing"
step "again" pcibus bind "$pf" vfio-pci
case $out in *already*) ;; *) fail "second bind did not say 'already': $out" ;; esac
expect_driver vfio-pci

step "to nvme" pcibus bind "$pf" nvme
expect_driver nvme
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* after binding to nvme"

step "unbind" pcibus unbind "$pf"
expect_driver ""
case $(cat "$dev/driver_override") in "(null)" | "") ;; *) fail "driver_override not cleared" ;; esac
step "unbind again" pcibus unbind "$pf"
case $out in *"not bound"*) ;; *) fail "second unbind did not say 'not bound': $out" ;; esac

step "from none to nvme" pcibus bind "$pf" nvme
expect_driver nvme

# A driver that is not loaded: refused, and the device stays on nvme.
t=$(now_ms)
if out=$(pcibus bind "$pf" no-such-driver 2>&1); then
	fail "bind to no-such-driver succeeded: $out"
fi
echo "bind to no-such-driver refused ($(($(now_ms) - t)) ms): $out"
case $out in *"not loaded"*) ;; *) fail "the error does not say the driver is not loaded" ;; esac
got=$(pci_driver "$pf")
if [ "$got" != nvme ]; then
	echo "FAIL: the refused bind left $pf on '${got:-no driver}' (driver_override $(cat "$dev/driver_override"))"
	echo >"$dev/driver_override"
	echo "$pf" >/sys/bus/pci/drivers_probe
	exit 1
fi
expect_driver nvme

# Leave no override behind for the tests that follow.
echo >"$dev/driver_override"
wait_for 20 sh -c 'ls /dev/nvme[0-9]* >/dev/null 2>&1' || fail "no /dev/nvme* at the end"
