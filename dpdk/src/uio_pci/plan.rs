//! The decisions of mapping a UIO device, as pure functions: which `uioN` instance is the
//! device's, which BARs are mapped and how large, which interrupt handle type it gets, and
//! what an I/O port of a BAR is. Facts from DPDK 22.11's `drivers/bus/pci/linux/pci_uio.c`
//! and `pci_common_uio.c`.

use std::io;
use std::path::Path;

use pcibus::model::{Resource, ResourceSlot, flags};

/// Number of BARs (`PCI_MAX_RESOURCE`).
pub const BARS: usize = 6;
/// Offset of the Command register in config space.
pub const COMMAND: u64 = 0x04;
/// Bus Master Enable in the Command register.
pub const COMMAND_MASTER: u16 = 0x4;
/// Port numbers below this are I/O ports (`in`/`out`), addresses at or above it memory
/// (22.11's `PIO_MAX`, which `ioread*`/`iowrite*` test).
pub const PIO_MAX: u64 = 0x1_0000;

/// The instance number of a `uio*` directory entry: `uioN` (current kernels, under the
/// device's `uio/` directory) or `uio:uioN` (old kernels, in the device's directory);
/// leading digits decide, as 22.11's `strtoull` does. `None` for other names.
pub fn uio_number(entry: &str) -> Option<u32> {
    let rest = entry.strip_prefix("uio")?;
    let rest = rest.strip_prefix(":uio").unwrap_or(rest);
    let digits: &str = &rest[..rest.bytes().take_while(u8::is_ascii_digit).count()];
    digits.parse().ok()
}

/// The device's UIO instance: the first `uio*` entry of `dev_dir/uio`, or, when that
/// directory does not exist, of `dev_dir` itself (22.11's `pci_get_uio_dev`). Entries are
/// taken in name order (a device has one instance; the order only makes the choice
/// deterministic). `Ok(None)`: no instance (not managed by UIO).
pub fn find_uio(dev_dir: &Path) -> io::Result<Option<u32>> {
    let entries = match std::fs::read_dir(dev_dir.join("uio")) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::read_dir(dev_dir)?,
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names.iter().find_map(|n| uio_number(n)))
}

/// The `major:minor` of a uio instance's sysfs `dev` file (`"243:0\n"`), for EAL's
/// `--create-uio-dev`: two decimal numbers and a colon, a trailing newline allowed,
/// nothing else (a major above 4095 or a minor above 2^20 - 1 is not a Linux device number).
pub fn parse_dev_numbers(text: &[u8]) -> Option<(u32, u32)> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let colon = text.iter().position(|&b| b == b':')?;
    let number = |digits: &[u8], max: u32| -> Option<u32> {
        if digits.is_empty() || digits.len() > 7 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
        (n <= max).then_some(n)
    };
    Some((
        number(&text[..colon], 0xfff)?,
        number(&text[colon + 1..], 0xf_ffff)?,
    ))
}

/// Where a uio instance's sysfs directory is under the device's: `uio/uioN` on current
/// kernels, `uio:uioN` on old ones (the layouts [`find_uio`] reads).
pub fn uio_sysfs_dirs(dev_dir: &Path, n: u32) -> [std::path::PathBuf; 2] {
    [
        dev_dir.join("uio").join(format!("uio{n}")),
        dev_dir.join(format!("uio:uio{n}")),
    ]
}

/// A BAR to map: its sysfs `resource<bar>` file, `len` bytes from offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMap {
    /// BAR number, 0–5.
    pub bar: usize,
    /// Bus address (`mem_resource[bar].phys_addr`).
    pub phys: u64,
    /// Bytes to map (`mem_resource[bar].len`).
    pub len: u64,
}

/// The BARs to map, from the device's sysfs `resource` lines: the memory BARs with an
/// address and a size (22.11 maps every BAR whose `mem_resource[i].phys_addr` is set,
/// which its scan sets for memory BARs only). I/O BARs are left to `rte_pci_ioport_*`;
/// the ROM, SR-IOV BARs and bridge windows are not BARs of `mem_resource`.
pub fn bar_plan(resources: &[Resource]) -> Vec<BarMap> {
    resources
        .iter()
        .filter_map(|r| match r.slot {
            ResourceSlot::Bar(i) if usize::from(i) < BARS && r.flags & flags::MEM != 0 => {
                Some((usize::from(i), r))
            }
            _ => None,
        })
        .filter(|(_, r)| r.start != 0 && r.size() != 0)
        .map(|(bar, r)| BarMap {
            bar,
            phys: r.start,
            len: r.size(),
        })
        .collect()
}

/// The sysfs files to try for BAR `bar`, in order: `resource<bar>_wc` first when the
/// driver asked for write combining (`RTE_PCI_DRV_WC_ACTIVATE`; a missing one falls back),
/// then `resource<bar>`.
pub fn resource_files(bar: usize, wc: bool) -> Vec<String> {
    let plain = format!("resource{bar}");
    if wc {
        vec![format!("{plain}_wc"), plain]
    } else {
        vec![plain]
    }
}

/// The kernel driver a UIO device is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UioDriver {
    /// `igb_uio` (DPDK's out-of-tree module): it enables bus mastering and MSI-X/MSI/INTx
    /// itself; interrupts are `RTE_INTR_HANDLE_UIO`.
    IgbUio,
    /// `uio_pci_generic`: INTx only, masked through config space by EAL
    /// (`RTE_INTR_HANDLE_UIO_INTX`); bus mastering is left to us.
    Generic,
}

/// What the interrupt handle gets, per driver: the handle type (true: `RTE_INTR_HANDLE_UIO`,
/// false: `RTE_INTR_HANDLE_UIO_INTX`), and whether Bus Master must be set by the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntrChoice {
    /// `RTE_INTR_HANDLE_UIO` (else `RTE_INTR_HANDLE_UIO_INTX`).
    pub uio: bool,
    /// Set Bus Master in the Command register (uio_pci_generic does not).
    pub set_master: bool,
}

/// The interrupt handle type and bus-master duty for `driver` (22.11's
/// `pci_uio_alloc_resource`).
pub const fn intr_choice(driver: UioDriver) -> IntrChoice {
    match driver {
        UioDriver::IgbUio => IntrChoice {
            uio: true,
            set_master: false,
        },
        UioDriver::Generic => IntrChoice {
            uio: false,
            set_master: true,
        },
    }
}

/// The Command register with Bus Master set, or `None` when it already is (no write).
pub const fn with_master(command: u16) -> Option<u16> {
    if command & COMMAND_MASTER != 0 {
        None
    } else {
        Some(command | COMMAND_MASTER)
    }
}

/// What an I/O port of a BAR is (22.11's x86 `pci_uio_ioport_map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// An I/O BAR: `in`/`out` at port `base` (below [`PIO_MAX`]), `len` ports.
    Io {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u64,
    },
    /// A memory BAR: accesses go to its mapping (`mem_resource[bar].addr`), `len` bytes.
    Mem {
        /// Size of the BAR.
        len: u64,
    },
}

/// The port kind of BAR `bar` from the `resource` lines; `Err` says why there is none.
pub fn port_kind(resources: &[Resource], bar: usize) -> Result<PortKind, String> {
    let r = resources
        .iter()
        .find(|r| r.slot == ResourceSlot::Bar(bar as u8) && bar < BARS)
        .ok_or_else(|| format!("no resource line for BAR {bar}"))?;
    if r.flags & flags::IO != 0 {
        match u16::try_from(r.start) {
            Ok(base) if r.start < PIO_MAX => Ok(PortKind::Io { base, len: r.size() }),
            _ => Err(format!(
                "I/O BAR {bar} at {:#x}: too large a port number",
                r.start
            )),
        }
    } else if r.flags & flags::MEM != 0 {
        Ok(PortKind::Mem { len: r.size() })
    } else {
        Err(format!(
            "BAR {bar} is neither I/O nor memory (flags {:#x})",
            r.flags
        ))
    }
}

/// Whether `len` bytes at `offset` fit in a port range of `size` bytes.
pub fn port_range_ok(size: u64, offset: u64, len: usize) -> bool {
    offset.checked_add(len as u64).is_some_and(|end| end <= size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcibus::sysfs::parse::resource;
    use pcibus::testing::FakeSysfs;

    #[test]
    fn dev_numbers_are_two_decimals_and_a_colon() {
        assert_eq!(parse_dev_numbers(b"243:0\n"), Some((243, 0)));
        assert_eq!(parse_dev_numbers(b"4095:1048575"), Some((4095, 0xf_ffff)));
        for bad in [
            &b""[..],
            b"\n",
            b"243",
            b"243:",
            b":0",
            b"243:0\n\n",
            b" 243:0",
            b"243:0 ",
            b"-1:0",
            b"4096:0",
            b"1:1048576",
            b"99999999:0",
            b"1:2:3",
            b"0x10:0",
        ] {
            assert_eq!(parse_dev_numbers(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest::proptest! {
        #[test]
        fn dev_numbers_round_trip_and_never_panic(major in 0u32..=0xfff, minor in 0u32..=0xf_ffff, junk in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            let text = format!("{major}:{minor}\n");
            proptest::prop_assert_eq!(parse_dev_numbers(text.as_bytes()), Some((major, minor)));
            let _ = parse_dev_numbers(&junk);
        }
    }

    #[test]
    fn uio_numbers_of_both_layouts() {
        assert_eq!(uio_number("uio0"), Some(0));
        assert_eq!(uio_number("uio17"), Some(17));
        assert_eq!(uio_number("uio:uio3"), Some(3));
        assert_eq!(uio_number("uio4x"), Some(4), "leading digits decide, as strtoull");
        assert_eq!(uio_number("uio"), None);
        assert_eq!(uio_number("uiox"), None);
        assert_eq!(uio_number("uio:uio"), None);
        assert_eq!(uio_number("resource0"), None);
        assert_eq!(uio_number("uio99999999999"), None, "beyond u32");
    }

    #[test]
    fn find_uio_in_a_fake_sysfs_tree() {
        let fake = FakeSysfs::new().unwrap();
        fake.device("0000:00:04.0")
            .driver("uio_pci_generic")
            .create()
            .unwrap();
        fake.device("0000:00:05.0").driver("igb_uio").create().unwrap();
        fake.device("0000:00:06.0").driver("virtio-pci").create().unwrap();
        let rel = |n: &str| fake.device_dir(n).unwrap();
        let devices = fake.root().join("bus/pci/devices");
        // Current kernels: uio/uioN.
        fake.mkdir(rel("0000:00:04.0").join("uio/uio3")).unwrap();
        fake.write(rel("0000:00:04.0").join("uio/other"), b"").unwrap();
        assert_eq!(find_uio(&devices.join("0000:00:04.0")).unwrap(), Some(3));
        // Old kernels: uio:uioN in the device's directory.
        fake.mkdir(rel("0000:00:05.0").join("uio:uio7")).unwrap();
        assert_eq!(find_uio(&devices.join("0000:00:05.0")).unwrap(), Some(7));
        // Not managed by UIO.
        assert_eq!(find_uio(&devices.join("0000:00:06.0")).unwrap(), None);
        // No device directory at all: an error, not a panic.
        assert!(find_uio(&devices.join("0000:00:1f.0")).is_err());
    }

    const LINES: &str = "\
0x00000000fe000000 0x00000000fe000fff 0x0000000000040200
0x000000000000c000 0x000000000000c03f 0x0000000000040101
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000800000000 0x0000000800003fff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000fe001000 0x00000000fe001fff 0x0000000000040200
0x00000000feb80000 0x00000000febbffff 0x0000000000046200
0x00000000fd000000 0x00000000fd003fff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn bar_plan_maps_memory_bars_only() {
        let res = resource(LINES.as_bytes()).unwrap();
        assert_eq!(
            bar_plan(&res),
            vec![
                BarMap {
                    bar: 0,
                    phys: 0xfe00_0000,
                    len: 0x1000
                },
                BarMap {
                    bar: 3,
                    phys: 0x8_0000_0000,
                    len: 0x4000
                },
                BarMap {
                    bar: 5,
                    phys: 0xfe00_1000,
                    len: 0x1000
                },
            ],
            "I/O BAR 1, empty BARs 2 and 4, the ROM and the SR-IOV BAR are not mapped"
        );
        assert!(bar_plan(&[]).is_empty());
    }

    #[test]
    fn resource_file_order() {
        assert_eq!(resource_files(2, false), vec!["resource2"]);
        assert_eq!(resource_files(0, true), vec!["resource0_wc", "resource0"]);
    }

    #[test]
    fn interrupt_type_and_bus_master_per_driver() {
        assert_eq!(
            intr_choice(UioDriver::IgbUio),
            IntrChoice {
                uio: true,
                set_master: false
            }
        );
        assert_eq!(
            intr_choice(UioDriver::Generic),
            IntrChoice {
                uio: false,
                set_master: true
            }
        );
        assert_eq!(with_master(0x0002), Some(0x0006));
        assert_eq!(with_master(0x0407), None);
    }

    #[test]
    fn port_kinds_from_resource_lines() {
        let res = resource(LINES.as_bytes()).unwrap();
        assert_eq!(
            port_kind(&res, 1),
            Ok(PortKind::Io {
                base: 0xc000,
                len: 0x40
            })
        );
        assert_eq!(port_kind(&res, 0), Ok(PortKind::Mem { len: 0x1000 }));
        assert!(port_kind(&res, 2).unwrap_err().contains("neither"));
        assert!(port_kind(&res, 6).is_err(), "the ROM is no BAR");
        assert!(port_kind(&res, 9).is_err());
        let big = resource(b"0x0000000000010000 0x000000000001003f 0x0000000000040101\n").unwrap();
        assert!(port_kind(&big, 0).unwrap_err().contains("too large"));
        assert!(port_range_ok(0x40, 0x3c, 4));
        assert!(!port_range_ok(0x40, 0x3d, 4));
        assert!(!port_range_ok(0x40, u64::MAX, 4));
    }
}
