//! Hotplug (issue 7, in progress): kernel uevents as they happen, received on the caller's
//! thread (no hidden thread, no callbacks). The SIGBUS path and the bus's use of these
//! events are still to come.
//!
//! [`event`] parses the kernel's `NETLINK_KOBJECT_UEVENT` messages (pure, fuzzed);
//! [`monitor`] is the pollable socket that receives them. With feature `udev`, `udev`'s
//! `UdevMonitor` gives the same [`monitor::Event`]s from libudev, after udev's rules ran
//! (device nodes made, `ID_*` properties added), for machines where udevd runs.

pub mod event;
pub mod monitor;
#[cfg(feature = "udev")]
#[cfg_attr(docsrs, doc(cfg(feature = "udev")))]
pub mod udev;
