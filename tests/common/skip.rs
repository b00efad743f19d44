//! Skipping a test that cannot run here (it needs root, CAP_NET_ADMIN, a loop device,
//! huge pages, a PCI device, lspci, kernel uevents...), visibly.
//!
//! The test harness captures `println!`/`eprintln!` of a passing test, so a skip printed
//! that way showed only with `--nocapture`, and the test counted as passed without a
//! word. [`skip`] writes to the process's stderr handle itself, which the harness does
//! not capture, so every `cargo test` prints `SKIPPED <test>: <why>` beside the test's
//! `ok` line. (libtest on stable has no runtime "ignored"; a static `#[ignore]` would also
//! skip these tests where they can run, as root in CI.)
//!
//! Included with `#[path = "common/skip.rs"] mod skip;` by the test files that skip.

use std::io::Write;

/// Says, outside the harness's capture, that the current test checks nothing here and
/// why. The caller then returns.
pub fn skip(why: impl std::fmt::Display) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("main");
    // Ignoring a failed write: a test cannot report more than that it could not run.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}
