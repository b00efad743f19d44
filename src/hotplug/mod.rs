//! Hotplug (issue 7, in progress): kernel uevents as they happen, received on the caller's
//! thread (no hidden thread, no callbacks). The `udev` feature, the SIGBUS path and the
//! bus's use of these events are still to come.
//!
//! [`event`] parses the kernel's `NETLINK_KOBJECT_UEVENT` messages (pure, fuzzed);
//! [`monitor`] is the pollable socket that receives them.

pub mod event;
pub mod monitor;
