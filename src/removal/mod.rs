//! Removal safety: the pool that runs reads which may block in the kernel, and the
//! registry of devices whose removal is pending.
//!
//! A read of an attribute whose `show()` takes the device lock blocks for as long as a
//! removal of that device is pending. [`pool::BlockingPool`] runs such reads on helper
//! threads and waits for them only until a deadline; [`registry::RemovalRegistry`] records
//! the devices whose removal is pending, so that scans keep away from them.

pub mod held;
pub mod pool;
pub mod registry;
