//! The pure decisions of sharing BAR mappings with DPDK secondary processes: what the
//! primary records of a mapped device, how a secondary checks and decodes it, where the
//! primary places BARs so that a secondary can map them at the same addresses, and the log
//! line a secondary gets when there is nothing to map. No system calls here; `super` does
//! the shared-memory work.
//!
//! The record is this library's own (`#[repr(C)]` [`SharedData`], tagged with [`MAGIC`]
//! and its size), in a shared tail queue of its own name ([`LIST_NAME`]): see the module
//! docs of `super` for why not 22.11's `VFIO_RESOURCE_LIST` / `UIO_RESOURCE_LIST`.

#![forbid(unsafe_code)]

use crate::ffi::types::{PCI_MAX_RESOURCE, RtePciAddr};

/// The name of the shared tail queue holding the records (EAL's table of named queues;
/// at most `RTE_TAILQ_NAMESIZE - 1` bytes). Debian's stock bus never registers it.
pub const LIST_NAME: &str = "PCIBUS_DPDK_MAPPED_BARS";

/// The first 8 bytes of every record: "pcibus" and the layout's version (1). A record of
/// another version (another build of the drop-in in the other process) is refused.
pub const MAGIC: u64 = u64::from_le_bytes(*b"pcibus\x01\x00");

/// How many mmapped parts one BAR may have (the whole BAR, or the parts around a VFIO
/// MSI-X table).
pub const MAX_PARTS: usize = 2;

/// How the primary mapped the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// vfio-pci: BARs mmapped from EAL's VFIO device fd.
    Vfio = 1,
    /// uio_pci_generic / igb_uio: BARs mmapped from sysfs `resourceN` (or `_wc`).
    Uio = 2,
}

impl Kind {
    fn from_raw(v: u32) -> Option<Kind> {
        match v {
            1 => Some(Kind::Vfio),
            2 => Some(Kind::Uio),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Vfio => "VFIO",
            Kind::Uio => "UIO",
        }
    }
}

/// One BAR as the primary mapped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarRecord {
    /// The start of the mapping in the primary (a secondary maps here too).
    pub addr: u64,
    /// The mapping's length (the VFIO region's or the sysfs BAR's size).
    pub len: u64,
    /// The parts mmapped from the device, as (offset in the BAR, length); the rest of the
    /// mapping is inaccessible (VFIO's MSI-X table pages).
    pub parts: Vec<(u64, u64)>,
    /// UIO: mapped from `resourceN_wc` (write-combining).
    pub wc: bool,
}

/// What the primary records of a mapped device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The device.
    pub addr: RtePciAddr,
    /// How it is mapped.
    pub kind: Kind,
    /// The primary's pid (for log lines).
    pub pid: i32,
    /// Each BAR the primary mapped.
    pub bars: [Option<BarRecord>; PCI_MAX_RESOURCE],
}

/// One BAR of [`SharedData`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedBar {
    /// [`BarRecord::addr`]; 0: the BAR is not mapped.
    pub addr: u64,
    /// [`BarRecord::len`].
    pub len: u64,
    /// [`BarRecord::parts`]: (offset, length), the first `nparts` used.
    pub parts: [[u64; 2]; MAX_PARTS],
    /// How many of `parts` are used.
    pub nparts: u32,
    /// [`BarRecord::wc`] (0 or 1).
    pub wc: u32,
}

/// A record as it lies in EAL's shared memory (after the queue links): plain data, the
/// same in every process running this build.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedData {
    /// [`MAGIC`].
    pub magic: u64,
    /// `size_of::<SharedData>()` of the build that wrote it.
    pub size: u32,
    /// [`Kind`] as a number.
    pub kind: u32,
    /// The device.
    pub addr: RtePciAddr,
    /// The primary's pid.
    pub pid: i32,
    /// Reserved (0).
    pub reserved: u32,
    /// The BARs.
    pub bars: [SharedBar; PCI_MAX_RESOURCE],
}

/// `0000:00:04.0` for log lines.
pub fn addr_name(a: &RtePciAddr) -> String {
    format!("{:04x}:{:02x}:{:02x}.{:x}", a.domain, a.bus, a.devid, a.function)
}

/// The shared form of `rec`; `Err` when a BAR has more parts than fit or a part lies
/// outside its BAR.
pub fn encode(rec: &Record) -> Result<SharedData, String> {
    let mut d = SharedData {
        magic: MAGIC,
        size: size_of::<SharedData>() as u32,
        kind: rec.kind as u32,
        addr: rec.addr,
        pid: rec.pid,
        ..SharedData::default()
    };
    for (i, bar) in rec.bars.iter().enumerate() {
        let Some(b) = bar else { continue };
        if b.addr == 0 || b.len == 0 {
            return Err(format!("BAR{i}: mapped at {:#x}, {:#x} bytes", b.addr, b.len));
        }
        if b.parts.len() > MAX_PARTS {
            return Err(format!(
                "BAR{i}: {} mapped parts (at most {MAX_PARTS})",
                b.parts.len()
            ));
        }
        let s = &mut d.bars[i];
        s.addr = b.addr;
        s.len = b.len;
        s.wc = u32::from(b.wc);
        s.nparts = b.parts.len() as u32;
        for (k, &(off, len)) in b.parts.iter().enumerate() {
            check_part(i, off, len, b.len)?;
            s.parts[k] = [off, len];
        }
    }
    Ok(d)
}

fn check_part(bar: usize, off: u64, len: u64, bar_len: u64) -> Result<(), String> {
    if len == 0 || off.checked_add(len).is_none_or(|end| end > bar_len) {
        return Err(format!(
            "BAR{bar}: part of {len:#x} bytes at {off:#x} outside its {bar_len:#x} bytes"
        ));
    }
    Ok(())
}

/// The record in `d`, checked: the magic and size of this build, a known kind, and BARs
/// whose parts lie inside them, at page-aligned (`page`) addresses that do not wrap.
/// `Err` says what is wrong (another build of the drop-in in the primary, or memory that
/// is not such a record).
pub fn decode(d: &SharedData, page: u64) -> Result<Record, String> {
    if d.magic != MAGIC {
        return Err(format!(
            "record tag {:#018x}, expected {MAGIC:#018x} (the primary runs another build of the drop-in)",
            d.magic
        ));
    }
    if d.size as usize != size_of::<SharedData>() {
        return Err(format!(
            "record of {} bytes, expected {} (the primary runs another build of the drop-in)",
            d.size,
            size_of::<SharedData>()
        ));
    }
    let kind = Kind::from_raw(d.kind).ok_or_else(|| format!("unknown mapping kind {}", d.kind))?;
    let mut bars: [Option<BarRecord>; PCI_MAX_RESOURCE] = Default::default();
    for (i, s) in d.bars.iter().enumerate() {
        if s.addr == 0 {
            continue;
        }
        if page == 0 || s.addr % page != 0 || s.len == 0 || s.addr.checked_add(s.len).is_none() {
            return Err(format!("BAR{i}: bad mapping {:#x}+{:#x}", s.addr, s.len));
        }
        let n = s.nparts as usize;
        if n == 0 || n > MAX_PARTS {
            return Err(format!("BAR{i}: {n} mapped parts"));
        }
        let mut parts = Vec::with_capacity(n);
        for &[off, len] in &s.parts[..n] {
            check_part(i, off, len, s.len)?;
            parts.push((off, len));
        }
        bars[i] = Some(BarRecord {
            addr: s.addr,
            len: s.len,
            parts,
            wc: s.wc != 0,
        });
    }
    Ok(Record {
        addr: d.addr,
        kind,
        pid: d.pid,
        bars,
    })
}

/// What a secondary process found in EAL's shared memory for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No queue named [`LIST_NAME`]: no process of this EAL instance ever mapped a device
    /// through the drop-in (the primary runs Debian's stock bus, or mapped nothing yet).
    NoList,
    /// The queue exists; these are the records whose address is the device's (normally
    /// one; none when the primary did not map it), and the tag and size of any record of
    /// another build (whose address cannot be read).
    Found(Vec<SharedData>),
}

/// The secondary's decision: the record to map from, or the log line's reason.
pub fn choose(lookup: &Lookup, addr: &RtePciAddr, kind: Kind, page: u64) -> Result<Record, String> {
    let name = addr_name(addr);
    let found = match lookup {
        Lookup::NoList => {
            return Err(format!(
                "the primary process recorded no mapping in EAL's shared memory (no {LIST_NAME} \
                 list): it does not run pcibus's drop-in (Debian's stock bus keeps its own \
                 list, which the drop-in does not read) or has mapped no device"
            ));
        }
        Lookup::Found(v) => v,
    };
    if let Some(d) = found
        .iter()
        .find(|d| d.magic != MAGIC || d.size as usize != size_of::<SharedData>())
    {
        return Err(format!(
            "a record in EAL's shared memory: {}",
            decode(d, page).err().unwrap_or_default()
        ));
    }
    let Some(d) = found.first() else {
        return Err(format!(
            "the primary process has no record of {name}: it has not mapped that device \
             (not probed there, blocked, or already unmapped)"
        ));
    };
    if found.len() > 1 {
        return Err(format!(
            "{} records of {name} in EAL's shared memory",
            found.len()
        ));
    }
    let rec = decode(d, page).map_err(|e| format!("the primary's record of {name}: {e}"))?;
    if rec.kind != kind {
        return Err(format!(
            "the primary (pid {}) mapped {name} through {}, this process sees it bound for {}",
            rec.pid,
            rec.kind.describe(),
            kind.describe()
        ));
    }
    Ok(rec)
}

/// A secondary's check of a BAR against the region it sees: the primary's mapping must be
/// of the same size (the same device, unchanged).
pub fn check_bar(bar: usize, rec: &BarRecord, size_here: u64) -> Result<(), String> {
    if rec.len != size_here {
        return Err(format!(
            "BAR{bar}: the primary mapped {:#x} bytes, the region here has {size_here:#x}",
            rec.len
        ));
    }
    Ok(())
}

/// The end of the highest of EAL's memory areas, given as (base, length) pairs: where the
/// primary starts placing BARs (as 22.11 does: addresses past EAL's reserved memory are
/// normally free in secondaries, which reserve the same areas). `None` without areas.
pub fn max_end(areas: impl IntoIterator<Item = (u64, u64)>) -> Option<u64> {
    areas
        .into_iter()
        .filter_map(|(b, l)| b.checked_add(l))
        .filter(|&e| e != 0)
        .max()
}

/// Places a mapping of `len` bytes at the next free hint `next` (page-aligned up): the
/// address to ask for and the hint after it. `None` on overflow (then the kernel chooses).
pub fn place(next: u64, len: u64, page: u64) -> Option<(u64, u64)> {
    if page == 0 {
        return None;
    }
    let at = next.checked_next_multiple_of(page)?;
    let after = at.checked_add(len)?.checked_next_multiple_of(page)?;
    Some((at, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn addr() -> RtePciAddr {
        RtePciAddr {
            domain: 0,
            bus: 0,
            devid: 4,
            function: 0,
        }
    }

    fn record() -> Record {
        let mut bars: [Option<BarRecord>; PCI_MAX_RESOURCE] = Default::default();
        bars[0] = Some(BarRecord {
            addr: 0x1_4000_0000,
            len: 0x20000,
            parts: vec![(0, 0x20000)],
            wc: false,
        });
        bars[3] = Some(BarRecord {
            addr: 0x1_4002_0000,
            len: 0x4000,
            parts: vec![(0, 0x1000), (0x2000, 0x2000)],
            wc: true,
        });
        Record {
            addr: addr(),
            kind: Kind::Vfio,
            pid: 42,
            bars,
        }
    }

    #[test]
    fn a_record_survives_encoding() {
        let d = encode(&record()).unwrap();
        assert_eq!(d.magic, MAGIC);
        assert_eq!(d.bars[1], SharedBar::default());
        assert_eq!(decode(&d, PAGE).unwrap(), record());
    }

    #[test]
    fn the_list_name_fits_eals_table() {
        assert!(LIST_NAME.len() < crate::ffi::types::RTE_TAILQ_NAMESIZE);
        assert!(!LIST_NAME.contains('\0'));
    }

    #[test]
    fn encoding_refuses_what_does_not_fit() {
        let mut r = record();
        r.bars[0].as_mut().unwrap().parts = vec![(0, 1), (1, 1), (2, 1)];
        assert!(encode(&r).unwrap_err().contains("3 mapped parts"));
        let mut r = record();
        r.bars[0].as_mut().unwrap().parts = vec![(0x10000, 0x20000)];
        assert!(encode(&r).unwrap_err().contains("outside"));
    }

    #[test]
    fn decoding_refuses_other_builds_and_garbage() {
        let good = encode(&record()).unwrap();
        let mut d = good;
        d.magic ^= 1;
        assert!(decode(&d, PAGE).unwrap_err().contains("another build"));
        let mut d = good;
        d.size += 8;
        assert!(decode(&d, PAGE).unwrap_err().contains("another build"));
        let mut d = good;
        d.kind = 7;
        assert!(decode(&d, PAGE).unwrap_err().contains("unknown mapping kind 7"));
        let mut d = good;
        d.bars[0].addr += 8;
        assert!(decode(&d, PAGE).unwrap_err().contains("BAR0: bad mapping"));
        let mut d = good;
        d.bars[0].addr = !(PAGE - 1);
        assert!(decode(&d, PAGE).unwrap_err().contains("BAR0"));
        let mut d = good;
        d.bars[3].nparts = 3;
        assert!(decode(&d, PAGE).unwrap_err().contains("BAR3: 3 mapped parts"));
        let mut d = good;
        d.bars[3].parts[1] = [0x3000, 0x2000];
        assert!(decode(&d, PAGE).unwrap_err().contains("outside"));
    }

    #[test]
    fn a_secondary_without_a_drop_in_primary_is_told_so() {
        let e = choose(&Lookup::NoList, &addr(), Kind::Vfio, PAGE).unwrap_err();
        assert!(
            e.contains(LIST_NAME) && e.contains("does not run pcibus's drop-in"),
            "{e}"
        );
    }

    #[test]
    fn a_secondary_whose_primary_has_no_record_of_the_device_is_told_so() {
        let e = choose(&Lookup::Found(vec![]), &addr(), Kind::Vfio, PAGE).unwrap_err();
        assert!(e.contains("no record of 0000:00:04.0"), "{e}");
    }

    #[test]
    fn a_secondary_maps_from_the_primarys_record_of_the_same_kind() {
        let d = encode(&record()).unwrap();
        assert_eq!(
            choose(&Lookup::Found(vec![d]), &addr(), Kind::Vfio, PAGE).unwrap(),
            record()
        );
        let e = choose(&Lookup::Found(vec![d]), &addr(), Kind::Uio, PAGE).unwrap_err();
        assert!(e.contains("through VFIO") && e.contains("pid 42"), "{e}");
        let e = choose(&Lookup::Found(vec![d, d]), &addr(), Kind::Vfio, PAGE).unwrap_err();
        assert!(e.contains("2 records"), "{e}");
        let mut bad = d;
        bad.kind = 9;
        let e = choose(&Lookup::Found(vec![bad]), &addr(), Kind::Vfio, PAGE).unwrap_err();
        assert!(e.contains("the primary's record of 0000:00:04.0"), "{e}");
        // A record of another build (only its tag and size read) fails every look-up.
        let foreign = SharedData {
            magic: MAGIC + 1,
            size: 8,
            ..SharedData::default()
        };
        let e = choose(&Lookup::Found(vec![d, foreign]), &addr(), Kind::Vfio, PAGE).unwrap_err();
        assert!(e.contains("another build"), "{e}");
    }

    #[test]
    fn a_bar_of_another_size_is_refused() {
        let r = record();
        let b = r.bars[0].as_ref().unwrap();
        assert!(check_bar(0, b, 0x20000).is_ok());
        assert!(check_bar(0, b, 0x10000).unwrap_err().contains("BAR0"));
    }

    #[test]
    fn bars_are_placed_after_eals_memory_page_by_page() {
        assert_eq!(max_end([]), None);
        assert_eq!(
            max_end([
                (0x1_0000_0000, 0x4000_0000),
                (0x2_0000_0000, 0x1000),
                (u64::MAX, 2)
            ]),
            Some(0x2_0000_1000)
        );
        let (a, next) = place(0x2_0000_1000, 0x20000, PAGE).unwrap();
        assert_eq!((a, next), (0x2_0000_1000, 0x2_0002_1000));
        let (b, next) = place(next, 0x10, PAGE).unwrap();
        assert_eq!((b, next), (0x2_0002_1000, 0x2_0002_2000));
        assert_eq!(place(0x2_0000_0001, 1, PAGE).unwrap().0, 0x2_0000_1000);
        assert_eq!(place(u64::MAX - 10, 1, PAGE), None);
        assert_eq!(place(0, 1, 0), None);
    }
}
