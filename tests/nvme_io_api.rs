//! The I/O queue's API as an SPDK user expects it (issue 15 §7), on the emulated
//! controller: completions that carry dword 0 and the whole status, software queueing when
//! the submission queue is full (in order, bounded, large requests split over time).

use std::time::Duration;

use pcibus::nvme::spec::{Completion, Status};
use pcibus::nvme::{Controller, IoCompletion, IoRequest, NvmeError, Options, Segment};
use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault};

mod common;
use common::{emu, pattern, quick, up};

// Rings the doorbell and waits until the controller fetched `n` I/O commands in all.
fn fetched(e: &EmulatedNvme, q: &mut pcibus::nvme::IoQueue<EmulatedNvme>, n: u64) {
    q.ring().unwrap();
    for _ in 0..10_000_000 {
        if e.stats().io_commands.values().sum::<u64>() >= n {
            return;
        }
        std::thread::yield_now();
    }
    panic!("the controller never fetched {n} I/O commands");
}

// Polls until `n` requests completed, collecting their completions.
fn collect(q: &mut pcibus::nvme::IoQueue<EmulatedNvme>, n: usize) -> Vec<IoCompletion> {
    let mut got = Vec::new();
    for _ in 0..10_000_000 {
        if got.len() >= n {
            break;
        }
        q.poll_completions(|c| got.push(c)).unwrap();
        std::thread::yield_now();
    }
    assert_eq!(got.len(), n, "completions: {got:?}");
    got
}

#[test]
fn a_completion_carries_the_whole_status_dnr_and_more_included() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    // LBA Out of Range, with More (bit 13) and Do Not Retry (bit 14).
    let status = Status(1 << 14 | 1 << 13 | 0x80);
    e.inject(Fault::Status {
        command: CommandMatch::AnyIo,
        status,
        count: 1,
    });
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 7).unwrap();
    let got = collect(&mut q, 1);
    let c0 = &got[0];
    assert_eq!(c0.tag, 7);
    assert_eq!(c0.status, Some(status));
    let s = c0.status.unwrap();
    assert!(s.dnr() && s.more(), "{s}");
    assert_eq!((s.sct(), s.sc()), (0, 0x80));
    match &c0.result {
        Err(NvmeError::Command { status: s, .. }) => assert_eq!(*s, status),
        other => panic!("{other:?}"),
    }
    // A plain success: status success, dword 0 as posted (0).
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 8).unwrap();
    let got = collect(&mut q, 1);
    assert!(got[0].result.is_ok());
    assert_eq!(got[0].status, Some(Status::SUCCESS));
    assert_eq!(got[0].cdw0, 0);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn a_completion_carries_dword_0() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    // The first command of a fresh queue gets command id 0; a made-up completion for it,
    // with a dword 0, arrives before the real one (which then finds the id free and is
    // ignored).
    e.inject(Fault::Forge(Completion {
        dw0: 0xdead_beef,
        dw1: 0,
        sq_head: 1,
        sq_id: q.qid(),
        cid: 0,
        status: 0,
    }));
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 3).unwrap();
    let got = collect(&mut q, 1);
    assert_eq!(got[0].tag, 3);
    assert!(got[0].result.is_ok(), "{:?}", got[0]);
    assert_eq!(got[0].cdw0, 0xdead_beef);
}

#[test]
fn poll_keeps_its_simple_form() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    q.submit(&IoRequest::write(1, 0, 8, &buf, 0), 1).unwrap();
    let mut got = None;
    while got.is_none() {
        q.poll(|tag, r| got = Some((tag, r.is_ok()))).unwrap();
    }
    assert_eq!(got, Some((1, true)));
}

#[test]
fn a_full_queue_queues_requests_in_software_in_submission_order() {
    // Depth 2: one command on the controller at a time; everything else waits in the
    // software queue. Writes and reads of one block alternate: in order, each read sees the
    // write just before it.
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(2).unwrap();
    assert_eq!(q.free_slots(), 1);
    let rounds = 6;
    let writes: Vec<_> = (0..rounds)
        .map(|i| {
            let b = c.alloc_buffer(4096).unwrap();
            b.write_at(0, &pattern(512, i as u8)).unwrap();
            b
        })
        .collect();
    let reads: Vec<_> = (0..rounds).map(|_| c.alloc_buffer(4096).unwrap()).collect();
    for i in 0..rounds {
        q.submit(&IoRequest::write(1, 5, 1, &writes[i], 0), 2 * i as u64)
            .unwrap();
        q.submit(&IoRequest::read(1, 5, 1, &reads[i], 0), 2 * i as u64 + 1)
            .unwrap();
    }
    assert_eq!(q.outstanding(), 2 * rounds);
    assert_eq!(q.queued(), 2 * rounds - 1);
    let got = collect(&mut q, 2 * rounds);
    let tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
    assert_eq!(tags, (0..2 * rounds as u64).collect::<Vec<_>>());
    assert!(got.iter().all(|c| c.result.is_ok()), "{got:?}");
    for (i, r) in reads.iter().enumerate() {
        let mut back = vec![0u8; 512];
        r.read_at(0, &mut back).unwrap();
        assert_eq!(back, pattern(512, i as u8), "read {i}");
    }
    assert_eq!(q.queued(), 0);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn a_request_larger_than_the_whole_queue_is_sent_as_slots_free() {
    // MDTS 8 KiB (2 pages), 3 slots: 1 MiB is 128 commands.
    let e = emu(EmuConfig {
        mdts: 1,
        shuffle_completions: Some(7),
        ..EmuConfig::default()
    });
    let c = up(&e);
    assert_eq!(c.info().max_transfer, 8192);
    let mut q = c.io_queue(4).unwrap();
    let len = 1 << 20;
    let data = pattern(len, 3);
    let w = c.alloc_buffer(len + 4096).unwrap();
    w.write_at(4, &data).unwrap();
    let r = c.alloc_buffer(len + 4096).unwrap();
    let blocks = (len / 512) as u64;
    q.submit(&IoRequest::write(1, 100, blocks, &w, 4), 1).unwrap();
    q.submit(&IoRequest::read(1, 100, blocks, &r, 4), 2).unwrap();
    let got = collect(&mut q, 2);
    assert_eq!(got.iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2]);
    assert!(got.iter().all(|c| c.result.is_ok()), "{got:?}");
    let mut back = vec![0u8; len];
    r.read_at(4, &mut back).unwrap();
    assert!(back == data, "the data read back differs");
    // The same through `run`.
    let r2 = c.alloc_buffer(len).unwrap();
    q.read(1, 100, blocks, &r2, 0).unwrap();
    r2.read_at(0, &mut back).unwrap();
    assert!(back == data[..len], "the data read back by run differs");
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn the_software_queue_is_bounded_and_can_be_turned_off() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(2).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::AnyIo,
        count: 1,
    });
    q.set_queue_limit(2);
    q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 0).unwrap();
    q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 1).unwrap();
    q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 2).unwrap();
    let err = q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 3).unwrap_err();
    assert!(
        matches!(
            err,
            NvmeError::QueueFull {
                queued: 2,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2 requests waiting"), "{err}");
    fetched(&e, &mut q, 1);
    e.release_stalled();
    let got = collect(&mut q, 3);
    assert!(got.iter().all(|c| c.result.is_ok()), "{got:?}");
    // Off: a request that does not fit fails at once, as it always did.
    q.set_queue_limit(0);
    e.inject(Fault::Stall {
        command: CommandMatch::AnyIo,
        count: 1,
    });
    q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 4).unwrap();
    let err = q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 5).unwrap_err();
    assert!(matches!(err, NvmeError::QueueFull { limit: 0, .. }), "{err}");
    fetched(&e, &mut q, 4);
    e.release_stalled();
    collect(&mut q, 1);
}

#[test]
fn queued_requests_end_once_when_the_controller_is_reset() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(2).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::NeverComplete {
        command: CommandMatch::AnyIo,
        count: 1,
    });
    for tag in 0..4 {
        q.submit(&IoRequest::read(1, 0, 1, &buf, 0), tag).unwrap();
    }
    // The first on the controller (swallowed), the rest waiting in software.
    fetched(&e, &mut q, 1);
    assert_eq!(q.queued(), 3);
    c.reset().unwrap();
    let got = collect(&mut q, 4);
    let mut tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, [0, 1, 2, 3]);
    assert!(
        got.iter()
            .all(|c| matches!(c.result, Err(NvmeError::Reset(_))) && c.status.is_none()),
        "{got:?}"
    );
    assert_eq!((q.outstanding(), q.queued()), (0, 0));
    // Nothing more comes; the queue works again.
    assert_eq!(q.poll_completions(|c| panic!("{c:?}")).unwrap(), 0);
    q.read(1, 0, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn a_request_sent_in_parts_that_times_out_sends_no_more_parts() {
    // MDTS 8 KiB and one slot: a 64 KiB read is 8 commands sent one at a time. The first
    // stalls past the timeout: the request ends with the timeout, its other 7 commands are
    // never sent, and the request behind it goes on once the stalled command ends.
    let e = emu(EmuConfig {
        mdts: 1,
        ..EmuConfig::default()
    });
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_secs(1),
            ..quick()
        },
    )
    .unwrap();
    let mut q = c.io_queue(2).unwrap();
    let big = c.alloc_buffer(64 * 1024).unwrap();
    let small = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::AnyIo,
        count: 1,
    });
    q.submit(&IoRequest::read(1, 0, 128, &big, 0), 1).unwrap();
    q.submit(&IoRequest::read(1, 0, 1, &small, 0), 2).unwrap();
    assert_eq!(q.queued(), 2);
    let got = collect(&mut q, 1);
    assert_eq!(got[0].tag, 1);
    assert!(matches!(got[0].result, Err(NvmeError::Timeout { .. })), "{got:?}");
    assert_eq!(got[0].status, None);
    assert_eq!(q.queued(), 1);
    e.release_stalled();
    let got = collect(&mut q, 1);
    assert_eq!(got[0].tag, 2);
    assert!(got[0].result.is_ok(), "{got:?}");
    let reads = e.stats().io_commands.get(&pcibus::nvme::spec::io::READ).copied();
    assert_eq!(reads, Some(2));
    assert_eq!((q.outstanding(), q.queued()), (0, 0));
    assert_eq!(e.stats().bad_dma, 0);
}

fn writes(e: &EmulatedNvme) -> u64 {
    let w = e.stats().io_commands.get(&pcibus::nvme::spec::io::WRITE).copied();
    w.unwrap_or(0)
}

#[test]
fn writev_and_readv_send_one_command_over_segments_prps_can_chain() {
    // 3,584 bytes ending on a page boundary, two whole pages, then 1,024 bytes from a page
    // start: one PRP list describes all of it, so one command.
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let (a, b, d) = (
        c.alloc_buffer(4096).unwrap(),
        c.alloc_buffer(8192).unwrap(),
        c.alloc_buffer(4096).unwrap(),
    );
    let data = pattern(3584 + 8192 + 1024, 9);
    a.write_at(512, &data[..3584]).unwrap();
    b.write_at(0, &data[3584..3584 + 8192]).unwrap();
    d.write_at(0, &data[3584 + 8192..]).unwrap();
    let segs = [
        Segment::new(&a, 512, 3584),
        Segment::new(&b, 0, 8192),
        Segment::new(&d, 0, 1024),
    ];
    let before = writes(&e);
    q.writev(1, 40, 25, &segs).unwrap();
    assert_eq!(writes(&e) - before, 1);
    // Read back into one buffer, and scattered into others.
    let whole = c.alloc_buffer(16384).unwrap();
    q.read(1, 40, 25, &whole, 0).unwrap();
    let mut back = vec![0u8; data.len()];
    whole.read_at(0, &mut back).unwrap();
    assert!(back == data);
    let (x, y) = (c.alloc_buffer(8192).unwrap(), c.alloc_buffer(12288).unwrap());
    q.readv(
        1,
        40,
        25,
        &[
            Segment::new(&x, 4096, 4096),
            Segment::new(&y, 0, data.len() - 4096),
        ],
    )
    .unwrap();
    let mut back = vec![0u8; data.len()];
    x.read_at(4096, &mut back[..4096]).unwrap();
    y.read_at(0, &mut back[4096..]).unwrap();
    assert!(back == data);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn segments_prps_cannot_chain_are_split_into_commands_at_their_boundary() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let (a, b) = (c.alloc_buffer(4096).unwrap(), c.alloc_buffer(4096).unwrap());
    // The first segment ends mid-page: two commands, one per segment.
    a.write_at(0, &pattern(512, 1)).unwrap();
    b.write_at(100, &pattern(1024, 2)).unwrap();
    let before = writes(&e);
    q.writev(1, 7, 3, &[Segment::new(&a, 0, 512), Segment::new(&b, 100, 1024)])
        .unwrap();
    assert_eq!(writes(&e) - before, 2);
    let whole = c.alloc_buffer(4096).unwrap();
    q.read(1, 7, 3, &whole, 0).unwrap();
    let mut back = vec![0u8; 1536];
    whole.read_at(0, &mut back).unwrap();
    assert_eq!(back[..512], pattern(512, 1)[..]);
    assert_eq!(back[512..], pattern(1024, 2)[..]);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn segments_that_neither_chain_nor_end_on_a_block_are_refused() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let (a, b) = (c.alloc_buffer(4096).unwrap(), c.alloc_buffer(4096).unwrap());
    // A boundary at byte 100 of the transfer: neither page aligned nor a block boundary.
    let err = q
        .writev(1, 0, 1, &[Segment::new(&a, 0, 100), Segment::new(&b, 0, 412)])
        .unwrap_err();
    assert!(matches!(err, NvmeError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("byte 100"), "{err}");
    // Lengths that do not add up to the blocks.
    let err = q.writev(1, 0, 2, &[Segment::new(&a, 0, 512)]).unwrap_err();
    assert!(matches!(err, NvmeError::Invalid(_)), "{err}");
    // Past the buffer's end.
    let err = q
        .readv(1, 0, 2, &[Segment::new(&a, a.len() - 96, 1024)])
        .unwrap_err();
    assert!(matches!(err, NvmeError::Invalid(_)), "{err}");
    assert_eq!(q.outstanding(), 0);
}

#[test]
fn a_vectored_request_larger_than_the_queue_goes_through_the_software_queue() {
    // MDTS 8 KiB, 3 slots: 64 KiB over 16 page-sized segments is 8 commands.
    let e = emu(EmuConfig {
        mdts: 1,
        ..EmuConfig::default()
    });
    let c = up(&e);
    let mut q = c.io_queue(4).unwrap();
    let bufs: Vec<_> = (0..16)
        .map(|i| {
            let b = c.alloc_buffer(4096).unwrap();
            b.write_at(0, &pattern(4096, i)).unwrap();
            b
        })
        .collect();
    let segs: Vec<_> = bufs.iter().map(|b| Segment::new(b, 0, 4096)).collect();
    q.writev(1, 1000, 128, &segs).unwrap();
    let whole = c.alloc_buffer(65536).unwrap();
    q.read(1, 1000, 128, &whole, 0).unwrap();
    for i in 0..16 {
        let mut back = vec![0u8; 4096];
        whole.read_at(i * 4096, &mut back).unwrap();
        assert_eq!(back, pattern(4096, i as u8), "segment {i}");
    }
    assert_eq!(e.stats().bad_dma, 0);
}

// Issue 15 §7: memory the application owns, registered as SPDK's spdk_mem_register does,
// carries reads and writes like a buffer of the driver's, and comes back only once no
// command can use it.
#[test]
fn caller_memory_registered_with_the_controller_carries_io_and_comes_back() {
    use pcibus::vfio::{DmaBuffer, PageBuffer, cpu_page_size};
    // Caller memory is whole CPU pages (4 KiB here, 64 KiB on some aarch64 kernels).
    let page_size = cpu_page_size();
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let mut page = PageBuffer::new(2 * page_size).unwrap();
    let data = pattern(page_size, 7);
    page[..page_size].copy_from_slice(&data);
    let vaddr = page.as_ptr() as u64;
    let buffer = c.register_buffer(DmaBuffer::from_memory(page).unwrap()).unwrap();
    // Out from the first page, back into the second.
    q.write(1, 0, (page_size / 512) as u64, &buffer, 0).unwrap();
    q.read(1, 0, (page_size / 512) as u64, &buffer, page_size)
        .unwrap();
    // Not while anything else holds it: a clone here (a queue's abandoned command alike).
    let clone = std::sync::Arc::clone(&buffer);
    let (err, back) = c.unregister_buffer(clone).unwrap_err();
    assert!(err.to_string().contains("still held"), "{err}");
    drop(back);
    let page: PageBuffer = c.unregister_buffer(buffer).unwrap().into_memory().unwrap();
    assert_eq!(page.as_ptr() as u64, vaddr, "the application's own pages");
    assert_eq!(&page[page_size..], &data[..], "what the controller read back");
    assert_eq!(e.stats().bad_dma, 0);
}
