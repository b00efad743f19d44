//! DMA with constraints, DMA pools and caller memory (issue 16 §3, issue 15 §7), specified
//! against the test backings: what a driver sees on any backing.

use pcibus::PciAddress;
use pcibus::bus::{BackingError, DeviceBacking, DmaConstraints, DmaMemory, DmaPool, DmaPoolOptions};
use pcibus::testing::backing::FakeBacking;
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme};
use pcibus::vfio::{DmaBuffer, PAGE, PageBuffer};

fn fake() -> FakeBacking {
    let address: PciAddress = "0000:00:04.0".parse().unwrap();
    FakeBacking::new(&pcibus::DeviceRecord::new(address))
}

const EDU: u64 = (1 << 28) - 1;

#[test]
fn fake_iovas_stay_under_the_address_limit_and_aligned() {
    let dev = fake();
    let edu = DmaConstraints::new().address_bits(28);
    let mut held = Vec::new();
    for len in [PAGE, 3 * PAGE, 1 << 20, 100] {
        let dma = dev.alloc_dma_with(len, &edu).unwrap();
        assert!(dma.iova() + dma.len() as u64 - 1 <= EDU, "{:#x}", dma.iova());
        assert!(dma.iova() >= PAGE as u64, "IOVA 0 is never handed out");
        held.push(dma);
    }
    let aligned = dev.alloc_dma_with(PAGE, &edu.align(1 << 20)).unwrap();
    assert_eq!(aligned.iova() % (1 << 20), 0);
    assert!(aligned.iova() <= EDU);
    // Ranges never overlap.
    held.push(aligned);
    for (i, a) in held.iter().enumerate() {
        for b in &held[i + 1..] {
            assert!(a.iova() + a.len() as u64 <= b.iova() || b.iova() + b.len() as u64 <= a.iova());
        }
    }
    // Trivial constraints are alloc_dma.
    let plain = dev.alloc_dma_with(PAGE, &DmaConstraints::new()).unwrap();
    assert_eq!(plain.len(), PAGE);
}

#[test]
fn a_limit_nothing_fits_under_fails_naming_limit_and_size() {
    let dev = fake();
    // 2^20 bytes of IOVA below a 20-bit limit, less the never-used page 0: no room for 1 MiB.
    let err = dev
        .alloc_dma_with(1 << 20, &DmaConstraints::new().address_bits(20))
        .unwrap_err();
    assert!(
        matches!(err, BackingError::NoDmaAddress { size, max_iova, .. } if size == 1 << 20 && max_iova == 0xf_ffff),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("1048576 bytes") && text.contains("0xfffff"),
        "{text}"
    );
    // A limit too low for anything at all.
    assert!(matches!(
        dev.alloc_dma_with(PAGE, &DmaConstraints::new().address_bits(12)),
        Err(BackingError::NoDmaAddress { .. })
    ));
    // Filling the space under the limit, then one more.
    let small = DmaConstraints::new().address_bits(16);
    let held: Vec<_> = std::iter::from_fn(|| dev.alloc_dma_with(PAGE, &small).ok()).collect();
    assert_eq!(held.len(), 15, "pages 1 to 15");
    assert!(matches!(
        dev.alloc_dma_with(PAGE, &small),
        Err(BackingError::NoDmaAddress { .. })
    ));
    // Without the limit there is room.
    dev.alloc_dma(PAGE).unwrap();
}

#[test]
fn fake_records_read_only_and_takes_a_numa_preference() {
    let dev = fake();
    let ro = dev
        .alloc_dma_with(PAGE, &DmaConstraints::new().device_read_only())
        .unwrap();
    assert!(ro.is_device_read_only());
    ro.write::<u64>(0, 7).unwrap();
    assert_eq!(ro.read::<u64>(0), Some(7), "the process still writes it");
    assert!(!dev.alloc_dma(PAGE).unwrap().is_device_read_only());
    // Node 0 exists everywhere; node 1000 nowhere: a warning, the memory all the same.
    for node in [0, 1000] {
        let near = dev
            .alloc_dma_with(2 * PAGE, &DmaConstraints::new().numa_node(node))
            .unwrap();
        assert_eq!(near.len(), 2 * PAGE);
        assert_eq!(near.read::<u64>(PAGE), Some(0), "zeroed");
    }
}

// A backing that does not implement the constrained allocation (here the NVMe emulator)
// says which constraint it cannot honour, and still serves trivial ones.
#[test]
fn the_default_refuses_constraints_by_name() {
    let emu = EmulatedNvme::new(EmuConfig::default()).unwrap();
    let err = emu
        .alloc_dma_with(PAGE, &DmaConstraints::new().address_bits(32))
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackingError::Unsupported {
                operation: "DMA with an address limit",
                ..
            }
        ),
        "{err:?}"
    );
    let err = emu
        .alloc_dma_with(PAGE, &DmaConstraints::new().device_read_only())
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    emu.alloc_dma_with(PAGE, &DmaConstraints::new()).unwrap();
    // Caller memory with a constraint it cannot honour is refused, and comes back; without
    // one it is mapped, and comes back at unmap.
    let mut page = PageBuffer::new(PAGE).unwrap();
    page[0] = 0xaa;
    let buffer = DmaBuffer::from_memory(page).unwrap();
    let err = emu
        .map_dma(buffer, &DmaConstraints::new().device_read_only())
        .unwrap_err();
    assert!(matches!(err.error, BackingError::Unsupported { .. }));
    let dma = emu.map_dma(err.buffer, &DmaConstraints::new()).unwrap();
    let page: PageBuffer = emu.unmap_dma(dma).unwrap().into_memory().unwrap();
    assert_eq!(page[0], 0xaa);
}

// Issue 15 §7: memory the caller allocated is lent to the device and comes back, with
// what the device (here, the test through the accessors) wrote.
#[test]
fn caller_memory_round_trips_through_the_device() {
    let dev = fake();
    let mut page = PageBuffer::new(2 * PAGE).unwrap();
    assert_eq!(page.len(), 2 * PAGE);
    page[..5].copy_from_slice(b"hello");
    let vaddr = page.as_ptr() as u64;
    let buffer = DmaBuffer::from_memory(page).unwrap();
    assert!(buffer.is_caller_memory());
    assert_eq!(buffer.vaddr(), vaddr, "the caller's memory, not a copy");
    let dma = dev
        .map_dma(buffer, &DmaConstraints::new().address_bits(32))
        .unwrap();
    assert!(dma.iova() + 2 * PAGE as u64 - 1 <= 0xffff_ffff);
    assert_eq!(dev.live_dma(), 1);
    // While mapped: accessors only.
    let mut hello = [0u8; 5];
    dma.read_at(0, &mut hello).unwrap();
    assert_eq!(&hello, b"hello");
    dma.write_at(PAGE, b"from the device").unwrap();
    let buffer = dev.unmap_dma(dma).unwrap();
    assert_eq!(dev.live_dma(), 0);
    // Asking for the wrong type gives the buffer back.
    let buffer = buffer.into_memory::<NotMine>().unwrap_err();
    let page: PageBuffer = buffer.into_memory().unwrap();
    assert_eq!(&page[PAGE..PAGE + 15], b"from the device");
    assert_eq!(page.as_ptr() as u64, vaddr);
    // A buffer of the crate's own is not caller memory.
    assert!(DmaBuffer::new(PAGE).unwrap().into_memory::<PageBuffer>().is_err());
}

// A caller-memory type of another shape, for the downcast check.
#[derive(Debug)]
struct NotMine(PageBuffer);
// SAFETY: forwards to the PageBuffer it owns, the only owner of that memory.
unsafe impl pcibus::vfio::CallerMemory for NotMine {
    fn dma_ptr(&self) -> std::ptr::NonNull<u8> {
        self.0.dma_ptr()
    }
    fn dma_len(&self) -> usize {
        self.0.dma_len()
    }
}

#[test]
fn caller_memory_that_cannot_be_mapped_comes_back() {
    let dev = fake();
    let page = PageBuffer::new(PAGE).unwrap();
    let buffer = DmaBuffer::from_memory(page).unwrap();
    let err = dev
        .map_dma(buffer, &DmaConstraints::new().address_bits(12))
        .unwrap_err();
    assert!(matches!(err.error, BackingError::NoDmaAddress { .. }));
    let _page: PageBuffer = err.buffer.into_memory().unwrap();
    assert_eq!(dev.live_dma(), 0);
}

#[test]
fn pool_blocks_are_carved_aligned_and_reused() {
    let dev = fake();
    let pool = DmaPool::new(dev.clone(), DmaPoolOptions::new(48).align(64));
    assert_eq!(pool.chunks(), 0, "nothing allocated before the first block");
    let a = pool.alloc().unwrap();
    let b = pool.alloc().unwrap();
    assert_eq!(pool.chunks(), 1);
    assert_eq!(pool.free_blocks(), PAGE / 64 - 2);
    assert_eq!((a.len(), a.iova() % 64, b.iova() % 64), (48, 0, 0));
    assert_eq!(b.iova(), a.iova() + 64, "in address order");
    // Bounds: the block's own length, not the stride or the chunk.
    a.write::<u64>(40, u64::MAX).unwrap();
    assert_eq!(a.read::<u64>(48), None);
    assert!(a.write_at(44, &[0; 8]).is_none());
    assert_eq!(a.read::<u32>(usize::MAX - 1), None, "no overflow");
    assert_eq!(b.read::<u64>(0), Some(0), "a's write stayed in a");
    a.write_obj(0, &[1u32, 2, 3, 4]).unwrap();
    assert_eq!(a.read_obj::<[u32; 4]>(0), Some([1, 2, 3, 4]));
    // A dropped block is the next one out, zeroed.
    let a_iova = a.iova();
    drop(a);
    let again = pool.alloc().unwrap();
    assert_eq!(again.iova(), a_iova);
    assert_eq!(again.read::<u64>(40), Some(0));
    assert_eq!(again.read_obj::<[u32; 4]>(0), Some([0; 4]));
    // A full chunk: the next block comes from a new one.
    let rest: Vec<_> = (0..PAGE / 64 - 2).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(pool.chunks(), 1);
    let next = pool.alloc().unwrap();
    assert_eq!(pool.chunks(), 2);
    assert!(rest.iter().all(|r| r.iova() != next.iova()));
}

#[test]
fn pool_blocks_outlive_the_pool_and_its_backing_handle() {
    let dev = fake();
    let pool = DmaPool::new(dev.clone(), DmaPoolOptions::new(256));
    let block = pool.alloc().unwrap();
    let spare = pool.alloc().unwrap();
    assert_eq!(dev.extra_handles(), 1, "the pool holds a handle");
    drop(spare);
    drop(pool);
    assert_eq!(dev.extra_handles(), 0, "blocks hold none");
    assert_eq!(dev.live_dma(), 1, "the chunk lives with its block");
    block.write::<u32>(252, 9).unwrap();
    assert_eq!(block.read::<u32>(252), Some(9));
    drop(block);
    assert_eq!(dev.live_dma(), 0, "the last block took the chunk with it");
}

#[test]
fn a_pool_at_its_limit_says_so_and_recovers() {
    let dev = fake();
    let pool = DmaPool::new(dev.clone(), DmaPoolOptions::new(1024).max_chunks(1));
    let blocks: Vec<_> = (0..4).map(|_| pool.alloc().unwrap()).collect();
    let err = pool.alloc().unwrap_err();
    assert!(
        matches!(
            err,
            BackingError::DmaPoolExhausted {
                block_size: 1024,
                chunks: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("1024-byte blocks"), "{err}");
    drop(blocks);
    pool.alloc().unwrap();
}

#[test]
fn pool_chunks_honour_the_constraints() {
    let dev = fake();
    // Fill the low IOVAs so the pool's chunks could only land above the limit by accident.
    let _low = dev.alloc_dma(1 << 20).unwrap();
    let pool = DmaPool::new(
        dev.clone(),
        DmaPoolOptions::new(4096)
            .align(1 << 16)
            .constraints(DmaConstraints::new().address_bits(28)),
    );
    let blocks: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    for b in &blocks {
        assert_eq!(b.iova() % (1 << 16), 0);
        assert!(b.iova() + 4095 <= EDU);
    }
    // A limit nothing fits under: the backing's error, through the pool.
    let none = DmaPool::new(
        dev.clone(),
        DmaPoolOptions::new(64).constraints(DmaConstraints::new().address_bits(12)),
    );
    assert!(matches!(none.alloc(), Err(BackingError::NoDmaAddress { .. })));
}

#[test]
fn pool_blocks_are_shared_between_threads() {
    let dev = fake();
    let pool = DmaPool::new(dev, DmaPoolOptions::new(16));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut iovas = Vec::new();
                for i in 0..200u64 {
                    let b = pool.alloc().unwrap();
                    b.write::<u64>(0, t * 1000 + i).unwrap();
                    assert_eq!(b.read::<u64>(0), Some(t * 1000 + i));
                    iovas.push(b.iova());
                }
                iovas
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().len(), 200);
    }
    assert_eq!(pool.chunks(), 1, "blocks dropped at once are reused");
}
