//! A guarded read stuck in the kernel (a removal pending) is a thread in uninterruptible
//! sleep, and a process cannot exit until all its threads have: `pcibus list --read all`
//! would print its listing by the deadline and then hang its caller (a shell waiting for
//! it, `$(pcibus list ...)` reading to end of file) until the removal completes. So the
//! command runs in a child process, which, once done, lets go of the caller's stdin,
//! stdout and stderr and reports its exit code to the parent; the parent, the process
//! the caller waits for, exits with it at once. A stuck child lingers harmlessly and goes
//! when the kernel lets its reads return.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, pipe};

/// Forks. Returns in the child, with the pipe to report the exit code on; the parent
/// never returns. `None` (no fork) if the pipe or the fork fails: then the command runs
/// in this process.
pub fn start() -> Option<OwnedFd> {
    let (read_end, write_end) = pipe().ok()?;
    // SAFETY: called at the top of main, before pcibus starts any thread, so the child
    // is a copy of a single-threaded process and may do anything afterwards.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read_end);
            Some(write_end)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let code = loop {
                match nix::unistd::read(&read_end, &mut byte) {
                    Ok(1) => {
                        reap_unless_stuck(child);
                        break i32::from(byte[0]);
                    }
                    Err(Errno::EINTR) => continue,
                    // The child ended without reporting (killed): its status says how.
                    _ => {
                        break match waitpid(child, None) {
                            Ok(WaitStatus::Exited(_, code)) => code,
                            Ok(WaitStatus::Signaled(_, signal, _)) => 128 + signal as i32,
                            _ => 1,
                        };
                    }
                }
            };
            std::process::exit(code);
        }
        Err(_) => None,
    }
}

/// A child that reported normally exits a moment later: reap it, so that its CPU time
/// and peak RSS count in what the caller measures (`time`, wait4). One with reads stuck
/// in the kernel does not exit: leave it after 100 ms.
fn reap_unless_stuck(child: nix::unistd::Pid) {
    use nix::sys::wait::WaitPidFlag;
    for _ in 0..100 {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(1)),
            _ => return,
        }
    }
}

/// In the child, when done: flush, hand the caller's standard streams back, report.
pub fn finish(report: OwnedFd, code: u8) {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if let Ok(null) = std::fs::File::options().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    let _ = nix::unistd::write(&report, &[code]);
}
