//! Id tables: which devices a driver is for.
//!
//! An [`IdEntry`] matches vendor, device, subsystem vendor and subsystem device, each exactly
//! or any, and the 24-bit class code under a mask. DPDK matches the class only exactly or
//! any; a mask lets one entry say "every NVMe controller" (`0x010802` under `0xffffff`) or
//! "every mass-storage controller" (`0x010000` under `0xff0000`).
//!
//! ```
//! use pcibus::bus::id::{CLASS_EXACT, IdEntry, first_match};
//!
//! static IDS: &[IdEntry] = &[
//!     IdEntry::vendor_device(0x8086, 0x0953),
//!     IdEntry::class(0x010802, CLASS_EXACT),
//! ];
//! assert_eq!(IDS[0].to_string(), "8086:0953 sub *:* class *");
//! assert_eq!(IDS[1].to_string(), "*:* sub *:* class 010802/ffffff");
//!
//! let mut nvme = pcibus::DeviceRecord::new("0000:01:00.0".parse().unwrap());
//! nvme.class = pcibus::ClassCode::new(0x010802);
//! assert_eq!(first_match(IDS, &nvme), Some(&IDS[1]));
//! ```

use std::fmt;

use crate::model::{ClassCode, DeviceId, VendorId};
use crate::record::DeviceRecord;

/// Class mask comparing all 24 bits: base class, subclass and programming interface.
pub const CLASS_EXACT: u32 = 0xff_ffff;
/// Class mask comparing base class and subclass (any programming interface).
pub const CLASS_SUBCLASS: u32 = 0xff_ff00;
/// Class mask comparing the base class only.
pub const CLASS_BASE: u32 = 0xff_0000;

/// One line of a driver's id table.
///
/// `None` in an id field means any. The class matches when
/// `record_class & class_mask == class & class_mask`; a mask of 0 matches any class (and a
/// record whose class is unknown). A record whose field is `None` (the scan could not read
/// it) does not match an entry that constrains that field.
///
/// Build entries with the `const` helpers, so tables can be `static`:
///
/// ```
/// use pcibus::bus::id::{CLASS_BASE, IdEntry};
/// static IDS: &[IdEntry] = &[
///     IdEntry::vendor_device(0x1b36, 0x0010).subsystem(0x1af4, 0x1100),
///     IdEntry::vendor(0x144d).with_class(0x010802, 0xffffff),
///     IdEntry::class(0x010000, CLASS_BASE),
/// ];
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct IdEntry {
    /// Vendor id, `None` = any.
    pub vendor: Option<VendorId>,
    /// Device id, `None` = any.
    pub device: Option<DeviceId>,
    /// Subsystem vendor id, `None` = any.
    pub subsystem_vendor: Option<VendorId>,
    /// Subsystem device id, `None` = any.
    pub subsystem_device: Option<DeviceId>,
    /// The class code to compare under [`IdEntry::class_mask`]; bits outside the mask are
    /// ignored (the helpers clear them).
    pub class: u32,
    /// Which bits of the 24-bit class code must equal [`IdEntry::class`]; 0 = any class.
    pub class_mask: u32,
}

impl IdEntry {
    /// Matches every device.
    pub const ANY: IdEntry = IdEntry {
        vendor: None,
        device: None,
        subsystem_vendor: None,
        subsystem_device: None,
        class: 0,
        class_mask: 0,
    };

    /// Every device of a vendor.
    pub const fn vendor(vendor: u16) -> Self {
        IdEntry {
            vendor: Some(VendorId(vendor)),
            ..Self::ANY
        }
    }

    /// One vendor's device id, any subsystem and class.
    pub const fn vendor_device(vendor: u16, device: u16) -> Self {
        IdEntry {
            vendor: Some(VendorId(vendor)),
            device: Some(DeviceId(device)),
            ..Self::ANY
        }
    }

    /// Every device whose class code, under `mask`, equals `class`.
    ///
    /// # Panics
    ///
    /// When `class` or `mask` is wider than 24 bits; in a `static` table that is a compile
    /// error, which is where such a typo belongs.
    pub const fn class(class: u32, mask: u32) -> Self {
        Self::ANY.with_class(class, mask)
    }

    /// This entry, also requiring the class code under `mask` to equal `class`.
    ///
    /// # Panics
    ///
    /// When `class` or `mask` is wider than 24 bits (see [`IdEntry::class`]).
    pub const fn with_class(mut self, class: u32, mask: u32) -> Self {
        assert!(
            class <= 0xff_ffff && mask <= 0xff_ffff,
            "class codes and masks are 24-bit values"
        );
        self.class = class & mask;
        self.class_mask = mask;
        self
    }

    /// This entry, also requiring the subsystem vendor and subsystem device ids.
    pub const fn subsystem(mut self, subsystem_vendor: u16, subsystem_device: u16) -> Self {
        self.subsystem_vendor = Some(VendorId(subsystem_vendor));
        self.subsystem_device = Some(DeviceId(subsystem_device));
        self
    }

    /// This entry, also requiring the subsystem vendor id (any subsystem device).
    pub const fn subsystem_vendor(mut self, subsystem_vendor: u16) -> Self {
        self.subsystem_vendor = Some(VendorId(subsystem_vendor));
        self
    }

    /// An entry from a DPDK `rte_pci_id`: `0xffff` is any for the four ids, `0xffffff` is
    /// any for the class, and any other class matches exactly.
    pub const fn from_dpdk(
        class_id: u32,
        vendor: u16,
        device: u16,
        subsystem_vendor: u16,
        subsystem_device: u16,
    ) -> Self {
        const fn id(v: u16) -> Option<u16> {
            if v == 0xffff { None } else { Some(v) }
        }
        let (class, class_mask) = if class_id & 0xff_ffff == 0xff_ffff {
            (0, 0)
        } else {
            (class_id & 0xff_ffff, CLASS_EXACT)
        };
        IdEntry {
            vendor: match id(vendor) {
                Some(v) => Some(VendorId(v)),
                None => None,
            },
            device: match id(device) {
                Some(v) => Some(DeviceId(v)),
                None => None,
            },
            subsystem_vendor: match id(subsystem_vendor) {
                Some(v) => Some(VendorId(v)),
                None => None,
            },
            subsystem_device: match id(subsystem_device) {
                Some(v) => Some(DeviceId(v)),
                None => None,
            },
            class,
            class_mask,
        }
    }

    /// The entry that matches exactly the ids `record` has: its known ids and, when known,
    /// its full class code. Fields the record lacks are left as any.
    pub fn for_record(record: &DeviceRecord) -> Self {
        let (class, class_mask) = match record.class {
            Some(c) => (c.value(), CLASS_EXACT),
            None => (0, 0),
        };
        IdEntry {
            vendor: record.vendor,
            device: record.device,
            subsystem_vendor: record.subsystem_vendor,
            subsystem_device: record.subsystem_device,
            class,
            class_mask,
        }
    }

    /// Whether `record` is a device this entry is for.
    pub fn matches(&self, record: &DeviceRecord) -> bool {
        fn field<T: PartialEq>(want: Option<T>, have: Option<T>) -> bool {
            want.is_none() || want == have
        }
        field(self.vendor, record.vendor)
            && field(self.device, record.device)
            && field(self.subsystem_vendor, record.subsystem_vendor)
            && field(self.subsystem_device, record.subsystem_device)
            && self.class_matches(record.class)
    }

    /// Whether a class code (`None`: unknown) satisfies this entry's class and mask.
    pub fn class_matches(&self, class: Option<ClassCode>) -> bool {
        self.class_mask == 0
            || class.is_some_and(|c| c.value() & self.class_mask == self.class & self.class_mask)
    }
}

impl Default for IdEntry {
    fn default() -> Self {
        Self::ANY
    }
}

impl fmt::Display for IdEntry {
    /// `8086:0953 sub *:* class 010802/ffffff`: ids in hex, `*` for any, and the class as
    /// value/mask (`class *` when any).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn id(f: &mut fmt::Formatter<'_>, v: Option<u16>) -> fmt::Result {
            match v {
                Some(v) => write!(f, "{v:04x}"),
                None => f.write_str("*"),
            }
        }
        id(f, self.vendor.map(|v| v.0))?;
        f.write_str(":")?;
        id(f, self.device.map(|v| v.0))?;
        f.write_str(" sub ")?;
        id(f, self.subsystem_vendor.map(|v| v.0))?;
        f.write_str(":")?;
        id(f, self.subsystem_device.map(|v| v.0))?;
        if self.class_mask == 0 {
            f.write_str(" class *")
        } else {
            write!(
                f,
                " class {:06x}/{:06x}",
                self.class & self.class_mask,
                self.class_mask
            )
        }
    }
}

/// The first entry of `table` that matches `record`, in table order.
pub fn first_match<'t>(table: &'t [IdEntry], record: &DeviceRecord) -> Option<&'t IdEntry> {
    table.iter().find(|e| e.matches(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PciAddress;
    use proptest::prelude::*;

    fn record(v: u16, d: u16, sv: u16, sd: u16, class: u32) -> DeviceRecord {
        let mut r = DeviceRecord::new(PciAddress::new(0, 1, 0, 0).unwrap());
        r.vendor = Some(VendorId(v));
        r.device = Some(DeviceId(d));
        r.subsystem_vendor = Some(VendorId(sv));
        r.subsystem_device = Some(DeviceId(sd));
        r.class = ClassCode::new(class);
        r
    }

    #[test]
    fn static_tables_and_display() {
        static IDS: &[IdEntry] = &[
            IdEntry::vendor_device(0x8086, 0x0953),
            IdEntry::vendor_device(0x1b36, 0x0010).subsystem(0x1af4, 0x1100),
            IdEntry::vendor(0x144d).with_class(0x010802, CLASS_EXACT),
            IdEntry::class(0x010000, CLASS_BASE),
            IdEntry::ANY.subsystem_vendor(0x1af4),
        ];
        let shown: Vec<String> = IDS.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "8086:0953 sub *:* class *",
                "1b36:0010 sub 1af4:1100 class *",
                "144d:* sub *:* class 010802/ffffff",
                "*:* sub *:* class 010000/ff0000",
                "*:* sub 1af4:* class *",
            ]
        );
    }

    #[test]
    fn class_masks() {
        let nvme = record(0x1b36, 0x0010, 0x1af4, 0x1100, 0x010802);
        let ahci = record(0x8086, 0x2922, 0x1af4, 0x1100, 0x010601);
        let bridge = record(0x1b36, 0x000c, 0x1b36, 0, 0x060400);
        let every_nvme = IdEntry::class(0x010802, CLASS_EXACT);
        let mass_storage = IdEntry::class(0x010000, CLASS_BASE);
        let nvm_subclass = IdEntry::class(0x010800, CLASS_SUBCLASS);
        assert!(every_nvme.matches(&nvme) && !every_nvme.matches(&ahci) && !every_nvme.matches(&bridge));
        assert!(mass_storage.matches(&nvme) && mass_storage.matches(&ahci) && !mass_storage.matches(&bridge));
        assert!(nvm_subclass.matches(&nvme) && !nvm_subclass.matches(&ahci));
        // Bits outside the mask do not matter.
        assert_eq!(IdEntry::class(0x0108ff, CLASS_SUBCLASS), nvm_subclass);
    }

    #[test]
    fn unknown_fields_match_only_unconstrained_entries() {
        let mut r = record(0x1b36, 0x0010, 0x1af4, 0x1100, 0x010802);
        r.class = None;
        r.subsystem_device = None;
        assert!(IdEntry::ANY.matches(&r));
        assert!(IdEntry::vendor_device(0x1b36, 0x0010).matches(&r));
        assert!(!IdEntry::class(0x010802, CLASS_EXACT).matches(&r));
        assert!(!IdEntry::ANY.subsystem(0x1af4, 0x1100).matches(&r));
        assert!(IdEntry::ANY.subsystem_vendor(0x1af4).matches(&r));
        assert!(IdEntry::for_record(&r).matches(&r));
        let empty = DeviceRecord::new(PciAddress::new(0, 0, 0, 0).unwrap());
        assert!(IdEntry::ANY.matches(&empty) && !IdEntry::vendor(0x8086).matches(&empty));
    }

    #[test]
    fn dpdk_entries() {
        assert_eq!(
            IdEntry::from_dpdk(0xffffff, 0xffff, 0xffff, 0xffff, 0xffff),
            IdEntry::ANY
        );
        assert_eq!(
            IdEntry::from_dpdk(0xffffff, 0x8086, 0x0953, 0xffff, 0xffff),
            IdEntry::vendor_device(0x8086, 0x0953)
        );
        assert_eq!(
            IdEntry::from_dpdk(0x010802, 0xffff, 0xffff, 0xffff, 0xffff),
            IdEntry::class(0x010802, CLASS_EXACT)
        );
    }

    #[test]
    fn first_match_is_in_table_order() {
        let nvme = record(0x1b36, 0x0010, 0x1af4, 0x1100, 0x010802);
        let table = [
            IdEntry::vendor(0x8086),
            IdEntry::class(0x010000, CLASS_BASE),
            IdEntry::vendor_device(0x1b36, 0x0010),
        ];
        assert_eq!(first_match(&table, &nvme), Some(&table[1]));
        assert_eq!(first_match(&table[..1], &nvme), None);
        assert_eq!(first_match(&[], &nvme), None);
    }

    #[test]
    #[should_panic(expected = "24-bit")]
    fn wide_class_is_refused() {
        let _ = IdEntry::class(0x1_000000, CLASS_EXACT);
    }

    fn any_record() -> impl Strategy<Value = DeviceRecord> {
        (
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u16>()),
            proptest::option::of(0u32..=0xff_ffff),
        )
            .prop_map(|(v, d, sv, sd, c)| {
                let mut r = DeviceRecord::new(PciAddress::new(0, 0, 0, 0).unwrap());
                r.vendor = v.map(VendorId);
                r.device = d.map(DeviceId);
                r.subsystem_vendor = sv.map(VendorId);
                r.subsystem_device = sd.map(DeviceId);
                r.class = c.and_then(ClassCode::new);
                r
            })
    }

    proptest! {
        #[test]
        fn entry_for_record_matches_it(r in any_record()) {
            prop_assert!(IdEntry::for_record(&r).matches(&r));
        }

        #[test]
        fn any_matches_everything(r in any_record()) {
            prop_assert!(IdEntry::ANY.matches(&r));
        }

        #[test]
        fn class_mask_is_a_masked_compare(
            rc in 0u32..=0xff_ffff,
            class in 0u32..=0xff_ffff,
            mask in 0u32..=0xff_ffff,
        ) {
            let r = record(1, 2, 3, 4, rc);
            prop_assert_eq!(IdEntry::class(class, mask).matches(&r), (rc & mask) == (class & mask));
        }

        #[test]
        fn one_differing_id_does_not_match(r in any_record(), other in any::<u16>()) {
            let e = IdEntry::for_record(&r);
            if let Some(v) = r.vendor && v.0 != other {
                let mut e2 = e;
                e2.vendor = Some(VendorId(other));
                prop_assert!(!e2.matches(&r));
            }
            if let Some(d) = r.subsystem_device && d.0 != other {
                let mut e2 = e;
                e2.subsystem_device = Some(DeviceId(other));
                prop_assert!(!e2.matches(&r));
            }
        }
    }
}
