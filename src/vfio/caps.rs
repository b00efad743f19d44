//! Decoding of the info structures VFIO returns, capability chains included. Pure
//! functions over bytes (native endian, as the kernel wrote them); every offset the kernel
//! gives is checked against the buffer, and chain walks are bounded.

use std::ops::RangeInclusive;

/// Most capabilities followed in one chain; real chains have a handful.
const MAX_CAPS: usize = 64;

const REGION_INFO_LEN: usize = 32;
const IOMMU_INFO_LEN: usize = 24;
const IOVA_RANGES_LEN: usize = 32;

bitflags::bitflags! {
    /// A region's flags (`vfio_region_info.flags`, `VFIO_REGION_INFO_FLAG_*`). Bits this
    /// crate does not know are kept (`from_bits_retain`), and `Debug` prints them in hex.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct RegionFlags: u32 {
        /// `VFIO_REGION_INFO_FLAG_READ`: readable with pread.
        const READ = 1 << 0;
        /// `VFIO_REGION_INFO_FLAG_WRITE`: writable with pwrite.
        const WRITE = 1 << 1;
        /// `VFIO_REGION_INFO_FLAG_MMAP`: can be mmapped (parts of it, if a sparse-mmap
        /// capability says so).
        const MMAP = 1 << 2;
        /// `VFIO_REGION_INFO_FLAG_CAPS`: has a capability chain.
        const CAPS = 1 << 3;
    }
}

const REGION_CAP_SPARSE_MMAP: u16 = 1;
const REGION_CAP_TYPE: u16 = 2;
const REGION_CAP_MSIX_MAPPABLE: u16 = 3;
const IOMMU_CAP_IOVA_RANGE: u16 = 1;
bitflags::bitflags! {
    /// `vfio_iommu_type1_info.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct IommuInfoFlags: u32 {
        /// `VFIO_IOMMU_INFO_PGSIZES`: `iova_pgsizes` is valid.
        const PGSIZES = 1 << 0;
        /// `VFIO_IOMMU_INFO_CAPS`: a capability chain follows.
        const CAPS = 1 << 1;
    }
}

/// A malformed VFIO info buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed VFIO {what} info: {problem}")]
pub struct InfoError {
    /// Which structure.
    pub what: &'static str,
    /// What is wrong.
    pub problem: &'static str,
}

/// What VFIO says about one region of a device (a BAR, the ROM, config space...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (BARs 0–5, ROM 6, config 7, VGA 8).
    pub index: u32,
    /// What can be done with it.
    pub flags: RegionFlags,
    /// Size in bytes (0: the region does not exist, e.g. an unimplemented BAR).
    pub size: u64,
    /// Offset of the region in the device fd, for pread/pwrite/mmap.
    pub offset: u64,
    /// The parts that may be mmapped, as (offset within the region, size), when the kernel
    /// restricts them (around the MSI-X table). `None`: the whole region, if MMAP is set.
    pub sparse_mmap: Option<Vec<(u64, u64)>>,
    /// The MSI-X table in this region may be mmapped too.
    pub msix_mappable: bool,
    /// The region's (type, subtype), from its `VFIO_REGION_INFO_CAP_TYPE` capability:
    /// what a device-specific region (index 9 and up) is. `None` without one.
    pub region_type: Option<(u32, u32)>,
}

impl RegionInfo {
    /// The areas that may be mmapped, as (offset within the region, size).
    pub fn mmap_areas(&self) -> Vec<(u64, u64)> {
        if !self.flags.contains(RegionFlags::MMAP) || self.size == 0 {
            return Vec::new();
        }
        match &self.sparse_mmap {
            Some(areas) => areas.iter().copied().filter(|&(_, s)| s > 0).collect(),
            None => vec![(0, self.size)],
        }
    }
}

/// What VFIO says about a type1 IOMMU container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes, as a bit mask.
    pub page_sizes: u64,
    /// The IOVA ranges DMA may be mapped at (inclusive). Empty when the kernel reports
    /// none (kernels before 5.4): then any IOVA is allowed by VFIO, though the IOMMU
    /// hardware may still be narrower.
    pub iova_ranges: Vec<RangeInclusive<u64>>,
}

impl IommuInfo {
    /// The smallest IOMMU page size (4096 if the kernel reports none).
    pub fn min_page_size(&self) -> u64 {
        if self.page_sizes == 0 {
            4096
        } else {
            1 << self.page_sizes.trailing_zeros()
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The array both the sparse-mmap and the IOVA-range capabilities carry: after the 8-byte
/// header, a u32 count and 4 reserved bytes, then `count` pairs of u64 (offset and size, or
/// start and end). `None` when the buffer ends before the array does; at most 1024 pairs.
fn u64_pairs(b: &[u8], at: usize) -> Option<Vec<(u64, u64)>> {
    let count = u32_at(b, at.checked_add(8)?)? as usize;
    (0..count.min(1024))
        .map(|i| {
            let base = at.checked_add(16 + i * 16)?;
            Some((u64_at(b, base)?, u64_at(b, base.checked_add(8)?)?))
        })
        .collect()
}

/// Walks a capability chain from `first` (0 = none): (id, version, offset) of each.
fn chain(b: &[u8], first: u32, what: &'static str) -> Result<Vec<(u16, u16, usize)>, InfoError> {
    let err = |problem| InfoError { what, problem };
    let mut caps = Vec::new();
    let mut next = first as usize;
    while next != 0 {
        if caps.len() == MAX_CAPS {
            return Err(err("capability chain too long (a loop?)"));
        }
        if !next.is_multiple_of(4) || next < 8 {
            return Err(err("misaligned capability offset"));
        }
        let id = u16_at(b, next).ok_or_else(|| err("capability beyond the buffer"))?;
        let version = u16_at(b, next + 2).ok_or_else(|| err("capability beyond the buffer"))?;
        let following = u32_at(b, next + 4).ok_or_else(|| err("capability beyond the buffer"))? as usize;
        caps.push((id, version, next));
        // Chains run forward through the buffer; one that goes back is a loop.
        if following != 0 && following <= next {
            return Err(err("capability chain goes backwards"));
        }
        next = following;
    }
    Ok(caps)
}

/// Decodes a `struct vfio_region_info` with its capability chain.
pub fn parse_region_info(b: &[u8]) -> Result<RegionInfo, InfoError> {
    let err = |problem| InfoError {
        what: "region",
        problem,
    };
    if b.len() < REGION_INFO_LEN {
        return Err(err("shorter than struct vfio_region_info"));
    }
    let flags = RegionFlags::from_bits_retain(u32_at(b, 4).unwrap_or_default());
    let mut info = RegionInfo {
        index: u32_at(b, 8).unwrap_or_default(),
        flags,
        size: u64_at(b, 16).unwrap_or_default(),
        offset: u64_at(b, 24).unwrap_or_default(),
        sparse_mmap: None,
        msix_mappable: false,
        region_type: None,
    };
    if flags.contains(RegionFlags::CAPS) {
        let first = u32_at(b, 12).unwrap_or_default();
        for (id, _version, at) in chain(b, first, "region")? {
            match id {
                REGION_CAP_SPARSE_MMAP => {
                    let areas = u64_pairs(b, at).ok_or_else(|| err("sparse mmap capability truncated"))?;
                    if areas
                        .iter()
                        .any(|&(offset, size)| offset.checked_add(size).is_none_or(|end| end > info.size))
                    {
                        return Err(err("sparse mmap area outside the region"));
                    }
                    info.sparse_mmap = Some(areas);
                }
                REGION_CAP_MSIX_MAPPABLE => info.msix_mappable = true,
                REGION_CAP_TYPE => {
                    // struct vfio_region_info_cap_type: the header, then type and subtype.
                    let (Some(region_type), Some(subtype)) = (u32_at(b, at + 8), u32_at(b, at + 12)) else {
                        return Err(err("region type capability truncated"));
                    };
                    info.region_type = Some((region_type, subtype));
                }
                _ => {}
            }
        }
    }
    Ok(info)
}

/// Decodes a `struct vfio_iommu_type1_info` with its capability chain.
pub fn parse_iommu_info(b: &[u8]) -> Result<IommuInfo, InfoError> {
    let err = |problem| InfoError {
        what: "IOMMU",
        problem,
    };
    if b.len() < IOMMU_INFO_LEN {
        return Err(err("shorter than struct vfio_iommu_type1_info"));
    }
    let flags = IommuInfoFlags::from_bits_retain(u32_at(b, 4).unwrap_or_default());
    let mut info = IommuInfo {
        page_sizes: u64_at(b, 8).unwrap_or_default(),
        iova_ranges: Vec::new(),
    };
    if flags.contains(IommuInfoFlags::CAPS) {
        let first = u32_at(b, 16).unwrap_or_default();
        for (id, _version, at) in chain(b, first, "IOMMU")? {
            if id == IOMMU_CAP_IOVA_RANGE {
                for (start, end) in u64_pairs(b, at).ok_or_else(|| err("IOVA range capability truncated"))? {
                    if end < start {
                        return Err(err("IOVA range ends before it starts"));
                    }
                    info.iova_ranges.push(start..=end);
                }
            }
        }
    }
    Ok(info)
}

/// Most IOVA ranges accepted from an IOAS query (real ones have a handful: the holes are
/// the reserved regions, such as the MSI window).
const MAX_IOVA_RANGES: usize = 4096;

/// Decodes the answer to iommufd's `IOMMU_IOAS_IOVA_RANGES`: a `struct
/// iommu_ioas_iova_ranges` (32 bytes: size, ioas_id, num_iovas, reserved, the array
/// pointer, out_iova_alignment) followed by `num_iovas` `struct iommu_iova_range`s
/// (start, last: inclusive). The result is an [`IommuInfo`] whose `page_sizes` is the one
/// alignment the IOAS demands of every IOVA and length (at least 4096 here: pcibus maps
/// whole pages).
pub fn parse_iova_ranges(b: &[u8]) -> Result<IommuInfo, InfoError> {
    let err = |problem| InfoError {
        what: "IOAS IOVA range",
        problem,
    };
    if b.len() < IOVA_RANGES_LEN {
        return Err(err("shorter than struct iommu_ioas_iova_ranges"));
    }
    let count = u32_at(b, 8).unwrap_or_default() as usize;
    let alignment = u64_at(b, 24).unwrap_or_default();
    if !alignment.is_power_of_two() {
        return Err(err("the IOVA alignment is not a power of two"));
    }
    if count > MAX_IOVA_RANGES {
        return Err(err("more IOVA ranges than any IOMMU has"));
    }
    let mut iova_ranges = Vec::with_capacity(count);
    for i in 0..count {
        let at = IOVA_RANGES_LEN + i * 16;
        let (Some(start), Some(last)) = (u64_at(b, at), u64_at(b, at + 8)) else {
            return Err(err("fewer ranges in the buffer than num_iovas says"));
        };
        if last < start {
            return Err(err("an IOVA range ends before it starts"));
        }
        iova_ranges.push(start..=last);
    }
    Ok(IommuInfo {
        page_sizes: alignment.max(4096),
        iova_ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }

    // A BAR0 of 16 KiB whose MSI-X table at 0x2000..0x3000 is cut out of the mmap.
    fn nvme_bar0() -> Vec<u8> {
        let mut b = vec![0u8; 96];
        put32(&mut b, 0, 96);
        put32(&mut b, 4, RegionFlags::all().bits());
        put32(&mut b, 8, 0);
        put32(&mut b, 12, 32);
        put64(&mut b, 16, 0x4000);
        put64(&mut b, 24, 0);
        // sparse mmap cap at 32: header(id 1, version 1, next 0), nr_areas 2
        b[32..34].copy_from_slice(&1u16.to_ne_bytes());
        b[34..36].copy_from_slice(&1u16.to_ne_bytes());
        put32(&mut b, 40, 2);
        put64(&mut b, 48, 0);
        put64(&mut b, 56, 0x2000);
        put64(&mut b, 64, 0x3000);
        put64(&mut b, 72, 0x1000);
        b
    }

    #[test]
    fn sparse_areas_leave_the_msix_table_out() {
        let info = parse_region_info(&nvme_bar0()).unwrap();
        assert_eq!(info.size, 0x4000);
        assert_eq!(info.mmap_areas(), vec![(0, 0x2000), (0x3000, 0x1000)]);
        assert!(!info.msix_mappable);
    }

    #[test]
    fn a_chain_loop_is_an_error() {
        let mut b = nvme_bar0();
        put32(&mut b, 36, 32); // next points at itself
        assert_eq!(
            parse_region_info(&b).unwrap_err().problem,
            "capability chain goes backwards"
        );
    }

    #[test]
    fn iova_ranges_of_a_39_bit_iommu() {
        let mut b = vec![0u8; 64];
        put32(&mut b, 0, 64);
        put32(&mut b, 4, 0b11);
        put64(&mut b, 8, 0x4020_1000);
        put32(&mut b, 16, 24);
        b[24..26].copy_from_slice(&1u16.to_ne_bytes());
        put32(&mut b, 32, 2);
        put64(&mut b, 40, 0);
        put64(&mut b, 48, 0xfedf_ffff);
        // the second range lies past the buffer: truncated
        assert!(parse_iommu_info(&b).is_err());
        b.resize(80, 0);
        put64(&mut b, 56, 0xfef0_0000);
        put64(&mut b, 64, (1 << 39) - 1);
        let info = parse_iommu_info(&b).unwrap();
        assert_eq!(
            info.iova_ranges,
            vec![0..=0xfedf_ffff, 0xfef0_0000..=(1u64 << 39) - 1]
        );
        assert_eq!(info.min_page_size(), 4096);
    }

    // What IOMMU_IOAS_IOVA_RANGES returns for QEMU's intel-iommu (39 bits, the MSI window
    // reserved), laid out as sys::ioas_iova_ranges hands it over.
    fn ioas_ranges(ranges: &[(u64, u64)], alignment: u64) -> Vec<u8> {
        let mut b = vec![0u8; 32 + ranges.len() * 16];
        put32(&mut b, 0, 32);
        put32(&mut b, 8, ranges.len() as u32);
        put64(&mut b, 24, alignment);
        for (i, (start, last)) in ranges.iter().enumerate() {
            put64(&mut b, 32 + i * 16, *start);
            put64(&mut b, 40 + i * 16, *last);
        }
        b
    }

    #[test]
    fn ioas_ranges_of_a_39_bit_iommu() {
        let b = ioas_ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)], 4096);
        let info = parse_iova_ranges(&b).unwrap();
        assert_eq!(
            info.iova_ranges,
            vec![0..=0xfedf_ffff, 0xfef0_0000..=(1u64 << 39) - 1]
        );
        assert_eq!(info.min_page_size(), 4096);
        // An alignment of 1 (any IOVA) still maps whole pages.
        assert_eq!(
            parse_iova_ranges(&ioas_ranges(&[(0, 0xffff)], 1))
                .unwrap()
                .min_page_size(),
            4096
        );
    }

    #[test]
    fn malformed_ioas_ranges_are_errors() {
        let good = ioas_ranges(&[(0x1000, 0xffff)], 4096);
        let problem = |b: &[u8]| parse_iova_ranges(b).unwrap_err().problem;
        assert_eq!(problem(&good[..31]), "shorter than struct iommu_ioas_iova_ranges");
        assert_eq!(
            problem(&good[..40]),
            "fewer ranges in the buffer than num_iovas says"
        );
        assert_eq!(
            problem(&ioas_ranges(&[(0x2000, 0x1000)], 4096)),
            "an IOVA range ends before it starts"
        );
        assert_eq!(
            problem(&ioas_ranges(&[(0, 0xffff)], 3)),
            "the IOVA alignment is not a power of two"
        );
        assert_eq!(
            problem(&ioas_ranges(&[], 0)),
            "the IOVA alignment is not a power of two"
        );
        let mut huge = good.clone();
        put32(&mut huge, 8, u32::MAX);
        assert_eq!(problem(&huge), "more IOVA ranges than any IOMMU has");
        // No range at all is a valid answer (nothing may be mapped).
        assert!(
            parse_iova_ranges(&ioas_ranges(&[], 4096))
                .unwrap()
                .iova_ranges
                .is_empty()
        );
    }

    // A region info as the kernel lays it out: the 32-byte struct, then a sparse-mmap
    // capability (if `sparse`), then a type capability (if `region_type`), chained in that
    // order.
    fn region_bytes(
        index: u32,
        size: u64,
        flags: RegionFlags,
        sparse: Option<&[(u64, u64)]>,
        region_type: Option<(u32, u32)>,
    ) -> Vec<u8> {
        let mut b = vec![0u8; 32];
        let mut caps: Vec<(u16, Vec<u8>)> = Vec::new();
        if let Some(areas) = sparse {
            let mut body = vec![0u8; 8];
            body[0..4].copy_from_slice(&(areas.len() as u32).to_ne_bytes());
            for (o, s) in areas {
                body.extend_from_slice(&o.to_ne_bytes());
                body.extend_from_slice(&s.to_ne_bytes());
            }
            caps.push((1, body));
        }
        if let Some((t, st)) = region_type {
            let mut body = t.to_ne_bytes().to_vec();
            body.extend_from_slice(&st.to_ne_bytes());
            caps.push((2, body));
        }
        let mut first = 0;
        let mut prev_next: Option<usize> = None;
        for (id, body) in caps {
            let at = b.len();
            match prev_next {
                Some(p) => put32(&mut b, p, at as u32),
                None => first = at as u32,
            }
            b.extend_from_slice(&id.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            prev_next = Some(at + 4);
            b.extend_from_slice(&body);
        }
        let len = b.len() as u32;
        put32(&mut b, 0, len);
        let caps = if first != 0 {
            RegionFlags::CAPS
        } else {
            RegionFlags::empty()
        };
        put32(&mut b, 4, (flags | caps).bits());
        put32(&mut b, 8, index);
        put32(&mut b, 12, first);
        put64(&mut b, 16, size);
        put64(&mut b, 24, u64::from(index) << 40);
        b
    }

    #[test]
    fn region_flags_are_typed_and_keep_unknown_bits() {
        let info = parse_region_info(&nvme_bar0()).unwrap();
        assert_eq!(info.flags, RegionFlags::all());
        assert_eq!(
            format!("{:?}", info.flags),
            "RegionFlags(READ | WRITE | MMAP | CAPS)"
        );
        // A flag of a newer kernel survives, and shows in hex.
        let mut b = region_bytes(9, 0x1000, RegionFlags::READ, None, None);
        put32(&mut b, 4, RegionFlags::READ.bits() | 1 << 20);
        let info = parse_region_info(&b).unwrap();
        assert!(info.flags.contains(RegionFlags::READ) && !info.flags.contains(RegionFlags::WRITE));
        assert_eq!(info.flags.bits(), 1 | 1 << 20);
        assert_eq!(format!("{:?}", info.flags), "RegionFlags(READ | 0x100000)");
    }

    #[test]
    fn a_vendor_region_says_its_type() {
        // Intel graphics' OpRegion: vendor type 0x8086 with bit 31, subtype 1, read-only.
        let b = region_bytes(9, 0x2000, RegionFlags::READ, None, Some(((1 << 31) | 0x8086, 1)));
        let info = parse_region_info(&b).unwrap();
        assert_eq!(info.index, 9);
        assert_eq!(info.region_type, Some(((1 << 31) | 0x8086, 1)));
        assert!(info.mmap_areas().is_empty());
        // A BAR without a type capability has none.
        assert_eq!(parse_region_info(&nvme_bar0()).unwrap().region_type, None);
    }

    #[test]
    fn a_truncated_type_capability_is_an_error() {
        let b = region_bytes(10, 0x1000, RegionFlags::READ, None, Some((1, 2)));
        assert_eq!(
            parse_region_info(&b[..b.len() - 4]).unwrap_err().problem,
            "region type capability truncated"
        );
    }

    proptest! {
        #[test]
        fn region_info_round_trips(
            index in 0u32..16,
            size in 1u64..1 << 40,
            mmap in any::<bool>(),
            areas in proptest::option::of(proptest::collection::vec((any::<u64>(), any::<u64>()), 0..6)),
            region_type in proptest::option::of((any::<u32>(), any::<u32>())),
        ) {
            // Areas inside the region, as the kernel reports them.
            let areas: Option<Vec<(u64, u64)>> = areas.map(|a| {
                a.into_iter().map(|(o, s)| { let o = o % size; (o, s % (size - o + 1)) }).collect()
            });
            let flags = RegionFlags::READ | if mmap { RegionFlags::MMAP } else { RegionFlags::empty() };
            let b = region_bytes(index, size, flags, areas.as_deref(), region_type);
            let info = parse_region_info(&b).unwrap();
            prop_assert_eq!(info.index, index);
            prop_assert_eq!(info.size, size);
            prop_assert_eq!(info.offset, u64::from(index) << 40);
            prop_assert_eq!(&info.sparse_mmap, &areas);
            prop_assert_eq!(info.region_type, region_type);
            for (o, s) in info.mmap_areas() {
                prop_assert!(mmap && s > 0 && o + s <= size);
            }
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_region_info(&b);
            let _ = parse_iommu_info(&b);
            let _ = parse_iova_ranges(&b);
        }

        #[test]
        fn ioas_ranges_round_trip(
            ranges in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..16),
            shift in 0u32..13,
        ) {
            let ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(a, b)| (a.min(b), a.max(b))).collect();
            let info = parse_iova_ranges(&ioas_ranges(&ranges, 1 << shift)).unwrap();
            let got: Vec<(u64, u64)> = info.iova_ranges.iter().map(|r| (*r.start(), *r.end())).collect();
            prop_assert_eq!(got, ranges);
            prop_assert_eq!(info.min_page_size(), 4096);
        }
    }
}
