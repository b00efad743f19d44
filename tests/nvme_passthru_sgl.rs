//! I/O passthrough and SGLs (issue 15 §7), on the emulated controller: a raw I/O command
//! completes through the queue's own poll with dword 0 and status, its data pointer built
//! by the driver; vectored requests PRPs cannot express go as one command with SGLs where
//! the controller offers them.

use pcibus::nvme::spec::{Status, io};
use pcibus::nvme::{IoPassthru, NvmeError, PassthruData};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme, NamespaceConfig};

mod common;
use common::{emu, pattern, up};

fn io_count(e: &EmulatedNvme, opcode: u8) -> u64 {
    e.stats().io(opcode)
}

// A Read or Write passthrough of `blocks` blocks at `lba`.
fn rw(opcode: u8, lba: u64, blocks: u32) -> IoPassthru {
    let mut cmd = IoPassthru::new(opcode, 1);
    cmd.cdw[0] = lba as u32;
    cmd.cdw[1] = (lba >> 32) as u32;
    cmd.cdw[2] = blocks - 1;
    cmd
}

#[test]
fn a_passthrough_write_and_read_move_the_data_through_prps_the_driver_builds() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    // 9 blocks from offset 512: three pages touched, so a PRP list.
    let buf = c.alloc_buffer(16384).unwrap();
    let data = pattern(9 * 512, 5);
    buf.write_at(512, &data).unwrap();
    let done = q
        .passthru(
            &rw(io::WRITE, 100, 9),
            Some(PassthruData::to_device(&buf, 512, data.len())),
        )
        .unwrap();
    assert!(done.result.is_ok(), "{done:?}");
    assert_eq!((done.cdw0, done.status), (0, Some(Status::SUCCESS)));
    assert_eq!(e.namespace_read(1, 100 * 512, data.len()).unwrap(), data);
    let back = c.alloc_buffer(8192).unwrap();
    let done = q
        .passthru(
            &rw(io::READ, 100, 9),
            Some(PassthruData::from_device(&back, 4, data.len())),
        )
        .unwrap();
    assert!(done.result.is_ok(), "{done:?}");
    let mut got = vec![0u8; data.len()];
    back.read_at(4, &mut got).unwrap();
    assert_eq!(got, data);
    // A command without data (Flush).
    let done = q.passthru(&IoPassthru::new(io::FLUSH, 1), None).unwrap();
    assert!(done.result.is_ok(), "{done:?}");
    assert_eq!(
        (
            io_count(&e, io::WRITE),
            io_count(&e, io::READ),
            io_count(&e, io::FLUSH)
        ),
        (1, 1, 1)
    );
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn a_failed_passthrough_command_returns_its_completion() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    // An opcode the controller does not know.
    let done = q.passthru(&IoPassthru::new(0x7c, 1), None).unwrap();
    assert_eq!(done.status, Some(Status::INVALID_OPCODE));
    assert!(matches!(done.result, Err(NvmeError::Command { .. })), "{done:?}");
    // Through poll_completions, among other requests, with its tag.
    let buf = c.alloc_buffer(4096).unwrap();
    q.submit_passthru(
        &rw(io::READ, 1 << 40, 1),
        Some(PassthruData::from_device(&buf, 0, 512)),
        11,
    )
    .unwrap();
    q.submit(&pcibus::nvme::IoRequest::read(1, 0, 1, &buf, 512), 12)
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        q.poll_completions(|c| got.push(c)).unwrap();
        std::thread::yield_now();
    }
    got.sort_by_key(|c| c.tag);
    assert_eq!(got[0].tag, 11);
    assert_eq!(got[0].status, Some(Status::LBA_OUT_OF_RANGE));
    assert!(got[1].result.is_ok());
}

#[test]
fn passthrough_arguments_are_checked_before_anything_is_sent() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    let read = rw(io::READ, 0, 1);
    // Past the buffer, misaligned, empty.
    for (offset, len) in [(buf.len() - 512, 1024), (2, 512), (0, 0)] {
        let err = q
            .submit_passthru(&read, Some(PassthruData::from_device(&buf, offset, len)), 0)
            .unwrap_err();
        assert!(matches!(err, NvmeError::Invalid(_)), "{err}");
    }
    // Against the opcode's direction: a Read (bits 1:0 = 10b) given data to send.
    let err = q
        .submit_passthru(&read, Some(PassthruData::to_device(&buf, 0, 512)), 0)
        .unwrap_err();
    assert!(err.to_string().contains("controller to host"), "{err}");
    // More than MDTS (512 KiB).
    let big = c.alloc_buffer(1 << 20).unwrap();
    let err = q
        .submit_passthru(&read, Some(PassthruData::from_device(&big, 0, 1 << 20)), 0)
        .unwrap_err();
    assert!(err.to_string().contains("at most 524288"), "{err}");
    assert_eq!(q.outstanding(), 0);
    assert_eq!(e.stats().io_commands.values().sum::<u64>(), 0);
}

#[test]
fn passthrough_to_a_namespace_with_separate_metadata_is_refused() {
    // Its metadata would go to MPTR, which passthrough commands do not carry.
    let e = emu(EmuConfig {
        namespaces: vec![NamespaceConfig {
            metadata_size: 16,
            ..NamespaceConfig::new(1024, 512)
        }],
        ..EmuConfig::default()
    });
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    let err = q
        .submit_passthru(
            &rw(io::READ, 0, 1),
            Some(PassthruData::from_device(&buf, 0, 512)),
            0,
        )
        .unwrap_err();
    assert!(matches!(err, NvmeError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("metadata"), "{err}");
    assert_eq!(e.stats().io_commands.values().sum::<u64>(), 0);
}

// ---- SGLs for vectored requests

use pcibus::nvme::Segment;

fn sgl_emu() -> EmulatedNvme {
    emu(EmuConfig {
        sgl: true,
        ..EmuConfig::default()
    })
}

#[test]
fn segments_prps_cannot_express_go_as_one_command_with_sgls_where_offered() {
    let e = sgl_emu();
    let c = up(&e);
    assert!(pcibus::nvme::spec::sgl::supported(c.info().identify.sgls));
    let mut q = c.io_queue(8).unwrap();
    let (a, b) = (c.alloc_buffer(4096).unwrap(), c.alloc_buffer(4096).unwrap());
    // The first segment ends mid-page: PRPs need two commands (tests/nvme_io_api.rs).
    a.write_at(0, &pattern(512, 1)).unwrap();
    b.write_at(100, &pattern(1024, 2)).unwrap();
    q.writev(1, 7, 3, &[Segment::new(&a, 0, 512), Segment::new(&b, 100, 1024)])
        .unwrap();
    assert_eq!((io_count(&e, io::WRITE), e.stats().sgl_commands), (1, 1));
    let mut want = pattern(512, 1);
    want.extend(pattern(1024, 2));
    assert_eq!(e.namespace_read(1, 7 * 512, 1536).unwrap(), want);
    // A boundary neither on a page nor on a block: PRPs refuse it; one SGL command reads
    // it, into three segments.
    let (x, y) = (c.alloc_buffer(4096).unwrap(), c.alloc_buffer(8192).unwrap());
    q.readv(
        1,
        7,
        3,
        &[
            Segment::new(&x, 4, 100),
            Segment::new(&y, 4000, 900),
            Segment::new(&x, 1000, 536),
        ],
    )
    .unwrap();
    assert_eq!((io_count(&e, io::READ), e.stats().sgl_commands), (1, 2));
    let mut back = vec![0u8; 1536];
    x.read_at(4, &mut back[..100]).unwrap();
    y.read_at(4000, &mut back[100..1000]).unwrap();
    x.read_at(1000, &mut back[1000..]).unwrap();
    assert_eq!(back, want);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn more_segments_than_one_sgl_page_holds_are_cut_at_a_block_boundary() {
    // 300 segments of 512 bytes at offset 4 (none chains in PRPs): 256 descriptors fit a
    // command's list page, so two commands.
    let e = sgl_emu();
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let bufs: Vec<_> = (0..300)
        .map(|i| {
            let b = c.alloc_buffer(1024).unwrap();
            b.write_at(4, &pattern(512, i as u8)).unwrap();
            b
        })
        .collect();
    let segs: Vec<_> = bufs.iter().map(|b| Segment::new(b, 4, 512)).collect();
    q.writev(1, 0, 300, &segs).unwrap();
    assert_eq!((io_count(&e, io::WRITE), e.stats().sgl_commands), (2, 2));
    for i in [0usize, 255, 256, 299] {
        assert_eq!(
            e.namespace_read(1, i as u64 * 512, 512).unwrap(),
            pattern(512, i as u8),
            "{i}"
        );
    }
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn requests_prps_can_express_keep_prps_with_sgls_offered() {
    let e = sgl_emu();
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(16384).unwrap();
    q.write(1, 0, 20, &buf, 512).unwrap();
    q.read(1, 0, 20, &buf, 4).unwrap();
    let (a, b) = (c.alloc_buffer(4096).unwrap(), c.alloc_buffer(4096).unwrap());
    q.writev(1, 0, 9, &[Segment::new(&a, 512, 3584), Segment::new(&b, 0, 1024)])
        .unwrap();
    assert_eq!(e.stats().sgl_commands, 0);
    assert_eq!(io_count(&e, io::WRITE) + io_count(&e, io::READ), 3);
}

#[test]
fn without_sgl_support_segments_are_split_or_refused_as_before() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    assert!(!pcibus::nvme::spec::sgl::supported(c.info().identify.sgls));
    let mut q = c.io_queue(8).unwrap();
    let (a, b) = (c.alloc_buffer(4096).unwrap(), c.alloc_buffer(4096).unwrap());
    q.writev(1, 7, 3, &[Segment::new(&a, 0, 512), Segment::new(&b, 100, 1024)])
        .unwrap();
    assert_eq!((io_count(&e, io::WRITE), e.stats().sgl_commands), (2, 0));
    let err = q
        .writev(1, 0, 1, &[Segment::new(&a, 0, 100), Segment::new(&b, 0, 412)])
        .unwrap_err();
    assert!(matches!(err, NvmeError::Invalid(_)), "{err}");
}
