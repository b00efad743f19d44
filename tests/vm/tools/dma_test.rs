//! `dma_test`: exercises constrained DMA, caller memory and a DMA pool on a real VFIO
//! device, and reports the IOVAs: the VM suite's proof of issue 16 §3 on hardware paths
//! (the unit tests cover everything up to the ioctls).
//!
//! ```text
//! dma_test ADDR [--address-bits N] [--align BYTES] [--read-only] [--numa NODE]
//! dma_test 0000:01:00.0 --address-bits 28 --read-only
//! ```
//!
//! The device must be bound to vfio-pci; nothing is asked of it (no DMA is started), so any
//! function works. Each check prints `ok: ...` or `FAIL: ...`; the exit status is 0 when
//! all passed, 1 when one failed, 2 on bad arguments or when the device cannot be opened.

use std::process::ExitCode;

use pcibus::bus::{BackingError, DeviceBacking, DmaConstraints, DmaPool, DmaPoolOptions, VfioBacking};
use pcibus::vfio::{DmaBuffer, PAGE, PageBuffer, VfioDevice};
use pcibus::{PciAddress, SysfsRoot};

struct Args {
    address: PciAddress,
    constraints: DmaConstraints,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let address = args
        .next()
        .ok_or("usage: dma_test ADDR [--address-bits N] [--align BYTES] [--read-only] [--numa NODE]")?
        .parse::<PciAddress>()
        .map_err(|e| e.to_string())?;
    let mut constraints = DmaConstraints::new();
    while let Some(flag) = args.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.map_err(|e| format!("{name} {v}: {e}"))
        };
        constraints = match flag.as_str() {
            "--address-bits" => constraints.address_bits(value("--address-bits")? as u32),
            "--align" => constraints.align(value("--align")?),
            "--numa" => constraints.numa_node(value("--numa")? as u32),
            "--read-only" => constraints.device_read_only(),
            other => return Err(format!("unknown argument {other}")),
        };
    }
    Ok(Args { address, constraints })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dma_test: {e}");
            return ExitCode::from(2);
        }
    };
    let device = match VfioDevice::open(&SysfsRoot::new("/sys"), args.address) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dma_test: cannot open {}: {e}", args.address);
            return ExitCode::from(2);
        }
    };
    let backing = VfioBacking::new(device);
    let c = args.constraints;
    println!("constraints: {c:?}");
    let mut failed = 0;
    let mut check = |ok: bool, what: String| {
        println!("{}: {what}", if ok { "ok" } else { "FAIL" });
        failed += usize::from(!ok);
    };
    let max = c.max_iova().unwrap_or(u64::MAX);
    let fits = |iova: u64, len: usize| iova.is_multiple_of(c.alignment()) && iova + len as u64 - 1 <= max;

    // 1. Allocations under the constraints.
    let mut held = Vec::new();
    for len in [PAGE, 16 * PAGE, 2 << 20] {
        match backing.alloc_dma_with(len, &c) {
            Ok(dma) => {
                let ok = fits(dma.iova(), dma.len()) && dma.read::<u64>(0) == Some(0);
                check(
                    ok,
                    format!(
                        "alloc_dma_with({len}) at IOVA {:#x} ({} bytes)",
                        dma.iova(),
                        dma.len()
                    ),
                );
                held.push(dma);
            }
            Err(e) => check(false, format!("alloc_dma_with({len}): {e}")),
        }
    }
    // 2. A limit nothing fits under fails before any ioctl, naming limit and size.
    match backing.alloc_dma_with(1 << 20, &c.address_bits(20)) {
        Err(e @ BackingError::NoDmaAddress { .. }) => {
            check(true, format!("1 MiB under 20 bits refused: {e}"))
        }
        other => check(
            false,
            format!("1 MiB under 20 bits: expected NoDmaAddress, got {other:?}"),
        ),
    }
    // 3. Caller memory: lent, mapped, written through the accessors, given back.
    let round_trip = (|| -> Result<(u64, bool), String> {
        let mut page = PageBuffer::new(4 * PAGE).map_err(|e| e.to_string())?;
        page[..4].copy_from_slice(b"pcib");
        let buffer = DmaBuffer::from_memory(page).map_err(|(e, _)| e.to_string())?;
        let dma = backing.map_dma(buffer, &c).map_err(|e| e.error.to_string())?;
        let iova = dma.iova();
        let seen = dma.read::<u32>(0) == Some(u32::from_ne_bytes(*b"pcib"));
        dma.write_at(PAGE, b"back").ok_or("write")?;
        let buffer = backing.unmap_dma(dma).map_err(|e| e.to_string())?;
        let page: PageBuffer = buffer.into_memory().map_err(|_| "not the PageBuffer")?;
        Ok((
            iova,
            seen && &page[PAGE..PAGE + 4] == b"back" && fits(iova, 4 * PAGE),
        ))
    })();
    match round_trip {
        Ok((iova, ok)) => check(
            ok,
            format!("caller memory mapped at IOVA {iova:#x} and given back after unmap"),
        ),
        Err(e) => check(false, format!("caller memory: {e}")),
    }
    // 4. A pool of small blocks under the same constraints.
    let pool = DmaPool::new(backing.clone(), DmaPoolOptions::new(64).constraints(c));
    let blocks: Result<Vec<_>, _> = (0..100).map(|_| pool.alloc()).collect();
    match blocks {
        Ok(blocks) => {
            let ok = blocks
                .iter()
                .all(|b| b.iova().is_multiple_of(64) && b.iova() + 63 <= max);
            let (lo, hi) = (blocks[0].iova(), blocks[99].iova());
            check(
                ok,
                format!(
                    "100 pool blocks in {} chunk(s), IOVAs {lo:#x}..={hi:#x}",
                    pool.chunks()
                ),
            );
        }
        Err(e) => check(false, format!("pool: {e}")),
    }
    drop(pool);
    drop(held);
    let leaked = backing.device().container().leaked();
    check(leaked.is_empty(), format!("nothing leaked ({leaked:?})"));
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
