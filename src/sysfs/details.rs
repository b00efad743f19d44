//! What `pcibus show` adds to a scan record: the full config space and its capabilities,
//! link speed and width, modalias, local CPUs.

use std::io;
use std::time::{Duration, Instant};

use crate::config::{self, Capability, ExtCapability};
use crate::model::Link;
use crate::record::{DeviceRecord, Problem, ProblemKind};
use crate::removal::pool::BlockingPool;
use crate::sysfs::dir::{ATTR_MAX, DirFd};
use crate::sysfs::parse;
use crate::sysfs::scan::SysfsRoot;

/// Details of one device beyond its scan record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Details {
    /// Standard capabilities (from `config`).
    pub capabilities: Vec<Capability>,
    /// Extended capabilities (when `config` has 4096 bytes, i.e. read as root).
    pub extended_capabilities: Vec<ExtCapability>,
    /// Current link (`current_link_speed`, `current_link_width`).
    pub current_link: Option<Link>,
    /// Maximum link (`max_link_speed`, `max_link_width`).
    pub max_link: Option<Link>,
    /// `modalias`.
    pub modalias: Option<String>,
    /// `local_cpulist`.
    pub local_cpus: Option<Vec<u32>>,
    /// The bytes of `config` as read (64 bytes unprivileged, 256 or 4096 as root), for
    /// decoders such as [`crate::capability::decode`]; `None` when it was not read. Not
    /// in the JSON: its decoded parts are.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub config: Option<Vec<u8>>,
    /// What went wrong reading these.
    pub problems: Vec<Problem>,
}

/// How long `read` waits for `config`, which stalls while the device is being reset.
pub const CONFIG_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads the details of `dev`. `config` is read through a guard (a read waits while the
/// device is being reset) unless the device's removal is pending; the rest takes no device lock.
pub fn read(root: &SysfsRoot, dev: &DeviceRecord) -> Details {
    let mut x = Details::default();
    let report = |x: &mut Details, attribute, kind| x.problems.push(Problem { attribute, kind });
    let dir = match DirFd::open(&root.device_dir(dev.address)) {
        Ok(dir) => dir,
        Err(e) => {
            report(&mut x, "device directory", ProblemKind::io(&e));
            return x;
        }
    };
    if dev.removal_pending {
        report(&mut x, "config", ProblemKind::RemovalPending);
    } else {
        let path = root.device_dir(dev.address).join("config");
        match BlockingPool::default().read(&path, ATTR_MAX, Instant::now() + CONFIG_TIMEOUT) {
            // Short of the capabilities (an unprivileged reader's 64 bytes): said, not
            // shown as a device without capabilities.
            Ok(Ok(cfg))
                if let Some(kind) = ProblemKind::config_restricted(
                    cfg.len(),
                    std::fs::metadata(&path).map_or(0, |m| m.len()),
                ) =>
            {
                report(&mut x, "config", kind);
            }
            Ok(Ok(cfg)) => {
                match config::capabilities(&cfg) {
                    Ok(c) => x.capabilities = c,
                    Err(e) => report(&mut x, "config", ProblemKind::Parse(e)),
                }
                match config::extended_capabilities(&cfg) {
                    Ok(c) => x.extended_capabilities = c,
                    Err(e) => report(&mut x, "config", ProblemKind::Parse(e)),
                }
                x.config = Some(cfg);
            }
            Ok(Err(e)) => report(&mut x, "config", ProblemKind::io(&e)),
            Err(crate::PoolError::TimedOut { .. }) => report(
                &mut x,
                "config",
                ProblemKind::TimedOut {
                    waited: CONFIG_TIMEOUT,
                },
            ),
            Err(crate::PoolError::NotStarted { .. }) => report(
                &mut x,
                "config",
                ProblemKind::NotStarted {
                    waited: CONFIG_TIMEOUT,
                },
            ),
            Err(e) => report(
                &mut x,
                "config",
                ProblemKind::Io {
                    kind: io::ErrorKind::Other,
                    errno: None,
                    message: e.to_string(),
                },
            ),
        }
    }
    let mut buf = [0u8; ATTR_MAX];
    let mut attr = |x: &mut Details, name: &'static str| -> Option<Vec<u8>> {
        match dir.read(name, &mut buf) {
            Ok(b) => Some(b.to_vec()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                report(x, name, ProblemKind::io(&e));
                None
            }
        }
    };
    let mut link = |x: &mut Details, speed: &'static str, width: &'static str| -> Option<Link> {
        let s = attr(x, speed);
        let w = attr(x, width);
        if s.is_none() && w.is_none() {
            return None;
        }
        let speed = s
            .and_then(|b| {
                parse::link_speed(&b)
                    .map_err(|e| report(x, speed, ProblemKind::Parse(e)))
                    .ok()
            })
            .flatten();
        let width = w
            .and_then(|b| {
                parse::link_width(&b)
                    .map_err(|e| report(x, width, ProblemKind::Parse(e)))
                    .ok()
            })
            .flatten();
        Some(Link { speed, width })
    };
    x.current_link = link(&mut x, "current_link_speed", "current_link_width");
    x.max_link = link(&mut x, "max_link_speed", "max_link_width");
    x.modalias = attr(&mut x, "modalias").map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    if let Some(b) = attr(&mut x, "local_cpulist") {
        match parse::cpu_list(&b) {
            Ok(c) => x.local_cpus = Some(c),
            Err(e) => report(&mut x, "local_cpulist", ProblemKind::Parse(e)),
        }
    }
    x
}
