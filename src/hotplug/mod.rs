//! Hotplug (issue 7, in progress): kernel uevents as they happen.
//!
//! [`event`] parses the kernel's `NETLINK_KOBJECT_UEVENT` messages (pure, fuzzed);
//! [`monitor`] is the pollable socket that receives them.

pub mod event;
pub mod monitor;
