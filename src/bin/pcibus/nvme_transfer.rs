//! `pcibus nvme read` and `write` of any size: the transfer is cut into requests of one
//! command each (the controller's largest transfer), submitted while the queue has free
//! slots and polled as they complete, so a transfer larger than what the queue holds at
//! once (7 × 512 KiB on a depth-8 queue) goes through instead of failing "queue full".

use std::time::{Duration, Instant};

use pcibus::bus::DeviceBacking;
use pcibus::nvme::{Buffer, Controller, IoQueue, IoRequest, NvmeError, Op};

type Error = Box<dyn std::error::Error>;

/// Entries of the queue a transfer uses.
const QUEUE_DEPTH: u16 = 32;

/// The requests of a transfer of `blocks` blocks of `block_size` bytes at `lba`, at most
/// `per_request` blocks each: (first block, blocks, byte offset in the buffer).
pub(super) fn chunks(
    lba: u64,
    blocks: u64,
    per_request: u64,
    block_size: u64,
) -> impl Iterator<Item = (u64, u64, usize)> {
    let per_request = per_request.max(1);
    (0..blocks.div_ceil(per_request)).map(move |i| {
        let first = i * per_request;
        let n = per_request.min(blocks - first);
        (lba + first, n, (first * block_size) as usize)
    })
}

// Runs `op` (Read or Write) over `blocks` blocks at `lba` of namespace `nsid` with
// `buffer`, in requests of one command each, keeping the queue as full as it goes.
fn transfer<B: DeviceBacking>(
    c: &Controller<B>,
    q: &mut IoQueue<B>,
    op: Op,
    nsid: u32,
    lba: u64,
    blocks: u64,
    buffer: &Buffer<B>,
) -> Result<(), Error> {
    let bs = u64::from(
        c.namespace(nsid)
            .ok_or_else(|| format!("no namespace {nsid}"))?
            .block_size,
    );
    let per_request = (c.info().max_transfer / bs).max(1);
    let mut pending = chunks(lba, blocks, per_request, bs).peekable();
    let mut failed: Option<NvmeError> = None;
    let mut idle_since: Option<Instant> = None;
    loop {
        while failed.is_none() && q.free_slots() > 0 {
            let Some((at, n, offset)) = pending.next() else {
                break;
            };
            let request = IoRequest {
                op,
                nsid,
                lba: at,
                blocks: n,
                buffer: Some((buffer, offset)),
            };
            q.submit(&request, at)?;
        }
        if q.outstanding() == 0 && (failed.is_some() || pending.peek().is_none()) {
            break;
        }
        let polled = q.poll(|at, r| {
            if let Err(e) = r
                && failed.is_none()
            {
                failed = Some(match e {
                    NvmeError::Command { command, status } => NvmeError::Command {
                        command: format!("{command} at LBA {at}"),
                        status,
                    },
                    e => e,
                });
            }
        });
        let n = match polled {
            // The controller's recovery backs off: its reset ends what is outstanding.
            Err(NvmeError::RecoveryPending { retry_in, .. }) => {
                std::thread::sleep(retry_in.min(Duration::from_millis(10)));
                continue;
            }
            other => other?,
        };
        // Spin while completions come; yield the CPU when they do not for a while.
        if n > 0 {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(1) {
            std::thread::yield_now();
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Reads `blocks` blocks at `lba` of namespace `nsid`.
// Namespace `nsid` and a check that `blocks` blocks from `lba` lie within it, named by the
// command's arguments; before any buffer is allocated or command sent.
fn namespace_range<B: DeviceBacking>(
    c: &Controller<B>,
    nsid: u32,
    lba: u64,
    blocks: u64,
) -> Result<pcibus::nvme::Namespace, Error> {
    let ns = c
        .namespace(nsid)
        .ok_or_else(|| format!("--nsid {nsid}: the controller has no such namespace"))?;
    if lba.checked_add(blocks).is_none_or(|end| end > ns.blocks) {
        return Err(format!(
            "--lba {lba}, {blocks} blocks: beyond namespace {nsid}, which has {} blocks",
            ns.blocks
        )
        .into());
    }
    Ok(ns)
}

pub(super) fn read_blocks<B: DeviceBacking>(
    c: &Controller<B>,
    nsid: u32,
    lba: u64,
    blocks: u64,
) -> Result<Vec<u8>, Error> {
    let ns = namespace_range(c, nsid, lba, blocks)?;
    let len = usize::try_from(
        blocks
            .checked_mul(u64::from(ns.block_size))
            .ok_or("too many blocks")?,
    )?;
    let buf = c.alloc_buffer(len)?;
    let mut q = c.io_queue(QUEUE_DEPTH)?;
    transfer(c, &mut q, Op::Read, nsid, lba, blocks, &buf)?;
    let mut data = vec![0u8; len];
    buf.read_at(0, &mut data).ok_or("buffer read out of range")?;
    Ok(data)
}

/// Writes `data` at `lba` of namespace `nsid`, padded with zeroes to whole blocks, then
/// flushes. Returns the blocks written and the block size.
pub(super) fn write_blocks<B: DeviceBacking>(
    c: &Controller<B>,
    nsid: u32,
    lba: u64,
    data: &[u8],
) -> Result<(u64, usize), Error> {
    let bs = c
        .namespace(nsid)
        .ok_or_else(|| format!("--nsid {nsid}: the controller has no such namespace"))?
        .block_size as usize;
    let blocks = data.len().div_ceil(bs);
    namespace_range(c, nsid, lba, blocks as u64)?;
    let buf = c.alloc_buffer(blocks * bs)?;
    buf.write_at(0, data).ok_or("buffer write out of range")?;
    let mut q = c.io_queue(QUEUE_DEPTH)?;
    transfer(c, &mut q, Op::Write, nsid, lba, blocks as u64, &buf)?;
    q.flush(nsid)?;
    Ok((blocks as u64, bs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcibus::nvme::Options;
    use pcibus::nvme::spec::{Status, io};
    use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault, NamespaceConfig};

    fn controller() -> (EmulatedNvme, Controller<EmulatedNvme>) {
        let e = EmulatedNvme::new(EmuConfig {
            // 16 MiB of 512-byte blocks.
            namespaces: vec![NamespaceConfig::new(32768, 512)],
            ..EmuConfig::default()
        })
        .unwrap();
        let options = Options {
            admin_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            ..Options::default()
        };
        let c = Controller::init(e.clone(), &options).unwrap();
        (e, c)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8)
            .collect()
    }

    // An LBA range beyond the namespace is refused by name before any buffer is allocated
    // or command sent (a huge --blocks used to be allocated first).
    #[test]
    fn ranges_beyond_the_namespace_are_refused_before_any_io() {
        let (e, c) = controller();
        let before = e.stats().io(io::READ) + e.stats().io(io::WRITE);
        for (lba, blocks) in [
            (0, 32769),
            (32768, 1),
            (32760, 9),
            (u64::MAX, 2),
            (1, u64::MAX / 2),
        ] {
            let err = read_blocks(&c, 1, lba, blocks).unwrap_err().to_string();
            assert!(
                err.contains("--lba") && err.contains("32768 blocks"),
                "{lba} {blocks}: {err}"
            );
        }
        let err = write_blocks(&c, 1, 32768, &[1u8; 512]).unwrap_err().to_string();
        assert!(
            err.contains("--lba 32768") && err.contains("32768 blocks"),
            "{err}"
        );
        let err = write_blocks(&c, 1, 32767, &[1u8; 1024]).unwrap_err().to_string();
        assert!(err.contains("2 blocks"), "{err}");
        let err = read_blocks(&c, 7, 0, 1).unwrap_err().to_string();
        assert!(err.contains("--nsid 7"), "{err}");
        assert_eq!(e.stats().io(io::READ) + e.stats().io(io::WRITE), before);
        // The last block is in range.
        read_blocks(&c, 1, 32767, 1).unwrap();
    }

    #[test]
    fn chunks_cover_the_range_in_order() {
        let c: Vec<_> = chunks(10, 2500, 1024, 512).collect();
        assert_eq!(
            c,
            [(10, 1024, 0), (1034, 1024, 1024 * 512), (2058, 452, 2048 * 512)]
        );
        assert_eq!(chunks(0, 0, 8, 512).count(), 0);
        assert_eq!(chunks(0, 3, 0, 4096).collect::<Vec<_>>().len(), 3);
    }

    #[test]
    fn one_request_larger_than_the_queue_needs_the_software_queue() {
        // What the CLI did before: one request for the whole transfer. Without the
        // library's software queue it fails; with it (the default) it goes through.
        let (_e, c) = controller();
        let buf = c.alloc_buffer(8 << 20).unwrap();
        let mut q = c.io_queue(8).unwrap();
        q.set_queue_limit(0);
        let e = q.write(1, 0, 16384, &buf, 0).unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        q.set_queue_limit(pcibus::nvme::DEFAULT_QUEUE_LIMIT);
        q.write(1, 0, 16384, &buf, 0).unwrap();
    }

    #[test]
    fn transfers_larger_than_the_queue_go_through() {
        let (e, c) = controller();
        // 9 MiB and a partial block: 18 commands of 512 KiB, more than a queue holds.
        let data = pattern((9 << 20) + 100);
        let (blocks, bs) = write_blocks(&c, 1, 16, &data).unwrap();
        assert_eq!((blocks, bs), (18433, 512));
        assert_eq!(e.namespace_read(1, 16 * 512, data.len()).unwrap(), data);
        let back = read_blocks(&c, 1, 16, blocks).unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
        assert!(back[data.len()..].iter().all(|&b| b == 0));
        assert_eq!(e.stats().io(io::WRITE), 19);
        assert_eq!(e.stats().bad_dma, 0);
    }

    #[test]
    fn a_failed_chunk_fails_the_transfer_after_the_others_ended() {
        let (e, c) = controller();
        e.inject(Fault::Status {
            command: CommandMatch::Io(io::READ),
            status: Status::DATA_TRANSFER_ERROR,
            count: 1,
        });
        let err = read_blocks(&c, 1, 0, 8192).unwrap_err().to_string();
        assert!(err.contains("Read") && err.contains("at LBA 0"), "{err}");
        assert_eq!(e.stats().bad_dma, 0);
    }
}
