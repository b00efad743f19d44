//! The in-tree NVMe driver on the emulated controller (`testing::nvme`): bring-up, every
//! I/O command, PRP lists and MDTS splits, batched and shadow doorbells, interrupts, and
//! every fault the emulator injects. Whatever happens, the driver returns errors (never
//! panics, never hangs) and never makes the controller touch memory outside its DMA
//! buffers (`bad_dma` stays 0).

use std::time::{Duration, Instant};

use pcibus::bus::DeviceBacking;
use pcibus::nvme::spec::{self, Status, admin, io};
use pcibus::nvme::{Controller, IoRequest, NvmeError, Op, Options};
use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault, NamespaceConfig};
use proptest::prelude::*;

mod common;
use common::{emu, pattern, quick, short_io_timeout, up, up_with_interrupts};

#[test]
fn brings_the_controller_up_and_identifies_it() {
    let e = emu(EmuConfig {
        namespaces: vec![NamespaceConfig::new(4096, 512), NamespaceConfig::new(1024, 4096)],
        ..EmuConfig::default()
    });
    let c = up(&e);
    let info = c.info();
    assert_eq!(info.identify.model, "pcibus emulated NVMe");
    assert_eq!(info.identify.serial, "EMU0001");
    assert_eq!(info.max_transfer, 512 * 1024);
    assert_eq!(info.io_queues, 64);
    assert!(info.shadow_doorbells);
    let ns: Vec<(u32, u64, u32)> = c
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.blocks, n.block_size))
        .collect();
    assert_eq!(ns, [(1, 4096, 512), (2, 1024, 4096)]);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn reads_writes_and_the_rest_reach_the_namespace() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(64).unwrap();
    // 1 MiB: two MDTS-sized commands, each with a PRP list; at an odd (dword) offset in the
    // buffer so PRP1 carries an offset.
    let data = pattern(1 << 20, 7);
    let buf = c.alloc_buffer((1 << 20) + 4096).unwrap();
    buf.write_at(4, &data).unwrap();
    let before = e.stats().io(io::WRITE);
    q.write(1, 100, 2048, &buf, 4).unwrap();
    assert_eq!(e.stats().io(io::WRITE) - before, 2, "split at MDTS (512 KiB)");
    assert_eq!(e.namespace_read(1, 100 * 512, 1 << 20).unwrap(), data);
    let back = c.alloc_buffer(1 << 20).unwrap();
    q.read(1, 100, 2048, &back, 0).unwrap();
    let mut got = vec![0u8; 1 << 20];
    back.read_at(0, &mut got).unwrap();
    assert_eq!(got, data);
    // One block, and exactly two pages.
    q.read(1, 100, 1, &back, 0).unwrap();
    q.read(1, 100, 16, &back, 0).unwrap();
    q.run(&IoRequest::write_zeroes(1, 100, 8)).unwrap();
    assert_eq!(e.namespace_read(1, 100 * 512, 4096).unwrap(), vec![0; 4096]);
    q.run(&IoRequest::deallocate(1, 108, 8)).unwrap();
    assert_eq!(e.namespace_read(1, 108 * 512, 4096).unwrap(), vec![0; 4096]);
    q.flush(1).unwrap();
    assert_eq!(
        e.namespace_read(1, 116 * 512, 512).unwrap(),
        data[16 * 512..17 * 512]
    );
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn invalid_requests_fail_before_anything_is_queued() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    let blocks = c.namespace(1).unwrap().blocks;
    for (req, what) in [
        (IoRequest::read(1, blocks - 1, 2, &buf, 0), "past the end"),
        (IoRequest::read(9, 0, 1, &buf, 0), "no namespace"),
        // One block more than the buffer holds (whole CPU pages: 4 KiB here, 64 KiB on some
        // aarch64 kernels).
        (
            IoRequest::read(1, 0, (buf.len() / 512 + 1) as u64, &buf, 0),
            "buffer too small",
        ),
        (IoRequest::read(1, 0, 1, &buf, 2), "misaligned offset"),
        (IoRequest::read(1, 0, 0, &buf, 0), "zero blocks"),
    ] {
        let err = q.submit(&req, 0).unwrap_err();
        assert!(matches!(err, NvmeError::Invalid(_)), "{what}: {err}");
    }
    assert_eq!(q.outstanding(), 0);
    assert_eq!(e.stats().commands, e.stats().admin_commands.values().sum::<u64>());
}

#[test]
fn a_batch_rings_one_doorbell() {
    let e = emu(EmuConfig {
        shadow_doorbells: false,
        // Completed in any order, as hardware may.
        shuffle_completions: Some(1),
        ..EmuConfig::default()
    });
    let c = up(&e);
    let mut q = c.io_queue(64).unwrap();
    let buf = c.alloc_buffer(32 * 4096).unwrap();
    for i in 0..32u8 {
        e.namespace_write(1, u64::from(i) * 4096, &[i; 4096]).unwrap();
    }
    let before = e.stats().sq_doorbell_writes;
    for i in 0..32u64 {
        q.submit(&IoRequest::read(1, i * 8, 8, &buf, i as usize * 4096), i)
            .unwrap();
    }
    q.ring().unwrap();
    let mut tags = Vec::new();
    let start = Instant::now();
    while tags.len() < 32 && start.elapsed() < Duration::from_secs(60) {
        q.poll(|tag, r| {
            r.unwrap();
            tags.push(tag);
        })
        .unwrap();
    }
    assert_ne!(tags, (0..32).collect::<Vec<_>>(), "completed out of order");
    tags.sort_unstable();
    assert_eq!(tags, (0..32).collect::<Vec<_>>());
    for i in 0..32u8 {
        let mut got = [0u8; 4096];
        buf.read_at(usize::from(i) * 4096, &mut got).unwrap();
        assert_eq!(got, [i; 4096]);
    }
    assert_eq!(e.stats().sq_doorbell_writes - before, 1);
    assert_eq!(q.doorbell_writes(), 1);
}

#[test]
fn shadow_doorbells_are_used_when_offered() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    assert!(c.info().shadow_doorbells);
    let mut q = c.io_queue(16).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    for i in 0..50 {
        q.read(1, i, 8, &buf, 0).unwrap();
    }
    let s = e.stats();
    assert!(s.shadow_doorbell_updates > 0, "{s:?}");
    assert!(s.admin(admin::DOORBELL_BUFFER_CONFIG) == 1);
    // Refused, the driver goes on without them.
    let e = emu(EmuConfig::default());
    e.inject(Fault::Status {
        command: CommandMatch::Admin(admin::DOORBELL_BUFFER_CONFIG),
        status: Status::INVALID_FIELD,
        count: 1,
    });
    let c = up(&e);
    assert!(!c.info().shadow_doorbells);
    c.io_queue(4).unwrap().read(1, 0, 1, &buf_of(&c), 0).unwrap();
}

fn buf_of(c: &Controller<EmulatedNvme>) -> pcibus::nvme::Buffer<EmulatedNvme> {
    c.alloc_buffer(4096).unwrap()
}

#[test]
fn a_queue_wraps_many_times() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(4).unwrap();
    let buf = c.alloc_buffer(3 * 4096).unwrap();
    let mut completed = 0u64;
    let mut next = 0u64;
    let start = Instant::now();
    while completed < 200 && start.elapsed() < Duration::from_secs(60) {
        while q.free_slots() > 0 && next < 200 {
            let slot = (next % 3) as usize;
            q.submit(&IoRequest::write(1, next, 1, &buf, slot * 4096), next)
                .unwrap();
            next += 1;
        }
        q.poll(|_, r| {
            r.unwrap();
            completed += 1;
        })
        .unwrap();
    }
    assert_eq!(completed, 200);
}

#[test]
fn an_error_status_fails_only_its_request() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::Status {
        command: CommandMatch::Io(io::READ),
        status: Status::LBA_OUT_OF_RANGE,
        count: 1,
    });
    match q.read(1, 0, 1, &buf, 0) {
        Err(NvmeError::Command { command, status }) => {
            assert_eq!(command, "Read");
            assert_eq!(status.sc(), 0x80);
        }
        other => panic!("{other:?}"),
    }
    q.read(1, 0, 1, &buf, 0).unwrap();
}

#[test]
fn a_command_that_never_completes_times_out_and_is_aborted() {
    // Abort that works: the kind controller. (The strict default never aborts; then the
    // queue resets the controller, as `a_command_that_cannot_be_aborted_resets_the_controller`
    // shows.)
    let e = emu(EmuConfig {
        abort_succeeds: true,
        ..EmuConfig::default()
    });
    let c = Controller::init(e.clone(), &short_io_timeout()).unwrap();
    let mut q = c.io_queue(4).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    // An Abort follows the timeout; the aborted command's completion gives its slot back.
    let start = Instant::now();
    while q.free_slots() < 3 && start.elapsed() < Duration::from_secs(60) {
        q.poll(|_, _| panic!("the timed-out request completes only once"))
            .unwrap();
    }
    assert_eq!(q.free_slots(), 3);
    assert_eq!(e.stats().admin(admin::ABORT), 1);
    q.read(1, 0, 1, &buf, 0).unwrap();
}

#[test]
fn a_controller_without_bus_mastering_does_no_dma_and_says_so() {
    // As a real function: with Bus Master Enable off no command is fetched and no
    // completion posted, and the emulator counts (and logs) every attempt rather than
    // quietly moving data (issue 16 §4: an outside driver's DMA silently read zeros).
    let e = emu(EmuConfig::default());
    let options = Options {
        // The Abort and the reset's admin commands cannot run either: do not wait long.
        admin_timeout: Duration::from_millis(500),
        ..short_io_timeout()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    let mut q = c.io_queue(4).unwrap();
    let buf = buf_of(&c);
    e.set_bus_master(false).unwrap();
    assert!(!e.bus_master().unwrap());
    let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    let stats = e.stats();
    assert_eq!(stats.io(io::READ), 0, "no command fetched without bus mastering");
    assert!(stats.dma_without_bus_master > 0, "{stats:?}");
    assert_eq!(stats.bad_dma, 0);
}

#[test]
fn a_command_that_cannot_be_aborted_resets_the_controller() {
    let e = emu(EmuConfig::default());
    // The Abort never answered is given the admin timeout before the reset.
    let options = Options {
        admin_timeout: Duration::from_secs(5),
        ..short_io_timeout()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    let mut q = c.io_queue(8).unwrap();
    let mut other = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(2 * 4096).unwrap();
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Admin(admin::ABORT),
        count: 1,
    });
    let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    // Another queue has a write outstanding (stalled in the controller) when the reset
    // comes: it ends with Reset.
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::WRITE),
        count: 1,
    });
    other.submit(&IoRequest::write(1, 64, 8, &buf, 4096), 7).unwrap();
    other.ring().unwrap();
    // One more timeout later, the stuck slot makes the queue reset the controller and
    // create itself again.
    let start = Instant::now();
    while q.free_slots() < 7 && start.elapsed() < Duration::from_secs(60) {
        q.poll(|_, _| {}).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(q.free_slots(), 7, "the reset gave the slot back");
    e.clear_faults();
    let mut ended = None;
    other.poll(|tag, r| ended = Some((tag, r))).unwrap();
    match ended {
        Some((7, Err(NvmeError::Reset(_)))) => {}
        other => panic!("{other:?}"),
    }
    // Both queues work again.
    q.read(1, 0, 1, &buf, 0).unwrap();
    other.write(1, 64, 8, &buf, 4096).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn stray_completions_are_ignored() {
    for fault in [Fault::WrongCid, Fault::Duplicate, Fault::StalePhase] {
        let e = emu(EmuConfig::default());
        let c = Controller::init(e.clone(), &short_io_timeout()).unwrap();
        let mut q = c.io_queue(8).unwrap();
        let buf = buf_of(&c);
        let name = format!("{fault:?}");
        e.inject(fault);
        // The first read loses its completion (wrong cid, stale phase) or gets two.
        let first = q.read(1, 0, 1, &buf, 0);
        match name.as_str() {
            "Duplicate" => first.unwrap(),
            _ => assert!(
                matches!(first, Err(NvmeError::Timeout { .. })),
                "{name}: {first:?}"
            ),
        }
        if name != "StalePhase" {
            // The queue goes on working. (After a stale phase entry the ring is out of step
            // for good: the controller moved on, the driver waits for that entry; it times
            // out again, which is the point: no hang, an error.)
            for i in 0..20 {
                q.read(1, i, 1, &buf, 0)
                    .unwrap_or_else(|e| panic!("{name}: read {i}: {e}"));
            }
        } else {
            let again = q.read(1, 0, 1, &buf, 0);
            assert!(again.is_err(), "{name}");
        }
        assert_eq!(e.stats().bad_dma, 0);
    }
}

// (A controller reporting CSTS.CFS is reset instead: see
// `a_fatal_status_resets_the_controller_and_ends_each_request_once`.)
#[test]
fn a_gone_controller_ends_every_request_and_the_queue() {
    for fault in [Fault::Gone] {
        let e = emu(EmuConfig {
            ..EmuConfig::default()
        });
        let c = up(&e);
        let mut q = c.io_queue(32).unwrap();
        let buf = c.alloc_buffer(16 * 4096).unwrap();
        // Outstanding for sure when the fault comes: the controller holds them.
        e.inject(Fault::Stall {
            command: CommandMatch::Io(io::READ),
            count: 16,
        });
        for i in 0..16u64 {
            q.submit(&IoRequest::read(1, i * 8, 8, &buf, i as usize * 4096), i)
                .unwrap();
        }
        q.ring().unwrap();
        let name = format!("{fault:?}");
        e.inject(fault);
        let mut results = Vec::new();
        let start = Instant::now();
        let end = loop {
            match q.poll(|tag, r| results.push((tag, r))) {
                Err(e) => break e,
                Ok(_) if start.elapsed() > Duration::from_secs(60) => panic!("{name}: no error in 60 s"),
                Ok(_) => {}
            }
        };
        assert!(end.is_fatal(), "{name}: {end}");
        assert!(matches!(end, NvmeError::Gone), "{end}");
        assert_eq!(results.len(), 16, "{name}: every request ended");
        assert_eq!(q.outstanding(), 0);
        let again = q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 99).unwrap_err();
        assert!(again.is_fatal(), "{name}: the queue stays dead: {again}");
        drop(q);
    }
}

#[test]
fn a_controller_failing_while_it_is_being_removed_is_reported_removed() {
    // Issue 14 §2: a QMP unplug or an unbind reached the driver (which shuts the
    // controller down before it revokes it) while an I/O thread polled: the thread ended
    // with "controller failed: CSTS.CFS set", not the removal that caused it.
    for fault in [Fault::FatalStatus, Fault::Gone] {
        let e = emu(EmuConfig::default());
        let c = up(&e);
        let mut q = c.io_queue(32).unwrap();
        let buf = c.alloc_buffer(4 * 4096).unwrap();
        // Outstanding for sure when the fault comes: the controller holds them.
        e.inject(Fault::Stall {
            command: CommandMatch::Io(io::READ),
            count: 4,
        });
        for i in 0..4u64 {
            q.submit(&IoRequest::read(1, i * 8, 8, &buf, i as usize * 4096), i)
                .unwrap();
        }
        q.ring().unwrap();
        c.begin_removal("vfio removal request");
        e.inject(fault);
        let start = Instant::now();
        let end = loop {
            match q.poll(|_, _| {}) {
                Err(e) => break e,
                Ok(_) if start.elapsed() > Duration::from_secs(60) => panic!("no error in 60 s"),
                Ok(_) => {}
            }
        };
        assert!(
            matches!(&end, NvmeError::Removed(why) if why.contains("vfio removal request")),
            "{end}"
        );
    }
}

#[test]
fn revoke_fails_every_queue_and_drops_the_device_at_once() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(32).unwrap();
    let buf = c.alloc_buffer(8 * 4096).unwrap();
    // Outstanding for sure when the fault comes: the controller holds them.
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 8,
    });
    for i in 0..8u64 {
        q.submit(&IoRequest::read(1, i * 8, 8, &buf, i as usize * 4096), i)
            .unwrap();
    }
    q.ring().unwrap();
    let before = e.extra_handles();
    c.revoke("test removal");
    // The controller's backing and every register handle are gone, though the queue lives.
    assert!(e.extra_handles() < before, "{} -> {}", before, e.extra_handles());
    let mut ended = Vec::new();
    let err = q
        .poll(|tag, r| ended.push((tag, r.unwrap_err().to_string())))
        .unwrap_err();
    assert!(
        matches!(&err, NvmeError::Removed(why) if why == "test removal"),
        "{err}"
    );
    assert_eq!(ended.len(), 8);
    assert!(
        ended.iter().all(|(_, e)| e == "controller removed: test removal"),
        "{ended:?}"
    );
    assert!(c.io_queue(4).is_err());
    assert!(
        c.admin(pcibus::nvme::spec::Command::new(admin::GET_LOG_PAGE), "x")
            .is_err()
    );
    drop(q);
    drop(buf);
    drop(c);
    assert_eq!(e.extra_handles(), 0, "nothing of the driver holds the device");
}

#[test]
fn interrupts_wake_a_waiting_queue() {
    let e = emu(EmuConfig::default());
    let c = up_with_interrupts(&e);
    assert_eq!(c.info().interrupt_vectors, 16);
    let mut q = c.io_queue(8).unwrap();
    assert!(q.interrupt_fd().is_some());
    let buf = buf_of(&c);
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 5).unwrap();
    let mut got = None;
    let start = Instant::now();
    while got.is_none() && start.elapsed() < Duration::from_secs(60) {
        q.wait(Duration::from_secs(1), |tag, r| got = Some((tag, r.is_ok())))
            .unwrap();
    }
    assert_eq!(got, Some((5, true)));
    assert!(e.stats().interrupts > 0);
}

#[test]
fn shutdown_completes() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    c.shutdown().unwrap();
}

#[test]
fn perf_runs_without_errors() {
    use pcibus::nvme::perf::{PerfConfig, Progress, run};
    let e = emu(EmuConfig::default());
    let c = up(&e);
    for (op, random) in [(Op::Read, true), (Op::Write, false)] {
        let r = run(
            &c,
            &PerfConfig {
                op,
                random,
                io_size: 4096,
                queue_depth: 16,
                queues: 2,
                duration: Duration::from_millis(300),
                nsid: 1,
                spin: None,
                rwmix_read: None,
            },
            &Progress::default(),
        )
        .unwrap();
        assert!(r.ios > 0);
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert!(
            r.doorbells < r.ios,
            "batched: {} doorbells for {} I/Os",
            r.doorbells,
            r.ios
        );
    }
    assert_eq!(e.stats().bad_dma, 0);
}

// The hybrid wait (issue 15 §8): with completion interrupts, polling for a while after each
// completion before sleeping; both the spinning and the sleeping paths complete I/O.
#[test]
fn perf_with_interrupts_polls_then_sleeps() {
    use pcibus::nvme::perf::{PerfConfig, Progress, run};
    let e = emu(EmuConfig::default());
    let c = up_with_interrupts(&e);
    for spin in [
        None,
        Some(Duration::from_micros(50)),
        Some(Duration::from_millis(5)),
    ] {
        let r = run(
            &c,
            &PerfConfig {
                op: Op::Read,
                random: true,
                io_size: 4096,
                queue_depth: 4,
                queues: 1,
                duration: Duration::from_millis(200),
                nsid: 1,
                spin,
                rwmix_read: None,
            },
            &Progress::default(),
        )
        .unwrap();
        assert!(r.ios > 0, "{spin:?}");
        assert_eq!(r.errors, 0, "{spin:?}: {:?}", r.first_error);
    }
    assert!(e.stats().interrupts > 0);
    assert_eq!(e.stats().bad_dma, 0);
}

// Random I/O sequences against a model of the disk: whatever the sizes, offsets and
// commands, the namespace ends up as the model says and reads return it.
#[derive(Debug, Clone)]
enum Step {
    Write {
        lba: u64,
        blocks: u64,
        seed: u8,
        offset: usize,
    },
    Read {
        lba: u64,
        blocks: u64,
        offset: usize,
    },
    Zeroes {
        lba: u64,
        blocks: u64,
    },
    Trim {
        lba: u64,
        blocks: u64,
    },
}

const MODEL_BLOCKS: u64 = 4096;

fn step() -> impl Strategy<Value = Step> {
    let range = (0..MODEL_BLOCKS).prop_flat_map(|lba| (Just(lba), 1..=(MODEL_BLOCKS - lba).min(1200)));
    prop_oneof![
        (range.clone(), any::<u8>(), 0usize..1024).prop_map(|((lba, blocks), seed, o)| Step::Write {
            lba,
            blocks,
            seed,
            offset: o * 4
        }),
        (range.clone(), 0usize..1024).prop_map(|((lba, blocks), o)| Step::Read {
            lba,
            blocks,
            offset: o * 4
        }),
        range
            .clone()
            .prop_map(|(lba, blocks)| Step::Zeroes { lba, blocks }),
        range.prop_map(|(lba, blocks)| Step::Trim { lba, blocks }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_io_matches_a_model(steps in proptest::collection::vec(step(), 1..12)) {
        let e = emu(EmuConfig {
            namespaces: vec![NamespaceConfig::new(MODEL_BLOCKS, 512)],
            shuffle_completions: Some(3),
            ..EmuConfig::default()
        });
        let c = up(&e);
        let mut q = c.io_queue(16).unwrap();
        let buf = c.alloc_buffer(1200 * 512 + 4096).unwrap();
        let mut model = vec![0u8; (MODEL_BLOCKS * 512) as usize];
        for s in &steps {
            match *s {
                Step::Write { lba, blocks, seed, offset } => {
                    let data = pattern((blocks * 512) as usize, seed);
                    buf.write_at(offset, &data).unwrap();
                    q.write(1, lba, blocks, &buf, offset).unwrap();
                    model[(lba * 512) as usize..((lba + blocks) * 512) as usize].copy_from_slice(&data);
                }
                Step::Read { lba, blocks, offset } => {
                    q.read(1, lba, blocks, &buf, offset).unwrap();
                    let mut got = vec![0u8; (blocks * 512) as usize];
                    buf.read_at(offset, &mut got).unwrap();
                    prop_assert_eq!(&got[..], &model[(lba * 512) as usize..((lba + blocks) * 512) as usize]);
                }
                Step::Zeroes { lba, blocks } | Step::Trim { lba, blocks } => {
                    let req = if matches!(s, Step::Zeroes { .. }) {
                        IoRequest::write_zeroes(1, lba, blocks)
                    } else {
                        IoRequest::deallocate(1, lba, blocks)
                    };
                    q.run(&req).unwrap();
                    model[(lba * 512) as usize..((lba + blocks) * 512) as usize].fill(0);
                }
            }
        }
        let all = e.namespace_read(1, 0, model.len()).unwrap();
        prop_assert!(all == model, "namespace differs from the model");
        prop_assert_eq!(e.stats().bad_dma, 0);
    }
}

#[test]
fn a_doorbell_stride_and_4k_blocks_are_honoured() {
    let e = emu(EmuConfig {
        dstrd: 2,
        namespaces: vec![NamespaceConfig::new(2048, 4096)],
        ..EmuConfig::default()
    });
    let c = up(&e);
    assert_eq!(c.info().cap.doorbell_stride(), 16);
    let ns = c.namespace(1).unwrap();
    assert_eq!((ns.blocks, ns.block_size), (2048, 4096));
    let mut queues: Vec<_> = (0..3).map(|_| c.io_queue(8).unwrap()).collect();
    let data = pattern(3 * 4096, 9);
    let buf = c.alloc_buffer(3 * 4096).unwrap();
    buf.write_at(0, &data).unwrap();
    // Three queues, so doorbells past the first stride are used.
    for (i, q) in queues.iter_mut().enumerate() {
        q.write(1, 10 * i as u64, 3, &buf, 0).unwrap();
        let back = c.alloc_buffer(3 * 4096).unwrap();
        q.read(1, 10 * i as u64, 3, &back, 0).unwrap();
        let mut got = vec![0u8; 3 * 4096];
        back.read_at(0, &mut got).unwrap();
        assert_eq!(got, data);
    }
    assert_eq!(e.namespace_read(1, 20 * 4096, 3 * 4096).unwrap(), data);
    assert_eq!(e.stats().invalid_doorbell_writes, 0);
    assert_eq!(e.stats().bad_dma, 0);
}

// ---- Issue 15: namespaces with metadata, and controller facts the driver must honour.

fn md(metadata_size: u16, extended_lba: bool, protection: u8) -> NamespaceConfig {
    NamespaceConfig {
        metadata_size,
        extended_lba,
        protection,
        ..NamespaceConfig::new(4096, 512)
    }
}

#[test]
fn metadata_formats_are_refused_or_driven_with_pract_never_corrupted() {
    let e = emu(EmuConfig {
        namespaces: vec![
            md(8, true, 0),   // 1: extended LBAs, no protection: refused
            md(8, false, 0),  // 2: separate metadata, no protection: refused
            md(8, false, 1),  // 3: type 1, 8 bytes: PRACT
            md(8, true, 1),   // 4: type 1, extended: PRACT (nothing travels)
            md(8, false, 3),  // 5: type 3: PRACT, guard only
            md(16, false, 1), // 6: protection plus 8 more bytes: refused
            md(8, false, 2),  // 7: type 2: PRACT
        ],
        ..EmuConfig::default()
    });
    // The emulator checks every block's CRC: generous deadlines, so load cannot fail it.
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_secs(60),
            ..quick()
        },
    )
    .unwrap();
    // Every namespace is listed; the refused ones say why.
    let listed: Vec<(u32, bool)> = c.namespaces().iter().map(|n| (n.nsid, n.is_usable())).collect();
    assert_eq!(
        listed,
        [
            (1, false),
            (2, false),
            (3, true),
            (4, true),
            (5, true),
            (6, false),
            (7, true)
        ]
    );
    let ns1 = c.namespace(1).unwrap();
    assert_eq!(
        (ns1.metadata_size, ns1.extended_lba, ns1.protection),
        (8, true, 0)
    );
    assert!(ns1.unusable.as_deref().unwrap().contains("extended LBAs"));
    assert!(
        c.namespace(2)
            .unwrap()
            .unusable
            .as_deref()
            .unwrap()
            .contains("separate")
    );
    assert!(
        c.namespace(6)
            .unwrap()
            .unusable
            .as_deref()
            .unwrap()
            .contains("16 bytes")
    );
    let mut q = c.io_queue(16).unwrap();
    let buf = c.alloc_buffer(1 << 20).unwrap();
    let data = pattern(1 << 20, 9);
    buf.write_at(0, &data).unwrap();
    for nsid in [1, 2, 6] {
        for req in [
            IoRequest::write(nsid, 0, 8, &buf, 0),
            IoRequest::read(nsid, 0, 8, &buf, 0),
            IoRequest::write_zeroes(nsid, 0, 8),
        ] {
            match q.run(&req) {
                Err(NvmeError::Unsupported(why)) => assert!(why.contains("metadata"), "{nsid}: {why}"),
                other => panic!("namespace {nsid}: {other:?}"),
            }
        }
    }
    assert_eq!(
        e.stats().io(io::WRITE) + e.stats().io(io::READ),
        0,
        "nothing sent"
    );
    for nsid in [3, 4, 5, 7] {
        // 2048 blocks: two commands (MDTS 512 KiB), each with its own reference tag.
        q.write(nsid, 100, 2048, &buf, 0).unwrap();
        assert_eq!(
            e.namespace_read(nsid, 100 * 512, 1 << 20).unwrap(),
            data,
            "{nsid}"
        );
        let back = c.alloc_buffer(1 << 20).unwrap();
        q.read(nsid, 100, 2048, &back, 0).unwrap();
        let mut got = vec![0u8; 1 << 20];
        back.read_at(0, &mut got).unwrap();
        assert_eq!(got, data, "{nsid}");
        for lba in [100u64, 1123, 1124, 2147] {
            let pi = e.namespace_metadata(nsid, lba).unwrap();
            let k = (lba - 100) as usize;
            assert_eq!(
                pi[0..2],
                spec::crc16_t10dif(&data[k * 512..(k + 1) * 512]).to_be_bytes(),
                "{nsid} {lba}"
            );
            if nsid != 5 {
                assert_eq!(pi[4..8], (lba as u32).to_be_bytes(), "{nsid} {lba}");
            }
        }
        // Write Zeroes leaves protection information that reads back.
        q.run(&IoRequest::write_zeroes(nsid, 200, 16)).unwrap();
        q.read(nsid, 190, 32, &back, 0).unwrap();
    }
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn write_zeroes_and_deallocate_follow_oncs_and_the_nvm_limits() {
    let e = emu(EmuConfig {
        oncs: 0,
        ..EmuConfig::default()
    });
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    for req in [IoRequest::write_zeroes(1, 0, 8), IoRequest::deallocate(1, 0, 8)] {
        let err = q.run(&req).unwrap_err();
        assert!(matches!(err, NvmeError::Unsupported(_)), "{err}");
    }
    let s = e.stats();
    assert_eq!(
        s.io(io::WRITE_ZEROES) + s.io(io::DATASET_MANAGEMENT),
        0,
        "nothing sent"
    );

    // WZSL 1 (8 KiB: 16 blocks), one range of at most 16 blocks and 20 per command.
    let e = emu(EmuConfig {
        wzsl: 1,
        dmrl: 1,
        dmrsl: 16,
        dmsl: 20,
        ..EmuConfig::default()
    });
    let c = up(&e);
    let mut q = c.io_queue(16).unwrap();
    e.namespace_write(1, 0, &[0xaa; 200 * 512]).unwrap();
    q.run(&IoRequest::write_zeroes(1, 10, 100)).unwrap();
    assert_eq!(e.stats().io(io::WRITE_ZEROES), 7, "100 blocks in commands of 16");
    q.run(&IoRequest::deallocate(1, 120, 40)).unwrap();
    assert_eq!(
        e.stats().io(io::DATASET_MANAGEMENT),
        3,
        "40 blocks in ranges of 16"
    );
    let mut want = vec![0xaa; 200 * 512];
    want[10 * 512..110 * 512].fill(0);
    want[120 * 512..160 * 512].fill(0);
    assert_eq!(e.namespace_read(1, 0, want.len()).unwrap(), want);
}

#[test]
fn active_namespace_lists_are_paged_past_1024() {
    let e = emu(EmuConfig {
        namespaces: vec![NamespaceConfig::new(8, 512); 1030],
        ..EmuConfig::default()
    });
    let c = up(&e);
    let ids: Vec<u32> = c.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, (1..=1030).collect::<Vec<u32>>());
}

#[test]
fn a_reset_honours_the_queue_count_granted_again() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(
        e.clone(),
        &Options {
            io_queues: 4,
            ..quick()
        },
    )
    .unwrap();
    let mut queues: Vec<_> = (0..4).map(|_| c.io_queue(4).unwrap()).collect();
    let buf = buf_of(&c);
    // After the reset the controller grants only 2.
    e.limit_io_queues(2);
    c.reset().unwrap();
    // A poll creates a queue again after a reset; the fourth cannot be.
    queues[0].poll(|_, _| {}).unwrap();
    queues[0].read(1, 0, 1, &buf, 0).unwrap();
    let err = queues[3].poll(|_, _| {}).unwrap_err();
    assert!(err.to_string().contains("grant"), "{err}");
    let admin_before = e.stats().admin_commands.values().sum::<u64>();
    queues.truncate(2);
    assert_eq!(
        e.stats().admin_commands.values().sum::<u64>(),
        admin_before,
        "queues the controller cannot have are not deleted"
    );
    let err = c.io_queue(4).unwrap_err();
    assert!(
        matches!(&err, NvmeError::Invalid(m) if m.contains("all 2 I/O queues")),
        "{err}"
    );
    drop(queues);
    let again: Vec<_> = (0..2).map(|_| c.io_queue(4).unwrap()).collect();
    assert_eq!(again.iter().map(|q| q.qid()).max(), Some(2));
}

#[test]
fn shutdown_deletes_the_io_queues_first() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q1 = c.io_queue(8).unwrap();
    let q2 = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    q1.read(1, 0, 1, &buf, 0).unwrap();
    c.shutdown().unwrap();
    let s = e.stats();
    assert_eq!((s.admin(admin::DELETE_SQ), s.admin(admin::DELETE_CQ)), (2, 2));
    // The queues know: no command, no admin round trip (the controller takes none).
    let err = q1.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(err.to_string().contains("shut down"), "{err}");
    drop((q1, q2));
    assert_eq!(e.stats().admin_commands, s.admin_commands);
}

#[test]
fn a_controller_failing_during_shutdown_is_reported_at_once() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    e.inject(Fault::FatalOnShutdown);
    let err = c.shutdown_within(Duration::from_secs(3)).unwrap_err();
    assert!(matches!(err, NvmeError::Fatal { .. }), "{err}");
}

#[test]
fn the_ready_timeout_comes_from_crto_when_cap_crms_says_so() {
    let c = up(&emu(EmuConfig::default()));
    assert_eq!(c.info().ready_timeout, Duration::from_millis(7500), "CAP.TO");
    // CRWMT 0x400 (512 s) is more than CAP.TO can say (at most 127.5 s).
    let c = up(&emu(EmuConfig {
        crto: Some(0x0004_0400),
        ..EmuConfig::default()
    }));
    assert_eq!(c.info().ready_timeout, Duration::from_secs(512));
}

// Issue 15 §1: a request that timed out is reported to the caller, but its command is only
// abandoned: the controller may still execute it. The buffer the application drops after
// the Timeout error must stay allocated (and mapped) until the command ends, or the late
// DMA lands in freed memory (on VFIO: in whatever reused the IOVA).
#[test]
fn a_timed_out_request_keeps_its_buffer_until_its_command_ends() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_millis(200),
            ..quick()
        },
    )
    .unwrap();
    let mut q = c.io_queue(4).unwrap();
    let handles = e.extra_handles();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Delay(Duration::from_secs(1)));
    let err = q.read(1, 0, 8, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    drop(buf);
    // The late command executes (completes, or the controller is reset, which waits for
    // it): either way the slot comes back.
    let start = Instant::now();
    while q.free_slots() < 3 && start.elapsed() < Duration::from_secs(20) {
        q.poll(|_, _| panic!("the timed-out request completes only once"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(q.free_slots(), 3);
    assert_eq!(e.stats().bad_dma, 0, "the late read landed in freed memory");
    // And then the buffer is released: nothing of it keeps the controller.
    assert_eq!(e.extra_handles(), handles);
    e.clear_faults();
    // Its Abort (no reset came: the command completed first) runs behind it on the
    // emulator's one thread, delayed as well: an admin command waits for it.
    c.smart_log().unwrap();
    q.read(1, 0, 1, &buf_of(&c), 0).unwrap();
}

// Issue 15 §1 and §4: CSTS.CFS while a command is still executing (the emulator finishes
// the command it is delaying). The requests end once, their buffers stay until the
// controller is disabled, and the spec's recovery (a controller reset) brings the queue
// back.
#[test]
fn a_fatal_status_resets_the_controller_and_ends_each_request_once() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(16).unwrap();
    let bufs: Vec<_> = (0..4).map(|_| c.alloc_buffer(4096).unwrap()).collect();
    e.inject(Fault::Delay(Duration::from_millis(300)));
    for (i, b) in bufs.iter().enumerate() {
        q.submit(&IoRequest::read(1, i as u64 * 8, 8, b, 0), i as u64)
            .unwrap();
    }
    q.ring().unwrap();
    let start = Instant::now();
    while e.stats().io(io::READ) == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    e.inject(Fault::FatalStatus);
    let mut ended = Vec::new();
    let start = Instant::now();
    while ended.len() < 4 && start.elapsed() < Duration::from_secs(10) {
        let _ = q.poll(|tag, r| ended.push((tag, r)));
    }
    drop(bufs);
    let mut tags: Vec<u64> = ended.iter().map(|(t, _)| *t).collect();
    tags.sort_unstable();
    assert_eq!(tags, [0, 1, 2, 3], "each request ends exactly once");
    for (tag, r) in &ended {
        assert!(r.is_err(), "{tag}: {r:?}");
    }
    // The command the controller was executing when it failed has finished by now.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(e.stats().bad_dma, 0, "DMA after CFS landed in freed memory");
    e.clear_faults();
    q.read(1, 0, 1, &buf_of(&c), 0).unwrap();
    q.poll(|tag, r| panic!("request {tag} ended twice: {r:?}"))
        .unwrap();
}

// Issue 15 §4: with one I/O queue granted, a queue that saw CSTS.CFS, dropped, then a reset:
// its queue id comes back.
#[test]
fn after_a_fatal_status_and_a_reset_the_queue_ids_come_back() {
    let e = emu(EmuConfig {
        max_io_queues: 1,
        ..EmuConfig::default()
    });
    let c = up(&e);
    assert_eq!(c.info().io_queues, 1);
    let mut q = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 1).unwrap();
    e.inject(Fault::FatalStatus);
    let start = Instant::now();
    let mut ended = 0;
    while ended == 0 && start.elapsed() < Duration::from_secs(10) {
        let _ = q.poll(|_, _| ended += 1);
    }
    drop(q);
    c.reset().unwrap();
    let mut q = c.io_queue(8).expect("the queue id came back");
    q.read(1, 0, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

// Issue 15 §4: never more Aborts outstanding than Identify Controller's ACL + 1; the
// commands that could not get one stay abandoned until the controller reset.
#[test]
fn aborts_respect_the_abort_command_limit() {
    let e = emu(EmuConfig {
        abort_limit: 3,
        ..EmuConfig::default()
    });
    let c = Controller::init(e.clone(), &short_io_timeout()).unwrap();
    assert_eq!(c.info().identify.acl, 3);
    let mut q = c.io_queue(16).unwrap();
    let buf = c.alloc_buffer(8 * 4096).unwrap();
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 8,
    });
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Admin(admin::ABORT),
        count: 8,
    });
    for i in 0..8u64 {
        q.submit(&IoRequest::read(1, i * 8, 8, &buf, i as usize * 4096), i)
            .unwrap();
    }
    q.ring().unwrap();
    let mut ended = Vec::new();
    let start = Instant::now();
    while ended.len() < 8 && start.elapsed() < Duration::from_secs(10) {
        q.poll(|tag, r| ended.push((tag, r))).unwrap();
    }
    assert_eq!(ended.len(), 8);
    assert!(
        ended
            .iter()
            .all(|(_, r)| matches!(r, Err(NvmeError::Timeout { .. }))),
        "{ended:?}"
    );
    // Slots come back only through the reset.
    let start = Instant::now();
    while q.free_slots() < 15 && start.elapsed() < Duration::from_secs(10) {
        q.poll(|tag, r| panic!("request {tag} ended twice: {r:?}"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(q.free_slots(), 15);
    let s = e.stats();
    assert_eq!(s.aborts_over_limit, 0, "{} Aborts sent", s.admin(admin::ABORT));
    assert!(
        s.admin(admin::ABORT) <= 4,
        "{} Aborts sent",
        s.admin(admin::ABORT)
    );
    e.clear_faults();
    q.read(1, 0, 1, &buf, 0).unwrap();
}

// Issue 15 §4: the timeout path does not wait for the admin queue's lock, which a long
// admin command on another thread holds.
#[test]
fn a_timeout_does_not_wait_for_a_slow_admin_command() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let e = emu(EmuConfig::default());
    let c = Controller::init(
        e.clone(),
        &Options {
            admin_timeout: Duration::from_secs(30),
            ..short_io_timeout()
        },
    )
    .unwrap();
    let mut q = c.io_queue(4).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Admin(admin::GET_LOG_PAGE),
        count: 1,
    });
    let returned = Arc::new(AtomicBool::new(false));
    let admin = {
        let (c, returned) = (c.clone(), Arc::clone(&returned));
        std::thread::spawn(move || {
            let r = c.admin(pcibus::nvme::spec::Command::new(admin::GET_LOG_PAGE), "log");
            returned.store(true, Ordering::SeqCst);
            r
        })
    };
    let start = Instant::now();
    while e.stats().admin(admin::GET_LOG_PAGE) == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    assert!(
        !returned.load(Ordering::SeqCst),
        "the timeout waited for the admin command"
    );
    c.revoke("end of test");
    assert!(admin.join().unwrap().is_err());
}

// Issue 15 §1: a queue whose deletion fails may still be the controller's, with its rings,
// PRP list pages and the buffers of commands in flight: they stay allocated (parked) with
// its queue id until a reset disables the controller, then come back.
#[test]
fn a_queue_whose_deletion_fails_keeps_its_memory_until_a_reset() {
    let e = emu(EmuConfig {
        max_io_queues: 1,
        ..EmuConfig::default()
    });
    let c = up(&e);
    let baseline = e.extra_handles();
    let q = c.io_queue(8).unwrap();
    e.inject(Fault::Status {
        command: CommandMatch::Admin(admin::DELETE_SQ),
        status: Status::INTERNAL_ERROR,
        count: 1,
    });
    drop(q);
    assert!(
        e.extra_handles() > baseline,
        "the rings were freed while the controller may own them"
    );
    assert!(
        c.io_queue(8).is_err(),
        "the controller may still own the queue id"
    );
    c.reset().unwrap();
    assert_eq!(
        e.extra_handles(),
        baseline,
        "released once the controller was disabled"
    );
    let mut q = c.io_queue(8).expect("the queue id came back");
    q.read(1, 0, 1, &buf_of(&c), 0).unwrap();
}

#[test]
fn a_recreated_queue_id_does_not_inherit_the_old_doorbell() {
    // Shadow doorbells off: the MMIO doorbell is the only tail. A queue deleted and created
    // again with the same id starts at tail 0; the old queue's last doorbell value is not
    // a new tail.
    let e = emu(EmuConfig {
        shadow_doorbells: false,
        ..EmuConfig::default()
    });
    let c = up(&e);
    let buf = buf_of(&c);
    let mut q = c.io_queue(13).unwrap();
    let qid = q.qid();
    q.read(1, 0, 1, &buf, 0).unwrap();
    drop(q);
    let mut q = c.io_queue(2).unwrap();
    assert_eq!(q.qid(), qid, "the id is used again");
    for i in 0..4 {
        q.read(1, i, 1, &buf, 0).unwrap();
    }
    assert_eq!(e.stats().io(io::READ), 5, "no command but the host's ran");
}

#[test]
fn bring_up_waits_for_a_slow_controller_and_gives_up_on_one_never_ready() {
    // Ready after a second, within CAP.TO (127.5 s here): bring-up waits.
    let e = emu(EmuConfig {
        cap_timeout: 255,
        ..EmuConfig::default()
    });
    e.inject(Fault::ReadySlow(Duration::from_secs(1)));
    let c = up(&e);
    c.io_queue(4).unwrap().read(1, 0, 1, &buf_of(&c), 0).unwrap();
    // Never ready: bring-up ends with a timeout after CAP.TO (500 ms), not a hang.
    let e = emu(EmuConfig {
        cap_timeout: 1,
        ..EmuConfig::default()
    });
    e.inject(Fault::ReadyNever);
    match Controller::init(e.clone(), &quick()) {
        Err(NvmeError::Timeout { what, .. }) => assert!(what.contains("RDY"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_timed_out_request_buffer_is_never_written_after_it_was_given_back() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(e.clone(), &short_io_timeout()).unwrap();
    let mut q = c.io_queue(4).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    // The application lets go of its buffer after the timeout, and allocates another.
    drop(buf);
    let _next = c.alloc_buffer(4096).unwrap();
    // The controller was only slow: the read is done now.
    e.release_stalled();
    let deadline = Instant::now() + Duration::from_secs(60);
    while q.free_slots() < 3 && Instant::now() < deadline {
        q.poll(|_, _| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        e.stats().late_dma,
        0,
        "the controller wrote into memory the driver had given back"
    );
}

#[test]
fn a_lost_interrupt_does_not_hang_a_waiting_queue() {
    let e = emu(EmuConfig::default());
    let c = up_with_interrupts(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::LostInterrupt { count: 1 });
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 5).unwrap();
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.is_none() && Instant::now() < deadline {
        q.wait(Duration::from_millis(50), |tag, r| got = Some((tag, r.is_ok())))
            .unwrap();
    }
    assert_eq!(got, Some((5, true)));
}

/// The hybrid wait polls before it sleeps: a completion whose interrupt is lost is found
/// by the spin, where a plain `wait` would sleep out its whole timeout.
#[test]
fn a_spinning_wait_finds_a_completion_whose_interrupt_was_lost() {
    let e = emu(EmuConfig::default());
    let c = up_with_interrupts(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    // Completed after the first polls, with no interrupt: a plain `wait` would sleep.
    e.inject(Fault::LostInterrupt { count: 1 });
    e.inject(Fault::Delay(Duration::from_millis(200)));
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 7).unwrap();
    q.ring().unwrap();
    let mut got = None;
    // A spin far longer than the emulator needs, and a sleep no test would survive: the
    // completion can only come from the polls.
    let n = q
        .wait_spinning(
            Duration::from_secs(60),
            Duration::from_secs(24 * 3600),
            |tag, r| got = Some((tag, r.is_ok())),
        )
        .unwrap();
    assert_eq!((n, got), (1, Some((7, true))));
    e.inject(Fault::Delay(Duration::ZERO));
}

/// After its spin the hybrid wait sleeps on the interrupt: with no spin and a completion
/// the device delays, the sleep is ended by that completion's interrupt.
#[test]
fn a_spinning_wait_sleeps_after_its_spin() {
    let e = emu(EmuConfig::default());
    let c = up_with_interrupts(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::Delay(Duration::from_millis(300)));
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 9).unwrap();
    q.ring().unwrap();
    let mut got = None;
    let interrupts_before = e.stats().interrupts;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut calls = 0;
    while got.is_none() && Instant::now() < deadline {
        calls += 1;
        q.wait_spinning(Duration::ZERO, Duration::from_secs(30), |tag, r| {
            got = Some((tag, r.is_ok()))
        })
        .unwrap();
    }
    assert_eq!(got, Some((9, true)));
    // One call: its polls found nothing (the device holds the command 300 ms), its sleep
    // was ended by the completion's interrupt (which the emulator counts just after
    // signalling it).
    assert_eq!(calls, 1);
    let counted = Instant::now() + Duration::from_secs(10);
    while e.stats().interrupts == interrupts_before && Instant::now() < counted {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(e.stats().interrupts > interrupts_before);
    e.inject(Fault::Delay(Duration::ZERO));
}

/// Without interrupts the hybrid wait is a bounded spin: it returns after `spin` when
/// nothing completed, never sleeps.
#[test]
fn a_spinning_wait_without_interrupts_returns_after_its_spin() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::Delay(Duration::from_secs(2)));
    q.submit(&IoRequest::read(1, 0, 8, &buf, 0), 3).unwrap();
    q.ring().unwrap();
    let mut got = None;
    let n = q
        .wait_spinning(
            Duration::from_millis(1),
            Duration::from_secs(24 * 3600),
            |tag, r| got = Some((tag, r.is_ok())),
        )
        .unwrap();
    // It returned (not after the day-long timeout); unless this thread stalled for the
    // device's 2 s, without the request.
    if n == 0 {
        assert_eq!(got, None);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.is_none() && Instant::now() < deadline {
        q.wait_spinning(
            Duration::from_millis(1),
            Duration::from_secs(24 * 3600),
            |tag, r| got = Some((tag, r.is_ok())),
        )
        .unwrap();
    }
    assert_eq!(got, Some((3, true)));
    e.inject(Fault::Delay(Duration::ZERO));
}

#[test]
fn an_sq_head_going_backwards_loses_no_command() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(4).unwrap();
    let buf = c.alloc_buffer(3 * 4096).unwrap();
    let mut completed = 0u64;
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed < 60 && Instant::now() < deadline {
        while q.free_slots() > 0 && next < 60 {
            // Now and then. (A head reported backwards on every completion stalls the
            // queue for good today: its free slots follow the last head it accepted, even
            // with nothing in flight. Known, not fixed here.)
            if next.is_multiple_of(7) {
                e.inject(Fault::SqHeadBackwards);
            }
            q.submit(
                &IoRequest::write(1, next, 1, &buf, (next % 3) as usize * 4096),
                next,
            )
            .unwrap();
            next += 1;
        }
        q.poll(|_, r| {
            r.unwrap();
            completed += 1;
        })
        .unwrap();
    }
    assert_eq!(completed, 60);
    assert_eq!(e.stats().io(io::WRITE), 60);
    assert_eq!((e.stats().bad_dma, e.stats().late_dma), (0, 0));
}

#[test]
fn a_reset_behind_the_drivers_back_is_recovered_from() {
    let e = emu(EmuConfig::default());
    // The reset took the Aborts with it: the queue waits the admin timeout for their
    // answers before it resets the controller itself.
    let options = Options {
        admin_timeout: Duration::from_secs(5),
        ..short_io_timeout()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4 * 4096).unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::AnyIo,
        count: 4,
    });
    for i in 0..4u64 {
        q.submit(&IoRequest::read(1, i * 8, 8, &buf, i as usize * 4096), i)
            .unwrap();
    }
    q.ring().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while e.stats().io(io::READ) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    e.inject(Fault::Reset);
    // Every request ends (timed out or reset), and the queue works again.
    let mut ended = 0;
    while (ended < 4 || q.free_slots() < 7) && Instant::now() < deadline {
        q.poll(|_, r| {
            assert!(r.is_err());
            ended += 1;
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!((ended, q.free_slots()), (4, 7));
    q.read(1, 0, 1, &buf, 0).unwrap();
}

// A command that never completes times out even on a queue that is never idle: other
// requests keep completing on every poll. (The deadline check ran on empty polls only, so
// a busy queue carried a stuck command forever.)
#[test]
fn a_stuck_command_times_out_on_a_queue_that_is_never_idle() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(e.clone(), &short_io_timeout()).unwrap();
    let mut q = c.io_queue(16).unwrap();
    let buf = c.alloc_buffer(16 * 4096).unwrap();
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    const STUCK: u64 = u64::MAX;
    q.submit(&IoRequest::read(1, 0, 1, &buf, 0), STUCK).unwrap();
    q.ring().unwrap();
    let mut stuck = None;
    let mut next = 1u64;
    let mut busy_polls = 0u64;
    let start = Instant::now();
    // Keep a few writes in flight all the time: polls keep finding completions.
    while stuck.is_none() && start.elapsed() < Duration::from_secs(60) {
        while q.outstanding() < 4 {
            let i = (next % 8) as usize + 1;
            q.submit(&IoRequest::write(1, 100 + i as u64, 1, &buf, i * 4096), next)
                .unwrap();
            next += 1;
        }
        q.ring().unwrap();
        // Time for the controller to complete what was submitted: the poll finds work.
        std::thread::sleep(Duration::from_millis(2));
        let n = q
            .poll(|tag, r| {
                if tag == STUCK {
                    stuck = Some(r);
                }
            })
            .unwrap();
        if n > 0 {
            busy_polls += 1;
        }
    }
    assert!(busy_polls > 0);
    match stuck {
        Some(Err(NvmeError::Timeout { .. })) => {}
        other => panic!("the stuck read ended with {other:?} after {:?}", start.elapsed()),
    }
}

// A controller that never moves the SQ head it reports (found by the strict emulator's
// review): the entries of completed commands were consumed all the same (the controller
// fetches in order), so the queue must not run out of ring space and stall.
#[test]
fn a_controller_that_never_updates_the_sq_head_does_not_stall_the_queue() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(4).unwrap();
    let buf = buf_of(&c);
    e.inject(Fault::SqHeadFrozen { count: 1_000_000 });
    for i in 0..200u64 {
        q.read(1, i % 64, 1, &buf, 0)
            .unwrap_or_else(|err| panic!("read {i}: {err}"));
    }
    assert_eq!(e.stats().bad_dma, 0);
}

// Issue 15 §1 (from the code): revoke's Bus Master Enable write is read back. A
// controller whose config space reads all-ones (gone, or ignoring the write) gives no
// proof, so the buffer of a command it may still execute is kept (leaked), never freed
// to be mapped again; before, revoke counted the unchecked write as proof.
#[test]
fn revoke_of_a_controller_that_ignores_bus_master_enable_keeps_its_memory() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_millis(200),
            ..quick()
        },
    )
    .unwrap();
    let mut q = c.io_queue(4).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let err = q.read(1, 0, 8, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    drop(buf);
    e.inject(Fault::Gone);
    c.revoke("test");
    drop(q);
    drop(c);
    // Without a proof nothing the controller may still reach was freed: the abandoned
    // command's buffer and the rings stay mapped (each holds a handle of the device).
    // With the unchecked write taken as proof, every handle went.
    assert!(e.extra_handles() > 0, "memory freed without proof");
}
