//! The SIGBUS handler never swallows a SIGBUS that is not its own: each case runs in a
//! child process (this test binary again, one test, with `PCIBUS_FAULT_CHILD` set), which
//! installs the handler, raises a foreign SIGBUS, and must end as it would have without it.

use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::mman::{MapFlags, ProtFlags, mmap};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, raise, sigaction};
use pcibus::vfio::fault;

const CHILD: &str = "PCIBUS_FAULT_CHILD";
const PAGE: usize = 4096;

/// In the child (returns `None`): runs `body`. In the parent: runs test `name` in a child
/// and returns how it ended.
fn in_child(name: &str, body: impl FnOnce()) -> Option<ExitStatus> {
    if std::env::var_os(CHILD).is_some() {
        // No core file for the deaths these tests expect.
        setrlimit(Resource::RLIMIT_CORE, 0, 0).unwrap();
        body();
        return None;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A swallowed fault repeats forever: give up rather than hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("child {name} still running after 30 s: a SIGBUS repeats forever");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut output = String::new();
    child.stdout.take().unwrap().read_to_string(&mut output).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut output).unwrap();
    eprintln!("child {name}: {status}\n{output}");
    Some(status)
}

/// Maps a page of a file, outside any BAR (not registered), truncates the file and
/// reads the page: a SIGBUS with BUS_ADRERR that is not the handler's.
fn foreign_fault() {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0x5a; PAGE]).unwrap();
    // SAFETY: a fresh shared mapping at an address the kernel picks; it is never unmapped
    // (the process is about to end).
    let ptr = unsafe {
        mmap(
            None,
            NonZeroUsize::new(PAGE).unwrap(),
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            file.as_fd(),
            0,
        )
    }
    .unwrap();
    file.set_len(0).unwrap();
    // SAFETY: a volatile read inside the mapping made above; it faults, which is the test.
    let value = unsafe { ptr.cast::<u32>().as_ptr().read_volatile() };
    eprintln!("read {value:#x} after truncation: the SIGBUS was swallowed");
}

fn set_sigbus(handler: SigHandler, flags: SaFlags) {
    // SAFETY: the handlers passed here are async-signal-safe (they only call _exit).
    unsafe { sigaction(Signal::SIGBUS, &SigAction::new(handler, flags, SigSet::empty())) }.unwrap();
}

fn died_of_sigbus(status: ExitStatus) -> bool {
    status.signal() == Some(libc::SIGBUS)
}

#[test]
fn a_foreign_fault_kills_as_it_would_have() {
    // The previous action is the Rust runtime's (its stack overflow handler), which
    // restores the default for any fault outside a guard page.
    if let Some(status) = in_child("a_foreign_fault_kills_as_it_would_have", || {
        fault::install().unwrap();
        foreign_fault();
    }) {
        assert!(died_of_sigbus(status), "{status}");
    }
}

#[test]
fn a_foreign_fault_with_the_default_action_kills() {
    if let Some(status) = in_child("a_foreign_fault_with_the_default_action_kills", || {
        set_sigbus(SigHandler::SigDfl, SaFlags::empty());
        fault::install().unwrap();
        foreign_fault();
    }) {
        assert!(died_of_sigbus(status), "{status}");
    }
}

#[test]
fn a_foreign_fault_ignored_before_still_kills() {
    // The kernel kills on a fault even when SIGBUS is ignored.
    if let Some(status) = in_child("a_foreign_fault_ignored_before_still_kills", || {
        set_sigbus(SigHandler::SigIgn, SaFlags::empty());
        fault::install().unwrap();
        foreign_fault();
    }) {
        assert!(died_of_sigbus(status), "{status}");
    }
}

extern "C" fn exit_42(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(if code == libc::BUS_ADRERR { 42 } else { 41 }) }
}

extern "C" fn exit_43(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(43) }
}

#[test]
fn a_foreign_fault_goes_to_the_previous_handler_with_its_siginfo() {
    if let Some(status) = in_child(
        "a_foreign_fault_goes_to_the_previous_handler_with_its_siginfo",
        || {
            set_sigbus(SigHandler::SigAction(exit_42), SaFlags::SA_SIGINFO);
            fault::install().unwrap();
            foreign_fault();
        },
    ) {
        assert_eq!(status.code(), Some(42), "{status}");
    }
}

#[test]
fn a_foreign_fault_goes_to_a_previous_plain_handler() {
    if let Some(status) = in_child("a_foreign_fault_goes_to_a_previous_plain_handler", || {
        set_sigbus(SigHandler::Handler(exit_43), SaFlags::empty());
        fault::install().unwrap();
        foreign_fault();
    }) {
        assert_eq!(status.code(), Some(43), "{status}");
    }
}

#[test]
fn a_sent_sigbus_kills_as_it_would_have() {
    if let Some(status) = in_child("a_sent_sigbus_kills_as_it_would_have", || {
        set_sigbus(SigHandler::SigDfl, SaFlags::empty());
        fault::install().unwrap();
        raise(Signal::SIGBUS).unwrap();
        eprintln!("the sent SIGBUS was swallowed");
    }) {
        assert!(died_of_sigbus(status), "{status}");
    }
}

#[test]
fn a_sent_sigbus_ignored_before_stays_ignored() {
    if let Some(status) = in_child("a_sent_sigbus_ignored_before_stays_ignored", || {
        set_sigbus(SigHandler::SigIgn, SaFlags::empty());
        fault::install().unwrap();
        raise(Signal::SIGBUS).unwrap();
    }) {
        assert!(status.success(), "{status}");
    }
}

#[test]
fn install_is_idempotent_and_events_appear_with_it() {
    if let Some(status) = in_child("install_is_idempotent_and_events_appear_with_it", || {
        assert!(fault::events().is_none());
        fault::install().unwrap();
        let events = fault::events().unwrap();
        fault::install().unwrap();
        assert_eq!(
            std::os::fd::AsRawFd::as_raw_fd(&fault::events().unwrap()),
            std::os::fd::AsRawFd::as_raw_fd(&events)
        );
        assert!(fault::take().is_empty());
        assert_eq!(fault::count(), 0);
    }) {
        assert!(status.success(), "{status}");
    }
}
