//! The values a PCI device is described by: ids, class code, BARs and other resources,
//! SR-IOV facts, link speed and width.

use std::fmt;

use crate::PciAddress;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u16);

        impl fmt::Display for $name {
            /// Four lower-case hex digits, as lspci prints ids.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:04x}", self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#06x})"), self.0)
            }
        }
    };
}

id_type!(
    /// A PCI vendor id (`vendor`, `subsystem_vendor`).
    VendorId
);
id_type!(
    /// A PCI device id (`device`, `subsystem_device`).
    DeviceId
);

/// A 24-bit PCI class code: base class, subclass, programming interface.
///
/// ```
/// use pcibus::ClassCode;
/// let nvme = ClassCode::new(0x010802).unwrap();
/// assert_eq!((nvme.base(), nvme.sub(), nvme.prog_if()), (0x01, 0x08, 0x02));
/// assert_eq!(nvme.to_string(), "010802");
/// assert!(ClassCode::new(0x1_000000).is_none());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassCode(u32);

impl ClassCode {
    /// A class code from its 24-bit value, `None` above `0xffffff`.
    pub const fn new(value: u32) -> Option<Self> {
        if value > 0xff_ffff {
            None
        } else {
            Some(ClassCode(value))
        }
    }
    /// A class code from its three bytes.
    pub const fn from_parts(base: u8, sub: u8, prog_if: u8) -> Self {
        ClassCode(((base as u32) << 16) | ((sub as u32) << 8) | prog_if as u32)
    }
    /// The 24-bit value.
    pub const fn value(self) -> u32 {
        self.0
    }
    /// Base class (e.g. `0x01` mass storage).
    pub const fn base(self) -> u8 {
        (self.0 >> 16) as u8
    }
    /// Subclass (e.g. `0x08` non-volatile memory).
    pub const fn sub(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Programming interface (e.g. `0x02` NVMe).
    pub const fn prog_if(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for ClassCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06x}", self.0)
    }
}
impl fmt::Debug for ClassCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClassCode({:#08x})", self.0)
    }
}

/// Which resource of a device a line of the `resource` file describes.
///
/// The kernel prints the standard BARs 0–5, the expansion ROM, then (with SR-IOV support
/// built in) the six VF BARs, then, for bridges, the four bridge windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceSlot {
    /// A standard BAR, 0–5.
    Bar(u8),
    /// The expansion ROM.
    Rom,
    /// An SR-IOV VF BAR, 0–5 (the BARs every VF gets a slice of).
    IovBar(u8),
    /// A bridge window, 0–3 (I/O, memory, prefetchable memory, and a spare).
    BridgeWindow(u8),
}

/// Kernel `IORESOURCE_*` flag bits found in the third column of `resource`.
pub mod flags {
    /// I/O port space.
    pub const IO: u64 = 0x0000_0100;
    /// Memory space.
    pub const MEM: u64 = 0x0000_0200;
    /// Prefetchable memory.
    pub const PREFETCH: u64 = 0x0000_2000;
    /// Read-only (the ROM).
    pub const READONLY: u64 = 0x0000_4000;
    /// 64-bit memory BAR.
    pub const MEM_64: u64 = 0x0010_0000;
    /// Resource disabled.
    pub const DISABLED: u64 = 0x1000_0000;
    /// Address not assigned yet.
    pub const UNSET: u64 = 0x2000_0000;
}

/// One line of the `resource` file: an address range and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Resource {
    /// Which resource this is.
    pub slot: ResourceSlot,
    /// First address.
    pub start: u64,
    /// Last address (inclusive), as the kernel prints it.
    pub end: u64,
    /// `IORESOURCE_*` flags; see [`flags`].
    pub flags: u64,
}

impl Resource {
    /// Whether the kernel reports anything for this slot (a zero line means "no resource").
    pub const fn is_present(&self) -> bool {
        !(self.start == 0 && self.end == 0 && self.flags == 0)
    }
    /// Size in bytes (`end - start + 1`), 0 when absent or inconsistent.
    pub const fn size(&self) -> u64 {
        if !self.is_present() || self.end < self.start {
            0
        } else {
            // end - start + 1 overflows only for the full 64-bit range; saturate.
            (self.end - self.start).saturating_add(1)
        }
    }
    /// The kind of space, when the flags say.
    pub const fn kind(&self) -> Option<BarKind> {
        if self.flags & flags::IO != 0 {
            Some(BarKind::Io)
        } else if self.flags & flags::MEM != 0 {
            if self.flags & flags::MEM_64 != 0 {
                Some(BarKind::Mem64)
            } else {
                Some(BarKind::Mem32)
            }
        } else {
            None
        }
    }
    /// Whether the memory is prefetchable.
    pub const fn prefetchable(&self) -> bool {
        self.flags & flags::PREFETCH != 0
    }
}

/// The kind of address space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum BarKind {
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory.
    Mem64,
    /// I/O ports.
    Io,
}

impl fmt::Display for BarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BarKind::Mem32 => "mem32",
            BarKind::Mem64 => "mem64",
            BarKind::Io => "io",
        })
    }
}

/// A standard BAR that is present: index, where, how large, what kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Bar {
    /// BAR index, 0–5.
    pub index: u8,
    /// Bus address of the first byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Space decoded.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

impl Bar {
    /// The BAR a resource line describes, if it is a present standard BAR of a known kind.
    pub fn from_resource(r: &Resource) -> Option<Bar> {
        match r.slot {
            ResourceSlot::Bar(index) if r.is_present() && r.size() > 0 => Some(Bar {
                index,
                start: r.start,
                size: r.size(),
                kind: r.kind()?,
                prefetchable: r.prefetchable(),
            }),
            _ => None,
        }
    }
}

/// SR-IOV facts of a physical function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Sriov {
    /// `sriov_totalvfs`: how many VFs the PF can have.
    pub total_vfs: u16,
    /// `sriov_numvfs`: how many are enabled. Reading it takes the device lock, so it is
    /// `None` unless the caller asked for it and the guarded read answered in time.
    pub num_vfs: Option<u16>,
    /// `sriov_offset`: routing-id offset of the first VF.
    pub vf_offset: Option<u16>,
    /// `sriov_stride`: routing-id distance between VFs.
    pub vf_stride: Option<u16>,
    /// `sriov_vf_device`: the VFs' device id.
    pub vf_device: Option<DeviceId>,
    /// The enabled VFs, from the `virtfnN` links, in N order.
    pub virtfns: Vec<PciAddress>,
}

/// A PCIe link speed, in megatransfers per second (2500 for "2.5 GT/s").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkSpeed(pub u32);

impl fmt::Display for LinkSpeed {
    /// As the kernel writes it, without the generation suffix: `2.5 GT/s`, `16.0 GT/s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} GT/s", self.0 / 1000, (self.0 % 1000) / 100)
    }
}

/// A PCIe link: speed and width (lanes), as reported now or as the maximum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Link {
    /// Speed, `None` when the kernel says "Unknown" (`speed_mts` in the JSON).
    #[cfg_attr(feature = "serde", serde(rename = "speed_mts"))]
    pub speed: Option<LinkSpeed>,
    /// Width in lanes, `None` when unknown.
    pub width: Option<u8>,
}
