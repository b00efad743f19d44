//! Memory barriers between the CPU and a device: one function per ordering a driver needs
//! (writes before a doorbell, the phase bit before the rest of a completion, a shadow
//! doorbell before its event index), with a body per architecture.
//!
//! Rust's [`fence`] orders memory for other *CPUs* only: on aarch64 `fence(Release)` and
//! `fence(SeqCst)` are `dmb ish` (inner shareable domain), which a device's DMA master, in
//! the outer shareable domain, need not observe in order. Drivers therefore use the
//! functions below, never `fence`, for anything a device observes.
//!
//! # The barriers, and who uses the same ones
//!
//! | function | orders | x86-64 | aarch64 | Linux | SPDK (aarch64) |
//! |---|---|---|---|---|---|
//! | [`dma_wmb`] | earlier stores to DMA memory before later stores to DMA memory or registers | none (compiler) | `dmb oshst` | `dma_wmb`, and the barrier `writel` implies | `spdk_wmb` = `dsb st` |
//! | [`dma_rmb`] | an earlier load of DMA memory before later loads of it | none (compiler) | `dmb oshld` | `dma_rmb` after the phase bit | `dmb oshld` after the phase bit |
//! | [`dma_mb`] | earlier loads and stores before later stores (completions read before their head is released) | none (compiler) | `dmb osh` | `writel` of the CQ head (`dma_wmb`) | nothing before the CQ head |
//! | [`wmb`] | every earlier store before every later store, completed | none (compiler) | `dsb st` | `wmb` before a shadow doorbell | `spdk_wmb` before a shadow doorbell |
//! | [`mb`] | every earlier access before every later one, stores before loads included | `mfence` | `dsb sy` | `mb` between a shadow doorbell and its event index | `spdk_mb` there |
//!
//! - **x86-64.** Stores are seen in program order by every observer, loads are not
//!   reordered with loads, and stores to uncached memory (vfio-pci maps BARs uncached) are
//!   not reordered with earlier stores to write-back memory; only a later load may pass an
//!   earlier store. So every barrier but [`mb`] needs no instruction, only the compiler's
//!   ordering, as Linux's `dma_wmb`/`dma_rmb` and `writel` (a plain `mov`) on x86-64. Linux
//!   and SPDK make `wmb` an `sfence`, for non-temporal stores and write-combining mappings:
//!   this crate makes neither, so [`wmb`] is the compiler's ordering too. [`mb`] orders a
//!   store before a later load and must be a real fence (`mfence`, as Linux's `mb` and
//!   SPDK's `spdk_mb`).
//! - **aarch64.** The `osh` barriers cover the outer shareable domain, where PCIe devices
//!   are. Linux's `writel` is `dma_wmb` (`dmb oshst`) and a store; SPDK uses the stronger
//!   `dsb st` before its doorbells. [`dma_wmb`] follows Linux. [`dma_mb`] adds loads to
//!   [`dma_wmb`] for the CQ head doorbell: completion entries must be read before the
//!   controller is told it may overwrite them (Linux relies on `writel`'s `dmb oshst`
//!   there, which orders stores only). [`wmb`] and [`mb`] are `dsb` as in Linux and SPDK.
//!   The bodies are `asm!` (with the default `memory` clobber, so the compiler neither moves
//!   memory accesses across them nor assumes memory unchanged).
//!
//!   **What has run them.** `tests/aarch64/run` (see `tests/aarch64/README.md`) builds the
//!   crate's tests for `aarch64-unknown-linux-gnu` with Debian's cross linker and runs them
//!   under qemu-user (`qemu-aarch64`): the library's unit tests (this module's own test
//!   among them) and the NVMe driver's tests against the emulated controller, whose thread
//!   answers the driver's doorbells, so the barriers and the atomics between the two
//!   threads execute as aarch64 code. The script then checks the instructions in the
//!   `nvme_driver` test binary with `objdump` (`dmb oshst` in the SQ doorbell write,
//!   `dmb oshld` after the phase bit, `dmb osh` before the CQ head doorbell, `dsb st` and
//!   `dsb sy` around the shadow doorbell) and, from qemu's log of the code it translates,
//!   that one test executes all five. `--page-size 65536` (or `16384`) runs the library
//!   and NVMe tests with the guest told its pages are that size.
//!
//!   **What that does not prove.** qemu-user translates aarch64 code into x86-64 code that
//!   runs with the host's ordering (TSO), so these runs show that the aarch64 code is
//!   correct in program order, not that the barriers are strong enough: a missing or too
//!   weak one passes there too. That rests on the architecture's rules and the choices of
//!   Linux and SPDK above, until aarch64 hardware with a PCIe device runs the driver.
//! - **Elsewhere.** A sequentially consistent [`fence`]: correct wherever Rust's fences
//!   also order device observers (the platform's usual strongest barrier), and a place to
//!   add a precise body when the crate runs there.
//!
//! On x86-64 the bodies are Rust fences that emit no instruction (`Release`, `Acquire`,
//! `AcqRel`) rather than compiler fences, so that a device emulated by another thread of
//! the same process (the `testing` feature's NVMe controller) is also ordered by the
//! language's rules, not only by the hardware's.
#![allow(unsafe_code)]

#[cfg(not(target_arch = "aarch64"))]
use std::sync::atomic::{Ordering, fence};

/// Orders earlier stores to DMA memory before later stores to DMA memory or device
/// registers: a submission entry before the doorbell (MMIO or shadow) that publishes it.
#[inline(always)]
pub fn dma_wmb() {
    #[cfg(target_arch = "x86_64")]
    fence(Ordering::Release);
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: a barrier instruction: it changes no memory or register the compiler
        // relies on (no stack, flags kept), and has no precondition.
        unsafe { core::arch::asm!("dmb oshst", options(nostack, preserves_flags)) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fence(Ordering::SeqCst);
}

/// Orders an earlier load of DMA memory before later loads of it: a completion's phase
/// bit before the rest of the entry.
#[inline(always)]
pub fn dma_rmb() {
    #[cfg(target_arch = "x86_64")]
    fence(Ordering::Acquire);
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as in `dma_wmb`: a barrier instruction without preconditions.
        unsafe { core::arch::asm!("dmb oshld", options(nostack, preserves_flags)) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fence(Ordering::SeqCst);
}

/// Orders earlier loads and stores of DMA memory before later stores to DMA memory or
/// device registers: completion entries read before the CQ head doorbell releases them.
#[inline(always)]
pub fn dma_mb() {
    #[cfg(target_arch = "x86_64")]
    fence(Ordering::AcqRel);
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as in `dma_wmb`: a barrier instruction without preconditions.
        unsafe { core::arch::asm!("dmb osh", options(nostack, preserves_flags)) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fence(Ordering::SeqCst);
}

/// Orders every earlier store before every later store, and (on aarch64) waits for them
/// to complete: before a shadow doorbell update, as Linux and SPDK do.
#[inline(always)]
pub fn wmb() {
    #[cfg(target_arch = "x86_64")]
    fence(Ordering::Release);
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as in `dma_wmb`: a barrier instruction without preconditions.
        unsafe { core::arch::asm!("dsb st", options(nostack, preserves_flags)) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fence(Ordering::SeqCst);
}

/// Orders every earlier load and store before every later one, a store before a later
/// load included: a shadow doorbell write before the read of its event index (the
/// controller orders the reverse).
#[inline(always)]
pub fn mb() {
    #[cfg(not(target_arch = "aarch64"))]
    fence(Ordering::SeqCst);
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as in `dma_wmb`: a barrier instruction without preconditions.
        unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
    }
}

#[cfg(test)]
mod tests {
    // The barriers have no observable effect on one thread; what can be checked is that
    // each runs (the asm assembles and executes on this architecture).
    #[test]
    fn every_barrier_runs() {
        super::dma_wmb();
        super::dma_rmb();
        super::dma_mb();
        super::wmb();
        super::mb();
    }
}
