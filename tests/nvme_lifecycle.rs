//! The NVMe driver over a controller's life on the emulated controller: what the last
//! handle does with memory the controller may still reach, what an Abort's answer leads
//! to, how often a failing controller is reset, and namespaces changing at run time.

use std::time::{Duration, Instant};

use pcibus::bus::DeviceBacking;
use pcibus::nvme::spec::{admin, io};
use pcibus::nvme::{Controller, IoQueue, IoRequest, NvmeError, Options};
use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault, NamespaceConfig};

mod common;
use common::{emu, quick, up};

// The PCI Command register's Bus Master Enable.
fn bus_master(e: &EmulatedNvme) -> bool {
    let mut command = [0u8; 2];
    e.read_config(4, &mut command).unwrap();
    u16::from_le_bytes(command) & 1 << 2 != 0
}

// Issue 15 §1: the admin queue's rings belong to the controller while it is enabled with
// bus mastering on. An Asynchronous Event Request outstanding when the controller's last
// handle goes completes when an event comes, into the admin completion queue: the last
// handle must first make the controller unable to reach the rings (disable it), and free
// them only then.
#[test]
fn the_last_handle_disables_the_controller_before_it_frees_the_admin_rings() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    c.on_async_event(|_| {}).unwrap();
    drop(c);
    assert_eq!(e.extra_handles(), 0, "the driver let go of the controller");
    // An event the controller reports on its own: a SMART / health notice (Immediate).
    e.complete_async_event(0x0002_0000);
    let start = Instant::now();
    while e.is_processing() && e.stats().bad_dma == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        e.stats().bad_dma,
        0,
        "the controller posted into the freed admin completion queue"
    );
    assert!(!e.is_processing(), "the controller was left enabled");
}

// When the controller does not finish disabling within its ready timeout, Bus Master
// Enable cleared is the proof instead: the memory is released then, not before.
#[test]
fn the_last_handle_turns_bus_mastering_off_when_the_disable_does_not_finish() {
    let e = emu(EmuConfig {
        cap_timeout: 1,
        ..EmuConfig::default()
    });
    let c = up(&e);
    e.inject(Fault::ReadySlow(Duration::from_secs(3600)));
    drop(c);
    assert!(!bus_master(&e), "bus mastering was left on");
    assert_eq!(e.extra_handles(), 0, "the rings were not released");
}

// Without any proof (the device is gone: neither the disable nor the Command register
// write can be seen to take effect), the memory leaks rather than being freed under a
// controller that may still write it.
#[test]
fn without_proof_the_last_handle_leaks_the_admin_rings() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    e.inject(Fault::Gone);
    drop(c);
    assert!(
        e.extra_handles() > 0,
        "the admin rings were freed with no proof the controller cannot reach them"
    );
}

// A normal drop after revoke (bus mastering already off) needs nothing more.
#[test]
fn after_revoke_the_last_handle_releases_everything() {
    let e = emu(EmuConfig::default());
    let c: Controller<EmulatedNvme> = Controller::init(e.clone(), &quick()).unwrap();
    c.revoke("test");
    drop(c);
    assert_eq!(e.extra_handles(), 0);
}

// Submits a read whenever none is outstanding and polls, until a poll fails with a fatal
// error (returned) or the controller was enabled `enables` times (`None`).
fn drive_until_fatal(
    e: &EmulatedNvme,
    c: &Controller<EmulatedNvme>,
    q: &mut IoQueue<EmulatedNvme>,
    enables: u64,
) -> Option<NvmeError> {
    let buf = c.alloc_buffer(4096).unwrap();
    let mut outstanding = 0u32;
    let start = Instant::now();
    while e.stats().enables < enables && start.elapsed() < Duration::from_secs(60) {
        if outstanding == 0 && q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 0).is_ok() {
            outstanding = 1;
            let _ = q.ring();
        }
        let mut ended = 0;
        let polled = q.poll(|_, _| ended += 1);
        outstanding -= ended.min(outstanding);
        match polled {
            Err(err) if err.is_fatal() => return Some(err),
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    None
}

// Issue 15 §1/§4: a controller that fails (CSTS.CFS) again after every reset was reset at
// every poll that saw it, forever. Recovery resets back off and are bounded: after a
// number of them in a row that did not bring the controller back, it is declared failed.
#[test]
fn a_controller_failing_after_every_reset_is_not_reset_forever() {
    let e = emu(EmuConfig::default());
    let c = up(&e);
    let mut q = c.io_queue(8).unwrap();
    e.inject(Fault::FatalOnIo);
    let end = drive_until_fatal(&e, &c, &mut q, 40);
    let resets = e.stats().enables - 1;
    assert!(end.is_some(), "still resetting after {resets} resets");
    assert!(resets <= 10, "{resets} resets");
}

// A controller that fails on every I/O (CSTS.CFS), with short recovery backoffs and a
// limit of `limit` recovery resets, driven until it is declared failed
// (`NvmeError::Failed`); its I/O queue has seen that.
fn declared_failed(limit: u32) -> (EmulatedNvme, Controller<EmulatedNvme>, IoQueue<EmulatedNvme>) {
    let e = emu(EmuConfig::default());
    let options = Options {
        recovery_backoff: Duration::from_millis(1),
        recovery_backoff_max: Duration::from_millis(4),
        recovery_limit: limit,
        ..quick()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    let mut q = c.io_queue(8).unwrap();
    e.inject(Fault::FatalOnIo);
    let end = drive_until_fatal(&e, &c, &mut q, 40);
    assert!(matches!(end, Some(NvmeError::Failed(_))), "{end:?}");
    (e, c, q)
}

// The same, counted: with a limit of 3, three recovery resets, then the controller is
// declared failed; every queue operation says so, and nothing resets it but
// `Controller::reset`, which brings it back.
#[test]
fn recovery_resets_are_bounded_then_the_controller_is_declared_failed() {
    let (e, c, mut q) = declared_failed(3);
    assert_eq!(e.stats().enables - 1, 3, "recovery resets");
    let buf = c.alloc_buffer(4096).unwrap();
    for _ in 0..100 {
        let r = q.poll(|_, _| {});
        assert!(matches!(r, Err(NvmeError::Failed(_))), "{r:?}");
    }
    let r = q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 1);
    assert!(matches!(r, Err(NvmeError::Failed(_))), "{r:?}");
    assert!(matches!(c.io_queue(8), Err(NvmeError::Failed(_))));
    assert_eq!(e.stats().enables - 1, 3, "no more resets once failed");
    drop(q);
    e.clear_faults();
    c.reset().unwrap();
    let mut q = c.io_queue(8).unwrap();
    q.read(1, 0, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

// While the backoff runs, a poll that finds the controller failed returns at once with
// `RecoveryPending` (it neither sleeps nor resets), and the request stays outstanding.
#[test]
fn a_poll_during_the_backoff_neither_waits_nor_resets() {
    let e = emu(EmuConfig::default());
    let options = Options {
        recovery_backoff: Duration::from_secs(3600),
        recovery_backoff_max: Duration::from_secs(3600),
        ..quick()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    let mut q = c.io_queue(8).unwrap();
    e.inject(Fault::FatalOnIo);
    // The first recovery reset is at once.
    let end = drive_until_fatal(&e, &c, &mut q, 2);
    assert!(end.is_none(), "{end:?}");
    let buf = c.alloc_buffer(4096).unwrap();
    let mut pending = 0;
    let start = Instant::now();
    while pending < 50 && start.elapsed() < Duration::from_secs(60) {
        if q.free_slots() == 7 {
            let _ = q.submit(&IoRequest::read(1, 0, 1, &buf, 0), 2);
        }
        match q.poll(|tag, r| panic!("request {tag} ended during the backoff: {r:?}")) {
            Err(NvmeError::RecoveryPending { resets, .. }) => {
                assert_eq!(resets, 1);
                pending += 1;
            }
            Err(other) => panic!("{other}"),
            Ok(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    assert_eq!(pending, 50);
    assert_eq!(e.stats().enables, 2, "bring-up and one recovery reset");
}

// Issue 15 §1/§4: an abandoned command's Abort decides what follows. A command slower
// than two I/O timeouts, whose Abort the controller answers only after executing it (one
// thread, in order: `Fault::Delay` delays the Abort as much): the queue waits for the
// answer (within the admin timeout) and the command completes meanwhile, so no reset is
// needed. The queue reset the controller one I/O timeout after the timeout instead,
// while the Abort was still unanswered, ending every other queue's requests for nothing.
#[test]
fn an_unanswered_abort_is_waited_for_before_a_reset() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_secs(1),
            ..quick()
        },
    )
    .unwrap();
    let mut q = c.io_queue(4).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Delay(Duration::from_millis(2500)));
    let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    let start = Instant::now();
    while q.free_slots() < 3 && start.elapsed() < Duration::from_secs(60) {
        q.poll(|tag, r| panic!("request {tag} ended twice: {r:?}"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        q.free_slots(),
        3,
        "the late command's completion gave its slot back"
    );
    assert_eq!(
        e.stats().enables,
        1,
        "the controller was reset though the command completed"
    );
    e.clear_faults();
    // The Abort, answered once the emulator's one thread has slept its delay too: an admin
    // command runs behind it.
    c.smart_log().unwrap();
    q.read(1, 0, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().admin(admin::ABORT), 1);
    assert_eq!(e.stats().bad_dma, 0);
}

// The strict default: Abort aborts nothing ("not aborted", dword 0 bit 0). The command
// stays live in the controller; when it has not completed a further I/O timeout after
// that answer, the controller is reset: the disable releases its buffer, and the request
// (which had its Timeout) does not end again.
#[test]
fn a_command_not_aborted_and_still_stuck_is_ended_by_a_reset() {
    let e = emu(EmuConfig::default());
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_secs(1),
            ..quick()
        },
    )
    .unwrap();
    let mut q = c.io_queue(4).unwrap();
    let handles = e.extra_handles();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::Io(io::READ),
        count: 1,
    });
    let err = q.read(1, 0, 8, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err}");
    drop(buf);
    let start = Instant::now();
    while q.free_slots() < 3 && start.elapsed() < Duration::from_secs(60) {
        q.poll(|tag, r| panic!("request {tag} ended twice: {r:?}"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(q.free_slots(), 3, "the reset gave the slot back");
    let s = e.stats();
    assert_eq!(s.admin(admin::ABORT), 1);
    assert_eq!(s.enables, 2, "one reset");
    // The stalled read is gone with the reset: releasing it moves nothing.
    e.release_stalled();
    q.read(1, 0, 1, &c.alloc_buffer(4096).unwrap(), 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
    assert_eq!(e.stats().late_dma, 0);
    assert_eq!(
        e.extra_handles(),
        handles,
        "the buffer was released after the reset"
    );
}

// Issue 15 §7: a Namespace Attribute Changed event names the namespaces that changed
// (Changed Namespace List); the controller's namespace list follows: a namespace detached
// leaves it (and I/O to it fails, saying so, before reaching the controller), one
// attached joins it, one resized has its new size. It stayed as bring-up found it.
#[test]
fn namespace_changes_reach_the_namespace_list() {
    use std::sync::{Arc, Mutex};
    let e = emu(EmuConfig {
        namespaces: vec![
            NamespaceConfig::new(4096, 512),
            NamespaceConfig::new(8192, 512),
            NamespaceConfig::new(2048, 4096),
        ],
        ..EmuConfig::default()
    });
    assert!(e.detach_namespace(3));
    let c = up(&e);
    let ids = |c: &Controller<EmulatedNvme>| c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>();
    assert_eq!(ids(&c), [1, 2]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    c.on_async_event(move |ev| seen.lock().unwrap().push(ev)).unwrap();
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    q.read(2, 0, 1, &buf, 0).unwrap();
    assert!(e.detach_namespace(2));
    assert!(e.resize_namespace(1, 8192));
    assert!(e.attach_namespace(3));
    let start = Instant::now();
    while events.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(30) {
        c.process_admin_completions().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut changed = events.lock().unwrap()[0].changed_namespaces().unwrap();
    changed.sort_unstable();
    assert_eq!(changed, [1, 2, 3]);
    assert_eq!(ids(&c), [1, 3]);
    assert_eq!(c.namespace(1).map(|n| n.blocks), Some(8192));
    assert_eq!(
        c.namespace(3).map(|n| (n.blocks, n.block_size)),
        Some((2048, 4096))
    );
    assert!(c.namespace(2).is_none());
    let commands = e.stats().io(io::READ);
    let err = q.read(2, 0, 1, &buf, 0).unwrap_err();
    assert!(err.to_string().contains("namespace 2 was removed"), "{err}");
    assert_eq!(
        e.stats().io(io::READ),
        commands,
        "the read reached the controller"
    );
    // The new size and the new namespace, from the queue made before the change.
    q.read(1, 8000, 1, &buf, 0).unwrap();
    q.read(3, 0, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

// A queue remembers the namespace its latest read or write named (to skip the namespace
// checks on the next one): a namespace that shrinks under it is checked against its new
// size all the same.
#[test]
fn a_namespace_that_shrinks_refuses_reads_past_its_new_end() {
    let e = emu(EmuConfig {
        namespaces: vec![NamespaceConfig::new(8192, 512)],
        ..EmuConfig::default()
    });
    let c = up(&e);
    c.on_async_event(|_| {}).unwrap();
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    q.read(1, 8000, 1, &buf, 0).unwrap();
    assert!(e.resize_namespace(1, 4096));
    let start = Instant::now();
    while c.namespace(1).map(|n| n.blocks) != Some(4096) && start.elapsed() < Duration::from_secs(30) {
        c.process_admin_completions().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.namespace(1).map(|n| n.blocks), Some(4096));
    let commands = e.stats().io(io::READ);
    let err = q.read(1, 8000, 1, &buf, 0).unwrap_err();
    assert!(matches!(err, NvmeError::Invalid(_)), "{err}");
    assert_eq!(
        e.stats().io(io::READ),
        commands,
        "the read reached the controller"
    );
    q.read(1, 4000, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}

// The blocking calls (`read`, `run`) wait through a recovery's backoff: they end with
// the reset's or the failure's error, never with `RecoveryPending` and the request left
// behind in the queue.
#[test]
fn a_blocking_read_waits_through_the_recovery_backoff() {
    let e = emu(EmuConfig::default());
    let options = Options {
        // Longer than a reset takes (the emulator's ready delays), so reads meet it.
        recovery_backoff: Duration::from_millis(300),
        recovery_backoff_max: Duration::from_millis(300),
        recovery_limit: 3,
        ..quick()
    };
    let c = Controller::init(e.clone(), &options).unwrap();
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::FatalOnIo);
    let mut errors = Vec::new();
    for _ in 0..20 {
        let err = q.read(1, 0, 1, &buf, 0).unwrap_err();
        let failed = matches!(err, NvmeError::Failed(_));
        errors.push(err.to_string());
        assert!(
            matches!(err, NvmeError::Reset(_) | NvmeError::Failed(_)),
            "{errors:#?}"
        );
        if failed {
            break;
        }
    }
    assert!(
        errors.last().is_some_and(|e| e.contains("failed for good")),
        "{errors:#?}"
    );
}

// Issue 15 §4: a queue that saw the controller declared failed works again once the
// application's `Controller::reset` brought the controller back: it creates itself again at
// its next use, as after a recovery reset, instead of staying failed for good.
#[test]
fn a_queue_that_saw_the_controller_failed_works_after_an_explicit_reset() {
    let (e, c, mut q) = declared_failed(2);
    e.clear_faults();
    c.reset().unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    q.read(1, 0, 1, &buf, 0).unwrap();
    // The queue id is the same one, not a second queue next to a dead one.
    let mut other = c.io_queue(8).unwrap();
    other.read(1, 0, 1, &buf, 0).unwrap();
    assert_eq!(e.stats().bad_dma, 0);
}
