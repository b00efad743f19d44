# Shared by dpdk/install and dpdk/uninstall (sourced, not run).
# Inputs: ROOT (or DPKG_ROOT) = the system's root, default /.
# shellcheck shell=bash

# The diversion's owner: dpkg-divert --list shows it, --remove checks it.
PKG=pcibus-dpdk
# The package whose file is replaced, and the DPDK release the drop-in's ABI is that of.
STOCK_PKG=librte-bus-pci23
ABI_VERSION=22.11
ROOT=${ROOT:-${DPKG_ROOT:-}}

say() { printf '%s: %s\n' "$(basename "$0")" "$*"; }
die() {
	local code=$1
	shift
	printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
	exit "$code"
}

# Call after reading the options: checks dpkg-divert and sets the root options.
setup_root() {
	command -v dpkg-divert >/dev/null || die 1 "dpkg-divert not found: this is for Debian's DPDK packages"
	ROOT=${ROOT%/}
	if [ -n "$ROOT" ]; then
		[ -d "$ROOT/var/lib/dpkg" ] || die 1 "--root '$ROOT' has no var/lib/dpkg"
		dd_root=(--root "$ROOT")
		dq_root=(--admindir "$ROOT/var/lib/dpkg")
	else
		dd_root=()
		dq_root=()
	fi
}

# Refuses unless the installed librte-bus-pci23 (and libdpdk-dev, when installed) is 22.11.
check_version() {
	local pkg v
	for pkg in "$STOCK_PKG" libdpdk-dev; do
		v=$(dpkg-query "${dq_root[@]}" -W -f '${db:Status-Abbrev} ${Version}' "$pkg" 2>/dev/null) || v=
		case $v in
		"ii "*) v=${v##* } ;;
		*)
			[ "$pkg" = "$STOCK_PKG" ] || continue
			die 1 "$STOCK_PKG is not installed (dpkg-query -W $STOCK_PKG): nothing to replace"
			;;
		esac
		case $v in
		"$ABI_VERSION".*) ;;
		*) die 1 "$pkg is version $v; the drop-in has the ABI of DPDK $ABI_VERSION only" ;;
		esac
	done
	version=$v
}

# Sets target/target_rel (the stock library's real file, from the package's file list) and
# diverted/diverted_rel (where the stock file goes: the directory above pmds-23.0).
locate_stock() {
	target_rel=$(dpkg-query "${dq_root[@]}" -L "$STOCK_PKG" | grep -E '/dpdk/pmds-[0-9.]+/librte_bus_pci\.so\.23\.0$' | head -n1) ||
		die 1 "$STOCK_PKG's file list (dpkg-query -L) names no dpdk/pmds-*/librte_bus_pci.so.23.0"
	local pmds
	pmds=$(dirname "$target_rel")
	diverted_rel="$(dirname "$pmds")/librte_bus_pci.so.23.0.distrib"
	target="$ROOT$target_rel"
	diverted="$ROOT$diverted_rel"
}

# Who diverts the stock file: "" (nobody), "pcibus-dpdk", ":" (local) or another package.
diversion_owner() {
	local line
	line=$(dpkg-divert "${dd_root[@]}" --listpackage "$target_rel")
	# --listpackage prints LOCAL for a local diversion, nothing when there is none.
	case $line in
	"") echo "" ;;
	LOCAL) echo ":" ;;
	*) echo "$line" ;;
	esac
}
