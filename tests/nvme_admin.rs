//! The NVMe driver's admin side on the emulated controller: log pages (SMART / health,
//! Error Information, any page by id), asynchronous events handed to a callback with the
//! log page that clears them, and admin passthrough.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcibus::bus::{DeviceBacking, RegisterIo};
use pcibus::nvme::spec::logs::critical;
use pcibus::nvme::spec::{self, AsyncEventType, Command, Status, admin, feature, lid};
use pcibus::nvme::{AdminData, AsyncEvent, CommandTimeout, Controller, NvmeError, Options};
use pcibus::testing::nvme::{CommandMatch, EmuConfig, EmulatedNvme, Fault, NamespaceConfig};

mod common;
use common::{quick, up};

fn emu() -> EmulatedNvme {
    EmulatedNvme::new(EmuConfig {
        namespaces: vec![NamespaceConfig::new(4096, 512)],
        ..EmuConfig::default()
    })
    .unwrap()
}

// Waits (at most 30 s) until `what` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "never: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

type Events = Arc<Mutex<Vec<AsyncEvent>>>;

// A controller whose events land in the returned list.
fn listening(e: &EmulatedNvme) -> (Controller<EmulatedNvme>, Events) {
    let c = up(e);
    let events: Events = Arc::default();
    let sink = Arc::clone(&events);
    c.on_async_event(move |ev| sink.lock().unwrap().push(ev)).unwrap();
    (c, events)
}

// Processes admin completions until `n` events reached the callback.
fn pump(c: &Controller<EmulatedNvme>, events: &Events, n: usize) {
    eventually(&format!("{n} events"), || {
        c.process_admin_completions().unwrap();
        events.lock().unwrap().len() >= n
    });
}

#[test]
fn smart_log_reports_the_io_done_and_what_the_controller_sets() {
    let e = emu();
    let c = up(&e);
    e.update_health(|h| {
        h.temperature = 318;
        h.percentage_used = 7;
        h.power_on_hours = 1234;
        h.unsafe_shutdowns = 2;
        h.media_errors = 1;
    });
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(1 << 20).unwrap();
    // 2,048 blocks written (1 MiB: two commands at the 512 KiB MDTS), 8 read.
    q.write(1, 0, 2048, &buf, 0).unwrap();
    q.read(1, 0, 8, &buf, 0).unwrap();
    let s = c.smart_log().unwrap();
    assert_eq!(s.critical_warning, 0);
    assert_eq!(s.temperature_celsius(), Some(45));
    assert_eq!((s.available_spare, s.available_spare_threshold), (100, 10));
    assert_eq!(s.percentage_used, 7);
    assert_eq!((s.host_write_commands, s.host_read_commands), (2, 1));
    // Thousands of 512-byte units, rounded up: 2,048 blocks are 3 units, 8 blocks 1.
    assert_eq!((s.data_units_written, s.data_units_read), (3, 1));
    assert_eq!((s.power_cycles, s.power_on_hours), (1, 1234));
    assert_eq!((s.unsafe_shutdowns, s.media_errors), (2, 1));
    assert_eq!(s.error_log_entries, 0);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn error_log_lists_failed_commands_newest_first() {
    let e = emu();
    let c = up(&e);
    assert_eq!(c.error_log().unwrap(), []);
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    e.inject(Fault::Status {
        command: CommandMatch::Io(spec::io::READ),
        status: Status::DATA_TRANSFER_ERROR,
        count: 1,
    });
    assert!(q.read(1, 100, 1, &buf, 0).is_err());
    e.inject(Fault::Status {
        command: CommandMatch::Io(spec::io::WRITE),
        status: Status::LBA_OUT_OF_RANGE,
        count: 1,
    });
    assert!(q.write(1, 7, 1, &buf, 0).is_err());
    let log = c.error_log().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].error_count, log[1].error_count), (2, 1));
    assert_eq!(
        (log[0].status, log[0].lba, log[0].nsid),
        (Status::LBA_OUT_OF_RANGE, 7, 1)
    );
    assert_eq!((log[1].status, log[1].lba), (Status::DATA_TRANSFER_ERROR, 100));
    assert_eq!(log[0].sqid, q.qid());
    assert_eq!(c.smart_log().unwrap().error_log_entries, 2);
}

#[test]
fn get_log_page_honours_offset_and_length_and_refuses_what_it_cannot_express() {
    let e = emu();
    let c = up(&e);
    e.update_health(|h| h.temperature_sensors[1] = 0x0155);
    let whole = c.get_log_page(lid::SMART_HEALTH, spec::NSID_ALL, 0, 512).unwrap();
    // Temperature sensor 2 at bytes 202–203.
    let part = c.get_log_page(lid::SMART_HEALTH, spec::NSID_ALL, 200, 4).unwrap();
    assert_eq!(part, whole[200..204]);
    assert_eq!(part, [0, 0, 0x55, 0x01]);
    for (offset, len) in [(0, 0), (0, 6), (2, 4)] {
        assert!(
            matches!(
                c.get_log_page(lid::SMART_HEALTH, spec::NSID_ALL, offset, len),
                Err(NvmeError::Invalid(_))
            ),
            "offset {offset} len {len}"
        );
    }
    let too_much = c.info().max_transfer as usize + 4;
    assert!(matches!(
        c.get_log_page(lid::SMART_HEALTH, spec::NSID_ALL, 0, too_much),
        Err(NvmeError::Invalid(_))
    ));
}

#[test]
fn a_smart_warning_reaches_the_callback_with_the_health_log() {
    let e = emu();
    let (c, events) = listening(&e);
    // AERL + 1 = 4 requests outstanding, after the warnings were enabled.
    eventually("4 AERs", || e.stats().admin(admin::ASYNC_EVENT) == 4);
    assert_eq!(e.stats().admin(admin::SET_FEATURES), 2);
    e.update_health(|h| {
        h.critical_warning = critical::TEMPERATURE;
        h.temperature = 360;
    });
    pump(&c, &events, 1);
    let ev = events.lock().unwrap()[0].clone();
    assert_eq!(
        (ev.kind, ev.info, ev.log_page),
        (AsyncEventType::SmartHealth, 1, lid::SMART_HEALTH)
    );
    assert_eq!(ev.describe(), Some("temperature threshold"));
    let smart = ev.smart().unwrap();
    assert_eq!(
        (smart.critical_warning, smart.temperature),
        (critical::TEMPERATURE, 360)
    );
    // The request that completed was replaced.
    eventually("a fifth AER", || e.stats().admin(admin::ASYNC_EVENT) == 5);
    // Reading the page unmasked SMART events: the next warning is reported too.
    e.update_health(|h| h.critical_warning |= critical::SPARE);
    pump(&c, &events, 2);
    assert_eq!(events.lock().unwrap()[1].info, 2);
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn a_namespace_notice_brings_the_changed_namespace_list() {
    let e = emu();
    let (c, events) = listening(&e);
    eventually("4 AERs", || e.stats().admin(admin::ASYNC_EVENT) == 4);
    e.notify_namespace_changed(&[1, 9]);
    pump(&c, &events, 1);
    let ev = events.lock().unwrap()[0].clone();
    assert_eq!(ev.kind, AsyncEventType::Notice);
    assert_eq!(ev.describe(), Some("namespace attribute changed"));
    assert_eq!(ev.changed_namespaces(), Some(vec![1, 9]));
    assert_eq!(ev.smart(), None);
    // The list was read (and so cleared): the next change is a notice of its own.
    e.notify_namespace_changed(&[3]);
    pump(&c, &events, 2);
    assert_eq!(events.lock().unwrap()[1].changed_namespaces(), Some(vec![3]));
}

#[test]
fn an_invalid_doorbell_write_is_reported_and_cleared_by_reading_the_error_log() {
    let e = emu();
    let (c, events) = listening(&e);
    eventually("4 AERs", || e.stats().admin(admin::ASYNC_EVENT) == 4);
    let bar = e.map_bar(0).unwrap();
    // A doorbell of a queue that does not exist: Invalid Doorbell Write Value or Register.
    bar.write32(0x3000, 1).unwrap();
    pump(&c, &events, 1);
    let ev = events.lock().unwrap()[0].clone();
    assert_eq!(
        (ev.kind, ev.log_page),
        (AsyncEventType::Error, lid::ERROR_INFORMATION)
    );
    assert_eq!(ev.describe(), Some("write to an invalid doorbell register"));
    let errors = ev.errors().unwrap();
    assert_eq!((errors.len(), errors[0].sqid), (1, 0xffff));
    // Reading the log page unmasked error events.
    bar.write32(0x3000, 1).unwrap();
    pump(&c, &events, 2);
    assert_eq!(events.lock().unwrap()[1].errors().unwrap().len(), 2);
}

#[test]
fn an_event_harvested_by_another_admin_command_is_not_lost() {
    let e = emu();
    let (c, events) = listening(&e);
    eventually("4 AERs", || e.stats().admin(admin::ASYNC_EVENT) == 4);
    let posted = e.stats().completions;
    e.complete_async_event(0x00c0_0007); // vendor specific, log page C0h
    eventually("the event posted", || e.stats().completions == posted + 1);
    // This command finds the event's completion ahead of its own.
    c.smart_log().unwrap();
    assert_eq!(c.process_admin_completions().unwrap(), 1);
    let ev = events.lock().unwrap()[0].clone();
    assert_eq!(
        (ev.kind, ev.log_page, ev.dw0),
        (AsyncEventType::Vendor, 0xc0, 0x00c0_0007)
    );
    // Once only.
    assert_eq!(c.process_admin_completions().unwrap(), 0);
    assert_eq!(events.lock().unwrap().len(), 1);
}

#[test]
fn events_are_armed_again_after_a_reset() {
    let e = emu();
    let (c, events) = listening(&e);
    eventually("4 AERs", || e.stats().admin(admin::ASYNC_EVENT) == 4);
    c.reset().unwrap();
    eventually("4 more AERs", || e.stats().admin(admin::ASYNC_EVENT) == 8);
    // The configuration again (Number of Queues, then Asynchronous Event Configuration).
    assert_eq!(e.stats().admin(admin::SET_FEATURES), 4);
    e.notify_namespace_changed(&[1]);
    pump(&c, &events, 1);
    assert_eq!(events.lock().unwrap()[0].changed_namespaces(), Some(vec![1]));
}

#[test]
fn without_a_callback_no_event_is_asked_for() {
    let e = emu();
    let c = up(&e);
    assert_eq!(c.process_admin_completions().unwrap(), 0);
    c.smart_log().unwrap();
    assert_eq!(e.stats().admin(admin::ASYNC_EVENT), 0);
}

#[test]
fn admin_passthru_moves_data_both_ways_and_returns_any_status() {
    let e = emu();
    let c = up(&e);
    // Identify Controller: 4096 bytes in.
    let mut cmd = Command::new(admin::IDENTIFY);
    cmd.cdw[0] = spec::cns::CONTROLLER;
    let (done, data) = c.admin_passthru(cmd, AdminData::FromDevice(4096)).unwrap();
    assert_eq!(done.status(), Status::SUCCESS);
    assert_eq!(&data[24..44], b"pcibus emulated NVMe");
    // Three pages: PRP1 and a PRP list. The page is 512 bytes; the rest reads zero.
    let cmd = spec::get_log_page_command(lid::SMART_HEALTH, spec::NSID_ALL, 3 * 4096, 0, false).unwrap();
    let (done, data) = c.admin_passthru(cmd, AdminData::FromDevice(3 * 4096)).unwrap();
    assert!(done.status().is_success());
    assert_eq!(data.len(), 3 * 4096);
    assert_eq!(data[3], 100, "available spare");
    // Get Features (Number of Queues): dword 0 is the answer.
    let mut cmd = Command::new(admin::GET_FEATURES);
    cmd.cdw[0] = u32::from(feature::NUMBER_OF_QUEUES);
    let (done, data) = c.admin_passthru(cmd, AdminData::None).unwrap();
    assert_eq!(done.dw0, 63 << 16 | 63);
    assert!(data.is_empty());
    // An opcode the controller does not have: its status, not an error.
    let (done, _) = c
        .admin_passthru(Command::new(0xc1), AdminData::ToDevice(&[0x5a; 8192]))
        .unwrap();
    assert_eq!(done.status(), Status::INVALID_OPCODE);
    let too_much = vec![0u8; c.info().max_transfer as usize + 1];
    assert!(matches!(
        c.admin_passthru(Command::new(0xc1), AdminData::ToDevice(&too_much)),
        Err(NvmeError::Invalid(_))
    ));
    assert_eq!(e.stats().bad_dma, 0);
}

#[test]
fn a_log_page_read_that_times_out_keeps_its_buffer_from_reuse() {
    let e = emu();
    let c = Controller::init(
        e.clone(),
        &Options {
            admin_timeout: Duration::from_millis(200),
            ..quick()
        },
    )
    .unwrap();
    e.inject(Fault::Stall {
        command: CommandMatch::Admin(admin::GET_LOG_PAGE),
        count: 1,
    });
    assert!(matches!(c.smart_log(), Err(NvmeError::Timeout { .. })));
    // Memory allocated now would get the log buffer's IOVA if it had been freed.
    let buf = c.alloc_buffer(4096).unwrap();
    let posted = e.stats().completions;
    // Released once the controller holds it (a release before the fetch releases nothing).
    eventually("the command fetched", || {
        e.stats().admin(admin::GET_LOG_PAGE) == 1
    });
    e.release_stalled();
    eventually("the stalled command done", || e.stats().completions == posted + 1);
    let mut b = vec![0u8; 4096];
    buf.read_at(0, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the late log page landed in a new buffer"
    );
    assert_eq!(e.stats().late_dma, 0);
}

#[test]
fn the_timeout_callback_hears_of_a_timed_out_command_before_its_abort() {
    let e = emu();
    let c = Controller::init(
        e.clone(),
        &Options {
            io_timeout: Duration::from_secs(1),
            ..quick()
        },
    )
    .unwrap();
    let seen: Arc<Mutex<Vec<(CommandTimeout, u64)>>> = Arc::default();
    {
        let (seen, e) = (Arc::clone(&seen), e.clone());
        // With the Aborts sent so far: none yet when it is called.
        c.on_timeout(move |t| seen.lock().unwrap().push((t, e.stats().admin(admin::ABORT))));
    }
    e.inject(Fault::NeverComplete {
        command: CommandMatch::Io(spec::io::READ),
        count: 1,
    });
    let mut q = c.io_queue(8).unwrap();
    let buf = c.alloc_buffer(4096).unwrap();
    assert!(matches!(q.read(1, 0, 8, &buf, 0), Err(NvmeError::Timeout { .. })));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (t, aborts) = seen[0];
    assert_eq!((t.qid, t.opcode, aborts), (q.qid(), spec::io::READ, 0));
    eventually("the Abort", || e.stats().admin(admin::ABORT) == 1);
}

#[test]
fn the_timeout_callback_hears_of_an_admin_command_timing_out() {
    let e = emu();
    let c = Controller::init(
        e.clone(),
        &Options {
            admin_timeout: Duration::from_millis(200),
            ..quick()
        },
    )
    .unwrap();
    let seen: Arc<Mutex<Vec<CommandTimeout>>> = Arc::default();
    let sink = Arc::clone(&seen);
    c.on_timeout(move |t| sink.lock().unwrap().push(t));
    e.inject(Fault::Stall {
        command: CommandMatch::Admin(admin::GET_LOG_PAGE),
        count: 1,
    });
    assert!(c.smart_log().is_err());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].qid, seen[0].opcode), (0, admin::GET_LOG_PAGE));
    e.release_stalled();
}
