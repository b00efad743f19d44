# Helpers for guest tests written in shell (busybox sh). Installed in the
# initramfs as $PCIBUS_LIB; a test uses it with: . "$PCIBUS_LIB"

# Print a message and fail the test.
fail() {
	echo "FAIL: $*"
	exit 1
}

# Skip the test (reported as SKIP) unless the VM runs one of the given profiles.
only_profiles() {
	for p in "$@"; do
		[ "$PCIBUS_PROFILE" = "$p" ] && return 0
	done
	echo "skip: profile $PCIBUS_PROFILE is not one of: $*"
	exit 77
}

# Print the sysfs name (DDDD:BB:DD.F) of the first NVMe controller (class
# 0x010802) that is not a virtual function.
nvme_pf() {
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/class")" = 0x010802 ] || continue
		[ -e "$d/physfn" ] && continue
		echo "${d##*/}"
		return 0
	done
	return 1
}

# Print the name of the driver bound to PCI device $1, or nothing.
pci_driver() {
	l=/sys/bus/pci/devices/$1/driver
	[ -e "$l" ] && basename "$(readlink "$l")"
	return 0
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.1 s until it succeeds.
wait_for() {
	n=$(($1 * 10))
	shift
	while ! "$@"; do
		n=$((n - 1))
		[ $n -gt 0 ] || return 1
		sleep 0.1
	done
}
