//! DMA buffers on real huge pages: the mapping is there, on pages of the size asked for,
//! and goes away whole when the buffer is dropped.
//!
//! Needs huge pages in the kernel's pool. When `/proc/sys/vm/nr_hugepages` (or the 1 GiB
//! pool) is empty, a test running as root fills it for its run and puts the old count back;
//! otherwise it prints why and returns. The tests share the pools, so they take turns.

#[path = "common/skip.rs"]
mod skip;
use std::sync::Mutex;

use pcibus::vfio::{DmaBuffer, HugePageSize, munmap_failures};

const MIB: usize = 1 << 20;

static POOLS: Mutex<()> = Mutex::new(());

/// A huge page pool (`/sys/kernel/mm/hugepages/hugepages-<kb>kB`) with at least `want`
/// pages, filled by this guard if it was short, and put back when it drops.
struct Pool {
    path: String,
    old: Option<u64>,
}

impl Pool {
    fn get(kb: u64, want: u64) -> Result<Pool, String> {
        let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB");
        let path = format!("{dir}/nr_hugepages");
        let read = |p: &str| -> Result<u64, String> {
            std::fs::read_to_string(p)
                .map_err(|e| format!("{p}: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("{p}: {e}"))
        };
        let total = read(&path)?;
        let free = free_pages(kb)?;
        if free >= want {
            return Ok(Pool { path, old: None });
        }
        // Only root may add pages: for anyone else the write fails, and the test skips.
        std::fs::write(&path, (total + want - free).to_string()).map_err(|e| {
            format!("{path} has {free} free pages, {want} needed, and adding some failed: {e}")
        })?;
        let pool = Pool {
            path,
            old: Some(total),
        };
        let now = free_pages(kb)?;
        if now < want {
            return Err(format!(
                "{}: the kernel found {now} free pages of {kb} kB, {want} needed",
                pool.path
            ));
        }
        Ok(pool)
    }
}

/// Free pages in the pool of `kb` kB pages.
fn free_pages(kb: u64) -> Result<u64, String> {
    let p = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB/free_hugepages");
    std::fs::read_to_string(&p)
        .map_err(|e| format!("{p}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{p}: {e}"))
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            let _ = std::fs::write(&self.path, old.to_string());
        }
    }
}

/// The `KernelPageSize` in kB of the mapping of this process that holds `vaddr`, from
/// `/proc/self/smaps`; `None` when no mapping holds it.
fn kernel_page_kb(vaddr: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            inside = (start..end).contains(&vaddr);
            continue;
        }
        if inside && let Some(rest) = line.strip_prefix("KernelPageSize:") {
            return rest.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    None
}

#[test]
fn a_two_mib_buffer_lives_on_two_mib_pages() {
    let _turn = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let _pool = match Pool::get(2048, 2) {
        Ok(pool) => pool,
        Err(why) => {
            skip::skip(&why);
            return;
        }
    };
    let buf = DmaBuffer::new(2 * MIB).unwrap();
    assert!(buf.is_huge());
    assert_eq!(buf.len(), 2 * MIB);
    assert_eq!(
        kernel_page_kb(buf.vaddr()),
        Some(2048),
        "the buffer's mapping, on 2 MiB pages"
    );
    buf.write::<u64>(2 * MIB - 8, 7).unwrap();
    assert_eq!(buf.read::<u64>(2 * MIB - 8), Some(7));
    let vaddr = buf.vaddr();
    drop(buf);
    assert_eq!(kernel_page_kb(vaddr), None, "unmapped whole");

    // Asked for explicitly: the length rounds up to whole 2 MiB pages, and all of them go
    // back to the pool on drop.
    let free = free_pages(2048).unwrap();
    let failures = munmap_failures();
    let buf = DmaBuffer::with_huge_pages(3 * MIB, HugePageSize::Mib2).unwrap();
    assert_eq!((buf.len(), buf.page_size()), (4 * MIB, 2 * MIB));
    assert_eq!(kernel_page_kb(buf.vaddr()), Some(2048));
    assert_eq!(free_pages(2048).unwrap(), free - 2);
    drop(buf);
    assert_eq!(free_pages(2048).unwrap(), free, "both pages back in the pool");
    assert_eq!(munmap_failures(), failures);
}

#[test]
fn one_gib_pages_when_asked() {
    let _turn = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let _pool = match Pool::get(1 << 20, 1) {
        Ok(pool) => pool,
        Err(why) => {
            skip::skip(&why);
            return;
        }
    };
    let free = free_pages(1 << 20).unwrap();
    let failures = munmap_failures();
    let buf = DmaBuffer::with_huge_pages(4096, HugePageSize::Gib1).unwrap();
    assert!(buf.is_huge());
    assert_eq!((buf.len(), buf.page_size()), (1 << 30, 1 << 30));
    assert_eq!(kernel_page_kb(buf.vaddr()), Some(1 << 20), "on a 1 GiB page");
    buf.write::<u64>((1 << 30) - 8, 9).unwrap();
    let vaddr = buf.vaddr();
    drop(buf);
    assert_eq!(kernel_page_kb(vaddr), None, "unmapped whole");
    assert_eq!(free_pages(1 << 20).unwrap(), free, "the page back in the pool");
    assert_eq!(munmap_failures(), failures);
}

// With no page free in the pool of the size asked for, the buffer is made of 4 KiB pages
// (and says so): the old behaviour, now logged.
#[test]
fn an_empty_pool_falls_back_to_small_pages() {
    let _turn = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    match free_pages(1 << 20) {
        Ok(0) => {}
        Ok(n) => {
            skip::skip(format!(
                "the 1 GiB pool has {n} free pages, so the fallback is not taken"
            ));
            return;
        }
        Err(why) => {
            skip::skip(&why);
            return;
        }
    }
    let buf = DmaBuffer::with_huge_pages(5000, HugePageSize::Gib1).unwrap();
    assert!(!buf.is_huge());
    assert_eq!((buf.len(), buf.page_size()), (8192, 4096));
    assert_eq!(kernel_page_kb(buf.vaddr()), Some(4));
}
