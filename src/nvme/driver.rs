//! The NVMe driver as a [`Driver`] of the [`crate::bus::Bus`]: it takes every NVMe
//! controller (class 01 08 02), brings it up, and gives it back on removal.

use super::{Controller, Options};
use crate::bus::backing::DeviceBacking;
use crate::bus::driver::{Driver, ProbeDevice, ProbeOutcome, Removal, RemovalCause};
use crate::bus::id::{CLASS_EXACT, IdEntry};

/// How long an orderly release or a removal request waits for the controller's shutdown:
/// the kernel's removal waits for the release.
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Device arguments the driver understands (`-a ADDR,io_queues=4,shadow_doorbells=0`,
/// `interrupts=1` for MSI-X completion interrupts instead of polling).
pub const DEVARGS: &[&str] = &["io_queues", "shadow_doorbells", "admin_depth", "interrupts"];

/// The NVMe driver. Its state of a device is the device's [`Controller`]: reach it through
/// [`Bus::device_state`](crate::bus::Bus::device_state)`::<NvmeDriver<B>>(address)` (and
/// every one through [`Bus::device_states`](crate::bus::Bus::device_states)).
pub struct NvmeDriver<B: DeviceBacking> {
    table: [IdEntry; 1],
    options: Options,
    _backing: std::marker::PhantomData<fn() -> B>,
}

impl<B: DeviceBacking> std::fmt::Debug for NvmeDriver<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDriver")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<B: DeviceBacking> NvmeDriver<B> {
    /// A driver bringing controllers up with `options` (devargs override them per device).
    pub fn new(options: Options) -> Self {
        NvmeDriver {
            table: [IdEntry::class(0x01_08_02, CLASS_EXACT)],
            options,
            _backing: std::marker::PhantomData,
        }
    }
}

fn parse_flag(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1" | "on" | "yes" | "true") => Ok(true),
        Some("0" | "off" | "no" | "false") => Ok(false),
        Some(v) => Err(format!("{key}={v}: expected 0 or 1")),
    }
}

fn parse_u16(key: &str, value: Option<&str>) -> Result<u16, String> {
    value
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{key}={}: expected a number from 1 to 65535", value.unwrap_or("")))
}

impl<B: DeviceBacking> Driver<B> for NvmeDriver<B> {
    type Device = Controller<B>;

    fn name(&self) -> &str {
        "nvme"
    }

    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }

    fn probe(&mut self, device: ProbeDevice<'_, B>) -> ProbeOutcome<Controller<B>> {
        let mut options = self.options.clone();
        if let Some(arg) = device.devarg {
            if let Err(e) = arg.reject_unknown(DEVARGS) {
                return ProbeOutcome::Failed(e.into());
            }
            for (key, value) in arg.args() {
                let r = match key {
                    "io_queues" => parse_u16(key, value).map(|n| options.io_queues = n),
                    "admin_depth" => parse_u16(key, value).map(|n| options.admin_depth = n),
                    "shadow_doorbells" => parse_flag(key, value).map(|b| options.shadow_doorbells = b),
                    "interrupts" => parse_flag(key, value).map(|b| options.interrupts = b),
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    return ProbeOutcome::Failed(format!("{}: {e}", device.record.address).into());
                }
            }
        }
        match Controller::init(device.backing.clone(), &options) {
            Ok(c) => {
                let info = c.info();
                log::info!(
                    "{}: {} (serial {}, firmware {}), {} namespace(s), {} I/O queues",
                    info.address,
                    info.identify.model,
                    info.identify.serial,
                    info.identify.firmware,
                    c.namespaces().len(),
                    info.io_queues
                );
                ProbeOutcome::Bound(c)
            }
            Err(e) => ProbeOutcome::Failed(e.into()),
        }
    }

    fn remove(&mut self, c: Controller<B>, removal: &Removal) {
        let address = removal.address;
        // What I/O threads see fail from now on is this removal's doing.
        c.begin_removal(&removal.cause.to_string());
        // An orderly release and a request (the device is still there) get a normal
        // shutdown first, bounded; a device that is gone or faulted does not.
        if matches!(removal.cause, RemovalCause::Detach | RemovalCause::Request)
            && let Err(e) = c.shutdown_within(SHUTDOWN_LIMIT)
        {
            log::warn!("{address}: shutdown before release: {e}");
        }
        c.revoke(&removal.cause.to_string());
    }
}
