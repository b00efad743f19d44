//! `UdevMonitor` on this machine (the tests are in udev/monitor.rs). They need the `udev`
//! feature (libudev); without it the one test here says so in plain `cargo test` output
//! (`SKIPPED ...`), rather than the binary running 0 tests without a word.

#[path = "common/skip.rs"]
mod skip;

#[cfg(feature = "udev")]
#[path = "udev/monitor.rs"]
mod monitor;

#[cfg(not(feature = "udev"))]
#[test]
fn udev_monitor() {
    skip::skip("built without the udev feature: cargo test --features udev --test udev (needs libudev-dev)");
}
