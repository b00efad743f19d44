//! Interrupts as a driver sees them: which kind ([`InterruptKind`]), and a handle per
//! vector ([`Interrupt`]) that owns the eventfd the device's interrupt signals, in the
//! spirit of OpenVMM's `DeviceInterrupt`.
//!
//! A driver asks its [`DeviceBacking`](super::backing::DeviceBacking) for vectors of one
//! kind ([`enable_interrupts`](super::backing::DeviceBacking::enable_interrupts)) or of
//! the best kind the device has
//! ([`enable_best_interrupts`](super::backing::DeviceBacking::enable_best_interrupts)),
//! and gets one [`Interrupt`] per vector. It then either waits on one
//! ([`Interrupt::wait`]) or registers its fd with an event loop (it implements `AsFd`)
//! and calls [`Interrupt::try_wait`] when the loop says it is readable.
//!
//! # One kind at a time
//!
//! A PCI function delivers INTx, MSI or MSI-X, never two of them at once, and VFIO lets
//! one of them be enabled at a time: enabling another kind while one is enabled fails
//! ([`InterruptError::OtherKindEnabled`]); disable the first
//! ([`disable_interrupts`](super::backing::DeviceBacking::disable_interrupts)). The error
//! (AER) notification ([`InterruptKind::Error`]) is independent of them.
//!
//! # INTx is automasked
//!
//! INTx is level-triggered and shared, so VFIO masks it as it signals the eventfd, and it
//! stays masked until it is unmasked: without [`Interrupt::unmask`] the second INTx never
//! arrives. The unmask is explicit, not part of [`Interrupt::wait`], because it must come
//! after the driver has cleared the interrupt's cause in the device: unmasking a line the
//! device still asserts signals again at once. So an INTx handler is: wait, read and
//! acknowledge the device's interrupt status, then `unmask`. For MSI and MSI-X (edge,
//! never automasked) `unmask` does nothing, so a driver may call it whatever the kind.
//!
//! # Masking vectors
//!
//! [`mask_interrupt`](super::backing::DeviceBacking::mask_interrupt) masks one vector: an
//! interrupt raised while masked is remembered and delivered on unmask. vfio-pci
//! implements this for INTx only: it answers a mask or unmask of MSI or MSI-X with
//! `ENOTTY` (its `VFIO_DEVICE_SET_IRQS` handler has no function for those actions on
//! those indexes), which [`VfioBacking`](super::backing::VfioBacking) reports as
//! [`InterruptError::Unsupported`];
//! [`interrupt_maskable`](super::backing::DeviceBacking::interrupt_maskable) says so
//! beforehand (VFIO's `VFIO_IRQ_INFO_MASKABLE`). Mask MSI-X sources in the device instead
//! (most devices have a per-queue interrupt enable).
//!
//! # Dropping
//!
//! Dropping an [`Interrupt`] closes this process's eventfd, but a backing that routed it
//! (VFIO) keeps its own reference until the kind is disabled or the device is closed, and
//! signals it meanwhile: harmless, but disable what you no longer want. An `Interrupt`
//! does not keep its device open: it holds no handle of it (its INTx unmask reaches the
//! device only while another handle keeps it open, and fails with
//! [`BackingError::Gone`] after).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::addr::PciAddress;
use crate::bus::backing::BackingError;

/// How a device interrupts: the PCI mechanisms, and the error notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum InterruptKind {
    /// Legacy pin-based INTx: one vector, level-triggered, shared, automasked by VFIO
    /// after each interrupt (see [`Interrupt::unmask`]).
    Intx,
    /// MSI: up to 32 vectors, enabled in one go (not resizable).
    Msi,
    /// MSI-X: up to 2048 vectors; the set can grow while enabled where the kernel
    /// allows it ([`add_interrupts`](super::backing::DeviceBacking::add_interrupts)).
    MsiX,
    /// The error notification (VFIO's ERR index: AER errors of a PCI Express device), from
    /// [`error_interrupt`](super::backing::DeviceBacking::error_interrupt). Not a way of
    /// delivering the device's own interrupts: it can be enabled beside any of the others.
    Error,
}

impl InterruptKind {
    /// The kinds that deliver the device's interrupts, best first: the order of
    /// [`enable_best_interrupts`](super::backing::DeviceBacking::enable_best_interrupts).
    pub const BEST_FIRST: [InterruptKind; 3] = [InterruptKind::MsiX, InterruptKind::Msi, InterruptKind::Intx];

    /// Its usual name: `INTx`, `MSI`, `MSI-X`, `ERR`.
    pub fn name(self) -> &'static str {
        match self {
            InterruptKind::Intx => "INTx",
            InterruptKind::Msi => "MSI",
            InterruptKind::MsiX => "MSI-X",
            InterruptKind::Error => "ERR",
        }
    }

    /// Whether the device's interrupts come this way (INTx, MSI, MSI-X: one of them at a
    /// time), unlike the error notification.
    pub fn is_delivery(self) -> bool {
        !matches!(self, InterruptKind::Error)
    }

    /// Whether VFIO masks it after each interrupt, so that it must be unmasked
    /// ([`Interrupt::unmask`]) before it can fire again: INTx.
    pub fn is_automasked(self) -> bool {
        matches!(self, InterruptKind::Intx)
    }

    /// VFIO's interrupt index for it ([`crate::vfio::irq`]).
    pub fn vfio_index(self) -> u32 {
        use crate::vfio::irq;
        match self {
            InterruptKind::Intx => irq::INTX,
            InterruptKind::Msi => irq::MSI,
            InterruptKind::MsiX => irq::MSIX,
            InterruptKind::Error => irq::ERR,
        }
    }

    /// The kind of VFIO interrupt index `index`, for the indexes that have one (not REQ,
    /// which is the bus's).
    pub fn from_vfio_index(index: u32) -> Option<InterruptKind> {
        use crate::vfio::irq;
        match index {
            irq::INTX => Some(InterruptKind::Intx),
            irq::MSI => Some(InterruptKind::Msi),
            irq::MSIX => Some(InterruptKind::MsiX),
            irq::ERR => Some(InterruptKind::Error),
            _ => None,
        }
    }
}

impl fmt::Display for InterruptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `intx`, `msi`, `msix` (or `msi-x`), `err` (or `error`), in any case, is not a kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an interrupt kind (intx, msi, msix, err)")]
pub struct ParseInterruptKindError(pub String);

impl FromStr for InterruptKind {
    type Err = ParseInterruptKindError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "intx" => Ok(InterruptKind::Intx),
            "msi" => Ok(InterruptKind::Msi),
            "msix" | "msi-x" => Ok(InterruptKind::MsiX),
            "err" | "error" => Ok(InterruptKind::Error),
            _ => Err(ParseInterruptKindError(s.to_owned())),
        }
    }
}

/// Why enabling, growing, masking or unmasking interrupts failed (inside
/// [`BackingError::Interrupt`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InterruptError {
    /// No vectors asked for.
    #[error("{address}: asked for no {kind} vectors")]
    NoneAsked {
        /// The device.
        address: PciAddress,
        /// The kind.
        kind: InterruptKind,
    },
    /// More vectors asked for than the device has of that kind (0: it has none).
    #[error("{address}: {asked} {kind} vectors asked, the device has {available}")]
    TooMany {
        /// The device.
        address: PciAddress,
        /// The kind.
        kind: InterruptKind,
        /// Vectors asked for (in all, for a growth).
        asked: u32,
        /// Vectors the device has of that kind.
        available: u32,
    },
    /// Another kind is enabled: one of INTx, MSI and MSI-X at a time.
    #[error(
        "{address}: cannot enable {wanted} while {enabled} is enabled (one of INTx, MSI, MSI-X at a time)"
    )]
    OtherKindEnabled {
        /// The device.
        address: PciAddress,
        /// The kind that is enabled.
        enabled: InterruptKind,
        /// The kind asked for.
        wanted: InterruptKind,
    },
    /// The kind, or this vector of it, is not enabled.
    #[error("{address}: {kind} vector {vector} is not enabled")]
    NotEnabled {
        /// The device.
        address: PciAddress,
        /// The kind.
        kind: InterruptKind,
        /// The vector.
        vector: u32,
    },
    /// The device has none of the delivery kinds.
    #[error("{address}: the device has no INTx, MSI or MSI-X")]
    NoneAvailable {
        /// The device.
        address: PciAddress,
    },
    /// The backing or the kernel cannot do this, and why.
    #[error("{address}: {operation} of {kind} is not supported: {reason}")]
    Unsupported {
        /// The device.
        address: PciAddress,
        /// The kind.
        kind: InterruptKind,
        /// What was asked (`"mask"`, `"growth"`).
        operation: &'static str,
        /// Why not.
        reason: &'static str,
    },
    /// An eventfd could not be created.
    #[error("{address}: cannot create an eventfd for a {kind} vector")]
    Eventfd {
        /// The device.
        address: PciAddress,
        /// The kind.
        kind: InterruptKind,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

type Unmask = Box<dyn Fn() -> Result<(), BackingError> + Send + Sync>;

/// One interrupt vector: its kind, its number, and the eventfd its interrupts signal.
/// See the [module docs](self).
///
/// Waiting reads (and so clears) the eventfd's count: one wake-up may stand for several
/// interrupts, as with any eventfd.
pub struct Interrupt {
    kind: InterruptKind,
    vector: u32,
    fd: EventFd,
    unmask: Option<Unmask>,
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("kind", &self.kind)
            .field("vector", &self.vector)
            .field("fd", &self.fd.as_fd().as_raw_fd())
            .field("unmask", &self.unmask.is_some())
            .finish()
    }
}

impl Interrupt {
    /// A vector with a fresh eventfd (non-blocking, close-on-exec) that nothing signals
    /// yet: for backings, which route it to the device.
    pub fn new(kind: InterruptKind, vector: u32) -> io::Result<Interrupt> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Interrupt {
            kind,
            vector,
            fd,
            unmask: None,
        })
    }

    /// Makes [`unmask`](Self::unmask) call `f`: for backings, on automasked vectors.
    /// `f` must not keep the device open (hold a weak reference).
    pub fn with_unmask(mut self, f: impl Fn() -> Result<(), BackingError> + Send + Sync + 'static) -> Self {
        self.unmask = Some(Box::new(f));
        self
    }

    /// Its kind.
    pub fn kind(&self) -> InterruptKind {
        self.kind
    }

    /// Its vector number within its kind.
    pub fn vector(&self) -> u32 {
        self.vector
    }

    /// How many times it was signalled since the last read (reading clears the count);
    /// 0 if not at all. Does not block.
    pub fn take(&self) -> io::Result<u64> {
        match self.fd.read() {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether it was signalled since the last read; clears the count. Does not block.
    pub fn try_wait(&self) -> bool {
        self.take().is_ok_and(|n| n > 0)
    }

    /// Waits until it is signalled (true) or `timeout` passes (false; `None`: no
    /// timeout); clears the count. An INTx must then be [unmasked](Self::unmask) once the
    /// device's cause is cleared.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now().checked_add(t));
        loop {
            if self.take()? > 0 {
                return Ok(true);
            }
            let wait = match deadline {
                None | Some(None) => PollTimeout::NONE,
                Some(Some(deadline)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    // Rounded up: a poll of 0 ms for the last fraction would spin.
                    let ms = left.as_micros().div_ceil(1000);
                    PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX)).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Re-arms an automasked vector (INTx) after its interrupt was handled: call it after
    /// clearing the interrupt's cause in the device. If the device raised it again while
    /// it was masked, it is signalled again at once. Does nothing for kinds that are not
    /// automasked (MSI, MSI-X).
    pub fn unmask(&self) -> Result<(), BackingError> {
        match &self.unmask {
            Some(f) => f(),
            None => Ok(()),
        }
    }

    /// Signals it from this process, as the device would: for tests and for waking a
    /// loop that waits on it.
    pub fn signal(&self) -> io::Result<()> {
        self.fd.write(1)?;
        Ok(())
    }
}

impl AsFd for Interrupt {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Interrupt {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

/// Why MSI-X cannot grow on kernels that say `VFIO_IRQ_INFO_NORESIZE`.
pub(crate) const NORESIZE_REASON: &str = "the kernel cannot resize enabled MSI-X (VFIO_IRQ_INFO_NORESIZE: before Linux 6.5); \
     disable it and enable the whole set";

/// Why a device has no error notification.
pub(crate) const NO_ERR_REASON: &str =
    "the device reports no errors this way (VFIO offers its ERR index for PCI Express devices only)";

/// Checks `count` vectors of `kind` against the `available` ones.
pub(crate) fn check_count(
    address: PciAddress,
    kind: InterruptKind,
    count: u32,
    available: u32,
) -> Result<(), InterruptError> {
    if count == 0 {
        return Err(InterruptError::NoneAsked { address, kind });
    }
    if count > available {
        return Err(InterruptError::TooMany {
            address,
            kind,
            asked: count,
            available,
        });
    }
    Ok(())
}

/// Vectors `start..start + count` of `kind`, each with a fresh eventfd.
pub(crate) fn new_interrupts(
    address: PciAddress,
    kind: InterruptKind,
    start: u32,
    count: u32,
) -> Result<Vec<Interrupt>, InterruptError> {
    (start..start + count)
        .map(|vector| {
            Interrupt::new(kind, vector).map_err(|source| InterruptError::Eventfd {
                address,
                kind,
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for kind in [
            InterruptKind::Intx,
            InterruptKind::Msi,
            InterruptKind::MsiX,
            InterruptKind::Error,
        ] {
            assert_eq!(kind.name().parse::<InterruptKind>(), Ok(kind));
            assert_eq!(InterruptKind::from_vfio_index(kind.vfio_index()), Some(kind));
        }
        assert_eq!("msix".parse(), Ok(InterruptKind::MsiX));
        assert!("msi-y".parse::<InterruptKind>().is_err());
        assert_eq!(InterruptKind::from_vfio_index(crate::vfio::irq::REQ), None);
    }

    #[test]
    fn a_signal_is_seen_once_and_counted() {
        let irq = Interrupt::new(InterruptKind::Msi, 0).unwrap();
        assert!(!irq.try_wait());
        irq.signal().unwrap();
        irq.signal().unwrap();
        assert_eq!(irq.take().unwrap(), 2);
        assert!(!irq.try_wait(), "reading cleared the count");
        irq.signal().unwrap();
        assert!(irq.try_wait());
    }

    #[test]
    fn wait_times_out_without_a_signal_and_returns_on_one() {
        let irq = Interrupt::new(InterruptKind::MsiX, 3).unwrap();
        assert!(!irq.wait(Some(Duration::from_millis(1))).unwrap());
        irq.signal().unwrap();
        assert!(irq.wait(Some(Duration::from_secs(60))).unwrap());
        // From another thread, with no timeout.
        let fd = irq.as_fd().try_clone_to_owned().unwrap();
        let t = std::thread::spawn(move || nix::unistd::write(&fd, &1u64.to_ne_bytes()).unwrap());
        assert!(irq.wait(None).unwrap());
        t.join().unwrap();
    }

    #[test]
    fn unmask_calls_the_backing_only_when_one_was_given() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let plain = Interrupt::new(InterruptKind::MsiX, 0).unwrap();
        plain.unmask().unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let intx = Interrupt::new(InterruptKind::Intx, 0)
            .unwrap()
            .with_unmask(move || {
                c.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
        intx.unmask().unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert!(format!("{intx:?}").contains("Intx"));
    }
}
