//! SGLs for vectored requests, where the controller offers them (Identify Controller
//! SGLS bits 1:0 01b or 10b).
//!
//! PRPs describe a command's data as pages: every piece but the first must start on a
//! page, every one but the last end on one, so segments that do not (an application's
//! 512-byte pieces at any dword offset) cost a command each, or cannot be sent when the
//! boundary is not on a block. An SGL describes any run of (address, length) pieces. As
//! SPDK does, the driver keeps PRPs where they express the request (cheaper for the
//! controller, and the only choice for a single contiguous buffer that costs nothing to
//! describe either way), and uses SGLs only for a vectored request PRPs would cut.
//!
//! A command's SGL: one piece is a Data Block descriptor in the data pointer itself;
//! more are Data Block descriptors in the command slot's own list page (the page its PRP
//! list would use), named by a Last Segment descriptor in the data pointer. A page holds
//! [`MAX_DESCRIPTORS`]; a request with more pieces per command is cut at a block boundary
//! (see `Plan::cut`). The list page is queue memory, kept with the ring under the same
//! rule as PRP lists (`owned.rs`): released only with the queue, after its deletion or
//! the controller's disable.
//!
//! Dword alignment (SGLS 10b) is always met: segments start and end dword aligned, and
//! commands are cut on blocks. Metadata SGLs (PSDT 10b) are not used: the driver sends no
//! separate metadata.
//!
//! Not built, on purpose: chained segments (a Segment descriptor naming a second list
//! page) and Bit Bucket descriptors. Cutting at a block boundary always succeeds, since
//! dword-aligned pieces put at most 128 of them in a 512-byte block, so chains would only
//! save commands for requests of more than [`MAX_DESCRIPTORS`] pieces, at the price of
//! list pages allocated per command; SPDK's PCIe transport likewise keeps one segment of at
//! most 250 descriptors per command and splits longer requests into child requests. A Bit Bucket (data read and dropped) has no
//! caller in the API: a read into a buffer the application ignores does the same.

use crate::bus::backing::DmaMemory;
use crate::nvme::controller::PAGE;
use crate::nvme::owned::SharedDma;
use crate::nvme::spec::Command;
use crate::nvme::spec::sgl::{DATA_BLOCK, DESCRIPTOR_SIZE, LAST_SEGMENT, PSDT_SGL, descriptor, dptr};

/// Descriptors a command's list page holds.
pub(super) const MAX_DESCRIPTORS: usize = PAGE as usize / DESCRIPTOR_SIZE;

/// Sets `cmd`'s data pointer to an SGL of `pieces` (IOVA, bytes; at most
/// [`MAX_DESCRIPTORS`], each under 4 GiB as the transfer limit makes them), writing the
/// list into slot `cmd.cid`'s page of `list` when there is more than one.
pub(super) fn fill<D: DmaMemory>(cmd: &mut Command, list: &SharedDma<D>, pieces: &[(u64, u64)]) {
    cmd.flags = cmd.flags & !crate::nvme::spec::sgl::PSDT_MASK | PSDT_SGL;
    if let [(iova, len)] = pieces {
        (cmd.prp1, cmd.prp2) = dptr(*iova, *len as u32, DATA_BLOCK);
        return;
    }
    let page = usize::from(cmd.cid) * PAGE as usize;
    for (i, &(iova, len)) in pieces.iter().enumerate() {
        let _ = list.write_at(
            page + i * DESCRIPTOR_SIZE,
            &descriptor(iova, len as u32, DATA_BLOCK),
        );
    }
    let bytes = (pieces.len() * DESCRIPTOR_SIZE) as u32;
    (cmd.prp1, cmd.prp2) = dptr(list.iova() + page as u64, bytes, LAST_SEGMENT);
}
