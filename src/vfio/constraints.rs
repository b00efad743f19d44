//! What a device needs of its DMA memory: [`DmaConstraints`].
//!
//! Pure data, read by every backing's allocator: VFIO's
//! ([`Container::alloc_dma_with`](super::Container::alloc_dma_with)), the bus's backings
//! ([`DeviceBacking::alloc_dma_with`](crate::bus::DeviceBacking::alloc_dma_with)) and the
//! test backings. It lives at the bottom, beside [`DmaBuffer`](super::DmaBuffer), so that
//! the VFIO layer needs nothing from the bus above it.

use std::fmt;

use super::dma::PAGE;

/// What a device needs of a DMA allocation: an address limit, an alignment, a NUMA node,
/// and whether the device may only read it. Built by value; the default is no constraint
/// (what [`alloc_dma`](crate::bus::DeviceBacking::alloc_dma) gives).
///
/// ```
/// use pcibus::vfio::DmaConstraints;
/// // QEMU's edu device: 28 address lines.
/// let edu = DmaConstraints::new().address_bits(28);
/// assert_eq!(edu.max_iova(), Some(0x0fff_ffff));
/// // A descriptor ring the device only reads, 64 KiB aligned, near node 1's CPUs.
/// let ring = DmaConstraints::new().align(64 << 10).numa_node(1).device_read_only();
/// assert_eq!(ring.alignment(), 64 << 10);
/// assert!(!ring.is_trivial());
/// ```
///
/// | constraint | meaning | VFIO | test backings |
/// |---|---|---|---|
/// | [`address_bits`](Self::address_bits), [`below`](Self::below) | every byte's IOVA at or below the limit | IOVA allocator's limit | the same |
/// | [`align`](Self::align) | the IOVA a multiple of it | IOVA allocator's alignment | the same |
/// | [`numa_node`](Self::numa_node) | pages preferably on that node | `mbind(MPOL_PREFERRED)` before the first touch | the same (a failure is a warning) |
/// | [`device_read_only`](Self::device_read_only) | the device may read, not write | map without write permission | recorded; the backing's model may check it |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DmaConstraints {
    max_iova: Option<u64>,
    align: u64,
    numa_node: Option<u32>,
    device_read_only: bool,
}

impl fmt::Debug for DmaConstraints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DmaConstraints");
        if let Some(max) = self.max_iova {
            d.field("max_iova", &format_args!("{max:#x}"));
        }
        if self.align > PAGE as u64 {
            d.field("align", &format_args!("{:#x}", self.align));
        }
        if let Some(node) = self.numa_node {
            d.field("numa_node", &node);
        }
        if self.device_read_only {
            d.field("device_read_only", &true);
        }
        d.finish()
    }
}

impl DmaConstraints {
    /// No constraint: any IOVA, page aligned, any node, the device reads and writes.
    pub const fn new() -> Self {
        DmaConstraints {
            max_iova: None,
            align: PAGE as u64,
            numa_node: None,
            device_read_only: false,
        }
    }

    /// The device drives `bits` address lines (its DMA mask is `(1 << bits) - 1`): every
    /// byte of the allocation gets an IOVA below `1 << bits`. 64 or more: no limit. QEMU's
    /// `edu` is 28-bit, many devices are 32-bit. A limit so low that nothing fits (IOVA 0
    /// is never handed out, so 12 bits or fewer) fails the allocation, naming the limit.
    pub const fn address_bits(self, bits: u32) -> Self {
        if bits >= 64 {
            DmaConstraints {
                max_iova: None,
                ..self
            }
        } else {
            self.below((1u64 << bits) - 1)
        }
    }

    /// Every byte of the allocation gets an IOVA at or below `max_iova` (inclusive: the
    /// device's DMA mask).
    pub const fn below(self, max_iova: u64) -> Self {
        DmaConstraints {
            max_iova: Some(max_iova),
            ..self
        }
    }

    /// The IOVA is a multiple of `bytes`, a power of two (one that is not is rounded up to
    /// the next power of two; 0 means no more than a page). Allocations are always at least
    /// page aligned, in the process and on the device; this aligns the IOVA further (the
    /// process address stays page aligned, or huge-page aligned on huge pages).
    pub const fn align(self, bytes: u64) -> Self {
        let pow = match bytes.checked_next_power_of_two() {
            Some(p) => p,
            None => 1 << 63,
        };
        DmaConstraints {
            align: if pow < PAGE as u64 { PAGE as u64 } else { pow },
            ..self
        }
    }

    /// Preferably on NUMA node `node` (the device's, from its sysfs `numa_node`): the pages
    /// are bound with `mbind(MPOL_PREFERRED)` before they are first touched. A preference,
    /// not a promise: when the node has no free memory the kernel takes another, and when
    /// the binding itself fails (no such node, no NUMA support) the allocation goes on
    /// without it, with a warning in the log. Memory that already exists (mapped with
    /// [`map_dma`](crate::bus::DeviceBacking::map_dma)) stays where it is.
    pub const fn numa_node(self, node: u32) -> Self {
        DmaConstraints {
            numa_node: Some(node),
            ..self
        }
    }

    /// The device may only read the memory (descriptor rings it fetches, data it
    /// transmits): with VFIO the IOMMU mapping has no write permission, so a device write
    /// faults in the IOMMU instead of landing in memory (where the IOMMU enforces
    /// permissions at all: not under `vfio-noiommu`). The process still reads and writes
    /// it.
    pub const fn device_read_only(self) -> Self {
        DmaConstraints {
            device_read_only: true,
            ..self
        }
    }

    /// The highest IOVA any byte may have, if limited.
    pub const fn max_iova(&self) -> Option<u64> {
        self.max_iova
    }

    /// The IOVA alignment in bytes: a power of two, at least a page.
    pub const fn alignment(&self) -> u64 {
        if self.align < PAGE as u64 {
            PAGE as u64
        } else {
            self.align
        }
    }

    /// The preferred NUMA node, if any.
    pub const fn preferred_node(&self) -> Option<u32> {
        self.numa_node
    }

    /// Whether the device may only read the memory.
    pub const fn is_device_read_only(&self) -> bool {
        self.device_read_only
    }

    /// Whether nothing is asked beyond what [`alloc_dma`](crate::bus::DeviceBacking::alloc_dma)
    /// gives anyway: no limit, page alignment, no node, read and write.
    pub const fn is_trivial(&self) -> bool {
        self.max_iova.is_none()
            && self.alignment() == PAGE as u64
            && self.numa_node.is_none()
            && !self.device_read_only
    }

    /// The first constraint that is not trivial, named for an "unsupported" error
    /// (`"DMA with an address limit"`), or `None`.
    pub const fn first_nontrivial(&self) -> Option<&'static str> {
        if self.max_iova.is_some() {
            Some("DMA with an address limit")
        } else if self.alignment() != PAGE as u64 {
            Some("DMA aligned beyond a page")
        } else if self.numa_node.is_some() {
            Some("DMA on a preferred NUMA node")
        } else if self.device_read_only {
            Some("DMA read-only for the device")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_build_by_value() {
        let none = DmaConstraints::new();
        assert!(none.is_trivial());
        assert_eq!(none, DmaConstraints::default().align(0));
        assert_eq!(none.first_nontrivial(), None);
        assert_eq!(none.alignment(), PAGE as u64);
        assert_eq!(
            DmaConstraints::new().address_bits(32).max_iova(),
            Some(0xffff_ffff)
        );
        assert_eq!(DmaConstraints::new().address_bits(64).max_iova(), None);
        assert_eq!(DmaConstraints::new().address_bits(200).max_iova(), None);
        assert_eq!(DmaConstraints::new().address_bits(0).max_iova(), Some(0));
        // Alignment: powers of two, at least a page.
        assert_eq!(DmaConstraints::new().align(64).alignment(), PAGE as u64);
        assert_eq!(DmaConstraints::new().align(12 << 10).alignment(), 16 << 10);
        assert_eq!(DmaConstraints::new().align(u64::MAX).alignment(), 1 << 63);
        assert!(DmaConstraints::new().align(PAGE as u64).is_trivial());
        let all = DmaConstraints::new()
            .address_bits(28)
            .align(1 << 16)
            .numa_node(3)
            .device_read_only();
        assert_eq!(all.first_nontrivial(), Some("DMA with an address limit"));
        assert_eq!(all.preferred_node(), Some(3));
        assert!(all.is_device_read_only());
        assert_eq!(
            format!("{all:?}"),
            "DmaConstraints { max_iova: 0xfffffff, align: 0x10000, numa_node: 3, device_read_only: true }"
        );
        assert_eq!(
            DmaConstraints::new().device_read_only().first_nontrivial(),
            Some("DMA read-only for the device")
        );
    }
}
