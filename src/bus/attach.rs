//! How the bus opens a device for a driver and gives it back: [`Attach`], and its VFIO
//! implementation [`VfioAttach`] (bind to vfio-pci if asked, open, register the request
//! eventfd; on release close, and put the previous kernel driver back if asked).
//!
//! Tests and emulators implement [`Attach`] with their own backing, so the bus's probe
//! loop, rollback and removal paths run without hardware.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::backing::{DeviceBacking, VfioBacking};
use crate::addr::PciAddress;
use crate::record::DeviceRecord;
use crate::sysfs::bind::{self, BindError, Binding};
use crate::sysfs::scan::SysfsRoot;
use crate::vfio::{Container, VfToken, VfioBackend, VfioDevice, VfioError};

/// The vfio-pci driver's name.
pub const VFIO_PCI: &str = "vfio-pci";

/// Why a device could not be opened for a driver, or given back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The device is on another driver (or none) and the policy does not bind it.
    #[error("{address} is bound to {}, not to a vfio driver, and binding is off (BindPolicy::bind)", .driver.as_deref().unwrap_or("no driver"))]
    NotOnVfio {
        /// The device.
        address: PciAddress,
        /// Its driver.
        driver: Option<String>,
    },
    /// Binding to vfio-pci or restoring the previous driver failed (a device in use is
    /// refused here, naming the use).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Opening through VFIO failed.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// Anything else, said by the implementation.
    #[error("{address}: {message}")]
    Other {
        /// The device.
        address: PciAddress,
        /// What went wrong.
        message: String,
    },
}

/// A device opened for a driver: its backing, the eventfd that says the kernel wants it
/// back, and what must be undone on release.
#[derive(Debug)]
pub struct Attached<B> {
    /// The device.
    pub backing: B,
    /// Readable when the kernel asks for the device back (VFIO's REQ): an eventfd (reading
    /// 8 bytes clears it). `None` if the backing has no such signal.
    pub request: Option<OwnedFd>,
    /// The bind this attach made, to undo on an orderly release if the policy says so.
    pub binding: Option<Binding>,
}

impl<B> Attached<B> {
    /// The request eventfd, for an event loop.
    pub fn request_fd(&self) -> Option<BorrowedFd<'_>> {
        self.request.as_ref().map(AsFd::as_fd)
    }
}

/// Opens devices for the bus and gives them back.
pub trait Attach {
    /// What drivers drive.
    type Backing: DeviceBacking;

    /// Opens `record`'s device (binding it first if that is the policy). On error nothing
    /// is left changed (a bind made here is undone).
    fn attach(&mut self, record: &DeviceRecord) -> Result<Attached<Self::Backing>, AttachError>;

    /// Gives the device back once no driver holds it: closes it (drops the backing) and
    /// undoes the bind [`attach`](Self::attach) made as `release` says.
    fn detach(&mut self, attached: Attached<Self::Backing>, release: Release) -> Result<(), AttachError>;

    /// Whether a held device whose record is now `record` is still reachable through what
    /// `attach` opened (for VFIO: still on a vfio driver, [`bind::on_vfio`]). The bus takes back a held
    /// device for which this turns false (an `unbind` uevent, a resync). Default: yes.
    fn still_attached(&self, record: &DeviceRecord) -> bool {
        let _ = record;
        true
    }
}

/// How a device is given back ([`Attach::detach`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// No driver took it, or its probe failed: undo everything the attach did, whatever
    /// the policy (the device goes back to the driver it had).
    Rollback,
    /// The application let it go: restore the previous driver if the policy says so
    /// ([`BindPolicy::restore`]).
    Orderly,
    /// It is going away (its removal or unbind waits for the close): only close it.
    Removal,
}

/// When the bus binds devices to vfio-pci and whether it restores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindPolicy {
    /// Bind a matching device that is not on a vfio driver ([`bind::on_vfio`]: vfio-pci
    /// or a variant of it, which is left where it is) to vfio-pci (through
    /// `driver_override`). Off: such a device is refused with [`AttachError::NotOnVfio`].
    pub bind: bool,
    /// Bind even a device the host uses (mounted, swap, an interface up). Off: refused,
    /// naming the use.
    pub force: bool,
    /// On an orderly release (detach, bus dropped), put the device back on the driver it
    /// had before the bus bound it. (A failed probe always puts it back.)
    pub restore: bool,
}

/// [`Attach`] through VFIO: devices of one sysfs root, each in its own container unless
/// [`shared_container`](Self::shared_container) is set.
#[derive(Debug)]
pub struct VfioAttach {
    root: SysfsRoot,
    policy: BindPolicy,
    container: Option<Arc<Container>>,
    backend: VfioBackend,
    vf_token: Option<VfToken>,
}

impl VfioAttach {
    /// Attaches devices of `root` (the kernel's sysfs) with `policy`.
    pub fn new(root: SysfsRoot, policy: BindPolicy) -> Self {
        VfioAttach {
            root,
            policy,
            container: None,
            backend: VfioBackend::Auto,
            vf_token: None,
        }
    }

    /// Opens devices through `backend` (default [`VfioBackend::Auto`]: iommufd where the
    /// kernel offers it, else the group backend), each in a container of its own unless
    /// [`shared_container`](Self::shared_container) gives one (whose backend then wins).
    /// Drivers see no difference.
    pub fn backend(mut self, backend: VfioBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Opens every device in `container` (one IOVA space for all of them).
    pub fn shared_container(mut self, container: Arc<Container>) -> Self {
        self.container = Some(container);
        self
    }

    /// Opens virtual functions with this VF token: the one their PF's user set
    /// ([`VfioDevice::set_vf_token`]), which vfio-pci requires while the PF is bound to it.
    /// SR-IOV PFs this attaches get the token set on them, so that the VFs they create
    /// (e.g. through [`Bus::set_vfs`](super::Bus::set_vfs)) can be opened by this
    /// process, and by any other that is given the token. Other functions are opened
    /// without it.
    pub fn vf_token(mut self, token: VfToken) -> Self {
        self.vf_token = Some(token);
        self
    }

    /// The policy.
    pub fn policy(&self) -> BindPolicy {
        self.policy
    }

    fn open(&self, record: &DeviceRecord) -> Result<Attached<VfioBacking>, AttachError> {
        let address = record.address;
        let token = self.vf_token.filter(|_| record.physfn.is_some());
        let container = match &self.container {
            Some(c) => Arc::clone(c),
            None => Container::with_backend(self.backend)?,
        };
        let device = VfioDevice::open_in_with_token(&self.root, address, &container, token)?;
        if let Some(token) = self.vf_token
            && record.sriov.is_some()
        {
            device.set_vf_token(token)?;
        }
        let request = device.request_eventfd()?;
        Ok(Attached {
            backing: VfioBacking::new(device),
            request: Some(OwnedFd::from(request)),
            binding: None,
        })
    }
}

impl Attach for VfioAttach {
    type Backing = VfioBacking;

    fn attach(&mut self, record: &DeviceRecord) -> Result<Attached<VfioBacking>, AttachError> {
        let address = record.address;
        let driver = bind::current_driver(&self.root, address);
        let binding = if bind::on_vfio(&self.root.device_dir(address), driver.as_deref()) {
            None
        } else if self.policy.bind {
            Some(bind::bind(&self.root, address, VFIO_PCI, self.policy.force)?)
        } else {
            return Err(AttachError::NotOnVfio { address, driver });
        };
        match self.open(record) {
            Ok(mut attached) => {
                attached.binding = binding;
                Ok(attached)
            }
            Err(e) => {
                if let Some(b) = &binding
                    && let Err(undo) = bind::restore(&self.root, b)
                {
                    log::error!("{address}: open failed ({e}), and restoring its driver failed too: {undo}");
                }
                Err(e)
            }
        }
    }

    fn still_attached(&self, record: &DeviceRecord) -> bool {
        bind::on_vfio(&self.root.device_dir(record.address), record.driver.as_deref())
    }

    fn detach(&mut self, attached: Attached<VfioBacking>, release: Release) -> Result<(), AttachError> {
        let Attached {
            backing,
            request,
            binding,
        } = attached;
        let address = backing.address();
        // The device closes here, if the driver kept no handle: a waiting removal or unbind
        // completes now.
        drop(backing);
        drop(request);
        let restore = match release {
            Release::Rollback => true,
            Release::Orderly => self.policy.restore,
            Release::Removal => false,
        };
        match binding {
            Some(b) if restore && self.root.device_dir(address).exists() => {
                bind::restore(&self.root, &b)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
