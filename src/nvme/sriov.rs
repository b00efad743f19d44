//! SR-IOV on an NVMe primary controller: Virtualization Management (flexible queues and
//! interrupt vectors handed to the controllers of the VFs), VFs enabled through sysfs, the
//! secondary controllers brought online, ready for a driver.
//!
//! An SR-IOV NVMe controller (the PF's, the *primary*) owns *flexible resources*: VQ (a
//! queue pair, admin queue included) and VI (an interrupt vector). Each VF has a
//! *secondary controller*, which starts offline with none; it works only once the primary
//! has assigned it at least 2 VQ (admin plus one I/O queue) and 1 VI and set it online. A
//! secondary that is offline answers every register read with 0 except CSTS, which has
//! CFS set: a driver probing it sees a failed controller. [`enable`] does the whole
//! sequence; [`disable`] undoes it. The steps, and why each comes where it does:
//!
//! 1. **Identify Primary Controller Capabilities (CNS 14h)** and the **Secondary Controller
//!    List (CNS 15h)**: how many flexible resources exist, how many the primary holds, the
//!    per-secondary maximum, and which secondary controller belongs to which VF.
//! 2. **Release the primary's flexible resources** (Virtualization Management, action 1
//!    "Primary Controller Flexible Allocation", count 0, for VQ then VI): out of the box the
//!    primary holds all of them, and a secondary can only be given free ones.
//! 3. **Function-level reset of the PF**: a primary flexible allocation takes effect only
//!    at the primary's next Controller Level Reset. The reset ends the PF's controller (its
//!    queues and every handle of it), so [`enable`] consumes the [`Controller`], revokes
//!    it (clones still around fail with [`NvmeError::Removed`]) and returns a new one,
//!    brought up again on the same backing. The reset is skipped when the primary already
//!    holds no flexible resources (a second run). It comes before the VFs exist because a
//!    PF reset takes every secondary offline (QEMU's also clears VF Enable).
//! 4. **Enable the VFs** ([`VfCount`]: through the bus, [`BusVfs`]): the secondary controllers can be
//!    set online only once their VF exists. `sriov_drivers_autoprobe` goes to 0 first, so
//!    that no kernel driver probes the VFs while they are still offline (the kernel's nvme
//!    would see a failed controller); the caller binds them afterwards.
//! 5. Per VF: **Secondary Controller Assign** (action 8) of VQ and VI resources, then
//!    **Secondary Controller Online** (action 9). Assign needs the secondary offline;
//!    online needs ≥ 2 VQ and ≥ 1 VI, and resets the VF's controller, which then comes up
//!    with those queues and vectors.
//! 6. Optionally **Namespace Attachment** (15h) of the PF's namespaces to each secondary,
//!    so that the VFs have something to do I/O on; "already attached" counts as done.
//!
//! [`disable`] sets the secondaries offline (action 7, which also returns their resources)
//! and sets NumVFs to 0. Close every VF first: removing a VF that this process holds
//! through vfio waits for its fd (see the exit rule in [`crate::vfio`]).
//!
//! The VFs live only as long as the PF's user keeps the PF: closing a vfio device resets
//! it, and a PF reset takes every secondary offline. A process driving VFs therefore holds
//! the PF open for as long as it drives them.

use std::time::{Duration, Instant};

use super::spec::{
    self, PrimaryControllerCaps, SecondaryController, Status, cns, ns_attach, oacs, virt_mgmt,
};
use super::{Controller, NvmeError, Options};
use crate::addr::PciAddress;
use crate::bus::Bus;
use crate::bus::attach::Attach;
use crate::bus::backing::{BackingError, DeviceBacking, DmaMemory};
use crate::bus::sriov::{SetVfsError, VfError, read_sriov, vf_addresses};
use crate::config::SriovCapability;

/// What went wrong in an SR-IOV step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SriovError {
    /// A command to the primary controller failed, or its bring-up after the reset did.
    #[error("{step}")]
    Nvme {
        /// The step ("Secondary Controller Assign of 2 VQ to controller 1", ...).
        step: String,
        /// What the controller said.
        #[source]
        source: NvmeError,
    },
    /// The function-level reset of the PF failed.
    #[error("function-level reset of {address}")]
    Reset {
        /// The PF.
        address: PciAddress,
        /// The backing's error.
        #[source]
        source: BackingError,
    },
    /// The controller does not offer what SR-IOV needs.
    #[error("{address}: {what}")]
    Unsupported {
        /// The PF.
        address: PciAddress,
        /// What is missing.
        what: String,
    },
    /// The plan does not fit the controller's resources.
    #[error("{address}: {what}")]
    Resources {
        /// The PF.
        address: PciAddress,
        /// What does not fit.
        what: String,
    },
    /// Enabling or disabling the VFs through sysfs failed ([`VfControl`]).
    #[error(transparent)]
    Vf(#[from] VfError),
    /// The bus refused or failed the change of the VF count ([`Bus::set_vfs`]).
    #[error(transparent)]
    SetVfs(#[from] SetVfsError),
    /// The PF's SR-IOV capability could not be read, or it has none.
    #[error("{address}: {what}")]
    Capability {
        /// The PF.
        address: PciAddress,
        /// What went wrong.
        what: String,
    },
    /// A VF has no secondary controller in the primary's list.
    #[error("{pf}: VF {vfn} has no secondary controller in the Secondary Controller List")]
    NoSecondary {
        /// The PF.
        pf: PciAddress,
        /// The VF number (1-based).
        vfn: u16,
    },
    /// The backing given is not the controller's device.
    #[error("the backing is {backing}, the controller {controller}")]
    WrongBacking {
        /// The controller's device.
        controller: PciAddress,
        /// The backing's device.
        backing: PciAddress,
    },
}

// The generic VF control moved to the bus layer; these paths stay for users.
pub use crate::bus::sriov::{SysfsVfs, VfControl};

/// How [`enable`] and [`disable`] read and change the number of VFs of the PF.
///
/// Neither reads `sriov_numvfs`: reading it takes the PF's device lock, which a pending
/// removal of the PF (or of one of its VFs, under `sriov_numvfs=0`) holds. The count comes
/// from the SR-IOV capability in the PF's config space. [`BusVfs`] changes it through the
/// bus that holds the PF ([`Bus::set_vfs`]: VFs the bus still holds refuse the change,
/// the PF's driver is asked); [`ConfigVfs`] through a [`VfControl`], for a PF held
/// outside a bus.
pub trait VfCount {
    /// NumVFs now.
    fn num_vfs(&mut self) -> Result<u16, SriovError>;
    /// Changes NumVFs to `n` (0: removes the VFs), with no kernel driver probing the VFs
    /// created, and returns the VFs' addresses, VF 1 first.
    fn set_vfs(&mut self, n: u16) -> Result<Vec<PciAddress>, SriovError>;
}

/// [`VfCount`] of a PF that a driver of `bus` holds: [`Bus::num_vfs`] and
/// [`Bus::set_vfs`]. After a change the bus's map already shows the VFs created (and no
/// longer the VFs removed); offer them to drivers with [`Bus::allow`] and
/// [`Bus::probe`].
pub struct BusVfs<'a, A: Attach> {
    bus: &'a mut Bus<A>,
    pf: PciAddress,
}

impl<'a, A: Attach> BusVfs<'a, A> {
    /// The VFs of `pf`, which a driver of `bus` holds.
    pub fn new(bus: &'a mut Bus<A>, pf: PciAddress) -> Self {
        BusVfs { bus, pf }
    }
}

impl<A: Attach> VfCount for BusVfs<'_, A> {
    fn num_vfs(&mut self) -> Result<u16, SriovError> {
        Ok(self.bus.num_vfs(self.pf)?)
    }

    fn set_vfs(&mut self, n: u16) -> Result<Vec<PciAddress>, SriovError> {
        Ok(self.bus.set_vfs(self.pf, n)?.vfs)
    }
}

/// [`VfCount`] of a PF held outside a bus: NumVFs and the VFs' addresses from the SR-IOV
/// capability in the config space of `backing` (the PF's), the change through `control`
/// ([`SysfsVfs`]), read back from config space.
pub struct ConfigVfs<'a, B> {
    backing: &'a B,
    control: &'a dyn VfControl,
}

impl<'a, B: DeviceBacking> ConfigVfs<'a, B> {
    /// The VFs of the PF whose device is `backing`, changed through `control`.
    pub fn new(backing: &'a B, control: &'a dyn VfControl) -> Self {
        ConfigVfs { backing, control }
    }

    fn capability(&self) -> Result<SriovCapability, SriovError> {
        let address = self.backing.address();
        match read_sriov(self.backing) {
            Ok(Some(cap)) => Ok(cap),
            Ok(None) => Err(SriovError::Capability {
                address,
                what: "no SR-IOV capability in its config space".into(),
            }),
            Err(e) => Err(SriovError::Capability {
                address,
                what: crate::error::chain(&e),
            }),
        }
    }
}

impl<B: DeviceBacking> VfCount for ConfigVfs<'_, B> {
    fn num_vfs(&mut self) -> Result<u16, SriovError> {
        Ok(self.capability()?.num_vfs)
    }

    fn set_vfs(&mut self, n: u16) -> Result<Vec<PciAddress>, SriovError> {
        let now = self.capability()?.num_vfs;
        self.control.change_num_vfs(now, n)?;
        let cap = self.capability()?;
        if cap.num_vfs != n {
            return Err(SriovError::Capability {
                address: self.backing.address(),
                what: format!("NumVFs reads {} after setting it to {n}", cap.num_vfs),
            });
        }
        Ok(vf_addresses(self.backing.address(), &cap, n))
    }
}

/// One step of [`enable`] or [`disable`] and what came of it: the journal of what the
/// controller answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What was done.
    pub what: String,
    /// What came of it ("ok", a completion's result, a status, the state read).
    pub outcome: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// How long it took.
    pub elapsed: Duration,
}

/// What [`enable`] sets up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Plan {
    /// VFs to enable (1 or more).
    pub vfs: u16,
    /// VQ resources per VF (at least 2: the admin queue and one I/O queue pair).
    pub vq_per_vf: u16,
    /// VI resources per VF (at least 1).
    pub vi_per_vf: u16,
    /// Attach the PF's active namespaces to every VF's controller.
    pub attach_namespaces: bool,
    /// Reset the PF even when it holds no flexible resources (the reset is otherwise
    /// needed only to make a release take effect).
    pub always_reset: bool,
    /// How the PF's controller is brought up again after its reset.
    pub options: Options,
}

impl Plan {
    /// `vfs` VFs with 2 VQ and 1 VI each, namespaces attached.
    pub fn new(vfs: u16) -> Self {
        Plan {
            vfs,
            vq_per_vf: 2,
            vi_per_vf: 1,
            attach_namespaces: true,
            always_reset: false,
            options: Options::default(),
        }
    }

    /// VQ and VI resources per VF.
    pub fn resources(mut self, vq: u16, vi: u16) -> Self {
        self.vq_per_vf = vq;
        self.vi_per_vf = vi;
        self
    }

    /// Whether to attach the PF's namespaces to the VFs' controllers.
    pub fn attach_namespaces(mut self, yes: bool) -> Self {
        self.attach_namespaces = yes;
        self
    }

    /// Whether to reset the PF even when there is nothing to release.
    pub fn always_reset(mut self, yes: bool) -> Self {
        self.always_reset = yes;
        self
    }

    /// Options for the PF's bring-up after its reset.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }
}

/// A VF set up by [`enable`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Vf {
    /// The VF's device.
    pub address: PciAddress,
    /// Its secondary controller, as the list read at the end reports it.
    pub secondary: SecondaryController,
    /// The namespaces attached to it and the controller's answer (success, or "already
    /// attached", or another status).
    pub attached: Vec<(u32, Status)>,
}

/// What [`enable`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct Enabled<B: DeviceBacking> {
    /// The PF's controller, brought up again if it was reset.
    pub pf: Controller<B>,
    /// Primary Controller Capabilities before anything changed.
    pub caps_before: PrimaryControllerCaps,
    /// And at the end.
    pub caps: PrimaryControllerCaps,
    /// Whether the PF was reset (false when it held no flexible resources already).
    pub reset: bool,
    /// The VFs, VF 1 first.
    pub vfs: Vec<Vf>,
}

// Runs `f` as step `what`, noting it in the journal.
fn step<T>(
    journal: &mut Vec<Step>,
    what: String,
    f: impl FnOnce() -> Result<T, SriovError>,
    describe: impl FnOnce(&T) -> String,
) -> Result<T, SriovError> {
    let start = Instant::now();
    let r = f();
    let (outcome, ok) = match &r {
        Ok(v) => (describe(v), true),
        Err(SriovError::Nvme {
            source: NvmeError::Command { status, .. },
            ..
        }) => (format!("status {status}"), false),
        Err(SriovError::Nvme { source, .. }) => (source.to_string(), false),
        Err(e) => (e.to_string(), false),
    };
    log::info!("{what}: {outcome}");
    journal.push(Step {
        what,
        outcome,
        ok,
        elapsed: start.elapsed(),
    });
    r
}

fn nvme_err(step: &str) -> impl FnOnce(NvmeError) -> SriovError + '_ {
    move |source| SriovError::Nvme {
        step: step.to_owned(),
        source,
    }
}

// Identify with CNS `cns_value` (controller-scoped, CNTID 0) into a fresh page.
fn identify_page<B: DeviceBacking>(
    pf: &Controller<B>,
    cns_value: u32,
    what: &str,
) -> Result<Vec<u8>, NvmeError> {
    let buf = pf.alloc_buffer(4096)?;
    let mut cmd = spec::Command::new(spec::admin::IDENTIFY);
    cmd.prp1 = buf.iova();
    cmd.cdw[0] = cns_value;
    pf.admin(cmd, what)?;
    let mut data = vec![0u8; 4096];
    let _ = buf.read_at(0, &mut data);
    Ok(data)
}

/// Identify Primary Controller Capabilities (CNS 14h) of `pf`.
pub fn primary_caps<B: DeviceBacking>(pf: &Controller<B>) -> Result<PrimaryControllerCaps, NvmeError> {
    let what = "Identify Primary Controller Capabilities (CNS 14h)";
    Ok(PrimaryControllerCaps::parse(&identify_page(
        pf,
        cns::PRIMARY_CONTROLLER_CAPS,
        what,
    )?)?)
}

/// Identify Secondary Controller List (CNS 15h) of `pf`.
pub fn secondary_controllers<B: DeviceBacking>(
    pf: &Controller<B>,
) -> Result<Vec<SecondaryController>, NvmeError> {
    let what = "Identify Secondary Controller List (CNS 15h)";
    Ok(spec::parse_secondary_controllers(&identify_page(
        pf,
        cns::SECONDARY_CONTROLLERS,
        what,
    )?))
}

/// Virtualization Management `action` ([`mod@virt_mgmt`]) on controller `cntlid` for `count`
/// resources of type `resource`: the completion's dword 0 (the resources now assigned, for
/// the assign and allocate actions).
pub fn virt_mgmt<B: DeviceBacking>(
    pf: &Controller<B>,
    action: u8,
    resource: u8,
    cntlid: u16,
    count: u16,
) -> Result<u32, NvmeError> {
    let cmd = spec::virt_mgmt_command(action, resource, cntlid, count);
    Ok(pf
        .admin(cmd, &virt_mgmt_name(action, resource, cntlid, count))?
        .dw0)
}

/// Attaches namespace `nsid` to controllers `ids` (Namespace Attachment, select 0).
pub fn attach_namespace<B: DeviceBacking>(
    pf: &Controller<B>,
    nsid: u32,
    ids: &[u16],
) -> Result<(), NvmeError> {
    let buf = pf.alloc_buffer(4096)?;
    let _ = buf.write_at(0, &spec::controller_list(ids));
    let mut cmd = spec::namespace_attachment_command(nsid, ns_attach::ATTACH);
    cmd.prp1 = buf.iova();
    pf.admin(
        cmd,
        &format!("Namespace Attachment of namespace {nsid} to controllers {ids:?}"),
    )?;
    Ok(())
}

fn resource_name(resource: u8) -> &'static str {
    if resource == virt_mgmt::RESOURCE_VI {
        "VI"
    } else {
        "VQ"
    }
}

fn virt_mgmt_name(action: u8, resource: u8, cntlid: u16, count: u16) -> String {
    let rt = resource_name(resource);
    match action {
        virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION => {
            format!(
                "Virtualization Management: primary flexible allocation of {count} {rt} (controller {cntlid})"
            )
        }
        virt_mgmt::SECONDARY_ASSIGN => {
            format!("Virtualization Management: assign {count} {rt} to secondary controller {cntlid}")
        }
        virt_mgmt::SECONDARY_ONLINE => {
            format!("Virtualization Management: secondary controller {cntlid} online")
        }
        virt_mgmt::SECONDARY_OFFLINE => {
            format!("Virtualization Management: secondary controller {cntlid} offline")
        }
        a => format!("Virtualization Management: action {a} {rt} {count} on controller {cntlid}"),
    }
}

/// A one-line summary of Primary Controller Capabilities.
pub fn describe_caps(c: &PrimaryControllerCaps) -> String {
    format!(
        "VQ: {} flexible (primary {}, secondaries {}, at most {} each), {} private; VI: {} flexible (primary {}, secondaries {}, at most {} each), {} private",
        c.vqfrt, c.vqrfap, c.vqrfa, c.vqfrsm, c.vqprt, c.vifrt, c.virfap, c.virfa, c.vifrsm, c.viprt
    )
}

/// A one-line summary of a Secondary Controller List.
pub fn describe_secondaries(list: &[SecondaryController]) -> String {
    if list.is_empty() {
        return "no secondary controllers".into();
    }
    list.iter()
        .map(|s| {
            format!(
                "controller {} (VF {}): {}, {} VQ {} VI",
                s.scid,
                s.vfn,
                if s.online { "online" } else { "offline" },
                s.nvq,
                s.nvi
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks that `plan` fits: the VFs exist in `list`, each gets what it needs and at most
/// the per-secondary maximum, and the flexible resources suffice once the primary holds
/// none (resources of secondaries outside the plan stay where they are). Pure: the
/// numbers come from Identify.
pub fn check_plan(
    plan: &Plan,
    caps: &PrimaryControllerCaps,
    list: &[SecondaryController],
) -> Result<Vec<SecondaryController>, String> {
    if plan.vfs == 0 {
        return Err("no VFs asked for".into());
    }
    if plan.vq_per_vf < 2 || plan.vi_per_vf < 1 {
        return Err(format!(
            "a VF needs at least 2 VQ (admin and one I/O queue) and 1 VI, not {} VQ and {} VI",
            plan.vq_per_vf, plan.vi_per_vf
        ));
    }
    if plan.vq_per_vf > caps.vqfrsm || plan.vi_per_vf > caps.vifrsm {
        return Err(format!(
            "{} VQ and {} VI per VF asked for; a secondary controller takes at most {} VQ and {} VI",
            plan.vq_per_vf, plan.vi_per_vf, caps.vqfrsm, caps.vifrsm
        ));
    }
    let mut ours = Vec::new();
    for vfn in 1..=plan.vfs {
        match list.iter().find(|s| s.vfn == vfn) {
            Some(s) => ours.push(*s),
            None => {
                return Err(format!(
                    "VF {vfn} has no secondary controller ({} listed)",
                    list.len()
                ));
            }
        }
    }
    let others = |f: fn(&SecondaryController) -> u16| -> u32 {
        list.iter()
            .filter(|s| s.vfn == 0 || s.vfn > plan.vfs)
            .map(|s| u32::from(f(s)))
            .sum()
    };
    let vq_need = u32::from(plan.vfs) * u32::from(plan.vq_per_vf);
    let vi_need = u32::from(plan.vfs) * u32::from(plan.vi_per_vf);
    let vq_have = caps.vqfrt.saturating_sub(others(|s| s.nvq));
    let vi_have = caps.vifrt.saturating_sub(others(|s| s.nvi));
    if vq_need > vq_have || vi_need > vi_have {
        return Err(format!(
            "{} VFs need {vq_need} VQ and {vi_need} VI; the controller has {vq_have} VQ and {vi_have} VI flexible resources for them",
            plan.vfs
        ));
    }
    Ok(ours)
}

/// Enables SR-IOV on the PF whose controller is `pf` and whose device is `backing`: the
/// steps of the [module docs](self). Every step, with the controller's answer, goes to
/// `journal` (also when a later one fails).
///
/// Consumes `pf`: when the PF is reset, its controller ends (it is revoked: other clones
/// fail with [`NvmeError::Removed`]) and [`Enabled::pf`] is the controller brought up
/// again on `backing`. On an error the controller is gone too; bring it up again with
/// [`Controller::init`] on `backing`.
pub fn enable<B: DeviceBacking>(
    pf: Controller<B>,
    backing: &B,
    vfs: &mut dyn VfCount,
    plan: &Plan,
    journal: &mut Vec<Step>,
) -> Result<Enabled<B>, SriovError> {
    let address = pf.info().address;
    if backing.address() != address {
        return Err(SriovError::WrongBacking {
            controller: address,
            backing: backing.address(),
        });
    }
    if pf.info().identify.oacs & oacs::VIRT_MGMT == 0 {
        // QEMU 7.2 implements the command without advertising it; a controller that truly
        // lacks it fails the first Identify below (invalid field) or the first command
        // (invalid opcode), which the journal shows.
        journal.push(Step {
            what: "Identify Controller: OACS Virtualization Management".into(),
            outcome: "not advertised (OACS bit 7 clear); trying anyway".into(),
            ok: true,
            elapsed: Duration::ZERO,
        });
    }
    let cntlid = pf.info().identify.cntlid;
    let what = "Identify Primary Controller Capabilities (CNS 14h)";
    let caps_before = step(
        journal,
        what.into(),
        || primary_caps(&pf).map_err(nvme_err(what)),
        describe_caps,
    )?;
    let what = "Identify Secondary Controller List (CNS 15h)";
    let list = step(
        journal,
        what.into(),
        || secondary_controllers(&pf).map_err(nvme_err(what)),
        |l| describe_secondaries(l),
    )?;
    let ours =
        check_plan(plan, &caps_before, &list).map_err(|what| SriovError::Resources { address, what })?;

    // VFs left enabled (an earlier run) go first: the reset below would take their
    // controllers away under the kernel's feet, and assigning needs them offline anyway.
    let enabled = step(
        journal,
        "NumVFs (SR-IOV capability)".into(),
        || vfs.num_vfs(),
        u16::to_string,
    )?;
    for s in list.iter().filter(|s| s.online) {
        let what = virt_mgmt_name(virt_mgmt::SECONDARY_OFFLINE, 0, s.scid, 0);
        step(
            journal,
            what.clone(),
            || virt_mgmt(&pf, virt_mgmt::SECONDARY_OFFLINE, 0, s.scid, 0).map_err(nvme_err(&what)),
            |_| "ok".into(),
        )?;
    }
    if enabled != 0 {
        step(
            journal,
            "NumVFs = 0 (VFs left from before)".into(),
            || vfs.set_vfs(0),
            |_| "ok".into(),
        )?;
    }

    let (pf, reset) = if caps_before.vqrfap == 0 && caps_before.virfap == 0 && !plan.always_reset {
        journal.push(Step {
            what: "Release the primary's flexible resources".into(),
            outcome: "the primary holds none already: no release, no reset".into(),
            ok: true,
            elapsed: Duration::ZERO,
        });
        (pf, false)
    } else {
        for rt in [virt_mgmt::RESOURCE_VQ, virt_mgmt::RESOURCE_VI] {
            let what = virt_mgmt_name(virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION, rt, cntlid, 0);
            step(
                journal,
                what.clone(),
                || {
                    virt_mgmt(&pf, virt_mgmt::PRIMARY_FLEXIBLE_ALLOCATION, rt, cntlid, 0)
                        .map_err(nvme_err(&what))
                },
                |dw0| format!("ok (result {dw0}; takes effect at the next reset)"),
            )?;
        }
        // The controller ends with the reset: revoke it so that clones fail cleanly.
        pf.revoke("function-level reset of the PF for SR-IOV");
        drop(pf);
        step(
            journal,
            "Function-level reset of the PF (VFIO_DEVICE_RESET)".into(),
            || {
                backing
                    .reset()
                    .map_err(|source| SriovError::Reset { address, source })
            },
            |_| "ok".into(),
        )?;
        let what = "PF controller brought up again";
        let pf = step(
            journal,
            what.into(),
            || Controller::init(backing.clone(), &plan.options).map_err(nvme_err(what)),
            |c| {
                format!(
                    "controller {}, {} I/O queues",
                    c.info().identify.cntlid,
                    c.info().io_queues
                )
            },
        )?;
        (pf, true)
    };
    if reset {
        let what = "Identify Primary Controller Capabilities (CNS 14h) after the reset";
        let caps = step(
            journal,
            what.into(),
            || primary_caps(&pf).map_err(nvme_err(what)),
            describe_caps,
        )?;
        if caps.vqrfap != 0 || caps.virfap != 0 {
            return Err(SriovError::Resources {
                address,
                what: format!(
                    "the primary still holds {} VQ and {} VI flexible resources after its reset",
                    caps.vqrfap, caps.virfap
                ),
            });
        }
    }

    let addresses = step(
        journal,
        format!("NumVFs = {}", plan.vfs),
        || vfs.set_vfs(plan.vfs),
        |a| a.iter().map(PciAddress::to_string).collect::<Vec<_>>().join(", "),
    )?;
    if addresses.len() < usize::from(plan.vfs) {
        return Err(SriovError::Resources {
            address,
            what: format!(
                "{} VFs asked for, {} appeared ({addresses:?})",
                plan.vfs,
                addresses.len()
            ),
        });
    }

    let namespaces: Vec<u32> = if plan.attach_namespaces {
        pf.namespaces().iter().map(|n| n.nsid).collect()
    } else {
        Vec::new()
    };
    let mut attached = Vec::new();
    for s in &ours {
        for (rt, count) in [
            (virt_mgmt::RESOURCE_VQ, plan.vq_per_vf),
            (virt_mgmt::RESOURCE_VI, plan.vi_per_vf),
        ] {
            let what = virt_mgmt_name(virt_mgmt::SECONDARY_ASSIGN, rt, s.scid, count);
            step(
                journal,
                what.clone(),
                || virt_mgmt(&pf, virt_mgmt::SECONDARY_ASSIGN, rt, s.scid, count).map_err(nvme_err(&what)),
                |dw0| format!("ok ({dw0} {} assigned)", resource_name(rt)),
            )?;
        }
        let what = virt_mgmt_name(virt_mgmt::SECONDARY_ONLINE, 0, s.scid, 0);
        step(
            journal,
            what.clone(),
            || virt_mgmt(&pf, virt_mgmt::SECONDARY_ONLINE, 0, s.scid, 0).map_err(nvme_err(&what)),
            |_| "ok".into(),
        )?;
        let mut mine = Vec::new();
        for &nsid in &namespaces {
            let start = Instant::now();
            let status = match attach_namespace(&pf, nsid, &[s.scid]) {
                Ok(()) => Status::SUCCESS,
                Err(NvmeError::Command { status, .. }) => status,
                Err(e) => return Err(nvme_err("Namespace Attachment")(e)),
            };
            let ok = status.is_success() || status.0 & 0x7ff == Status::NAMESPACE_ALREADY_ATTACHED.0;
            let outcome = if status.is_success() {
                "ok".to_owned()
            } else {
                format!("status {status}")
            };
            journal.push(Step {
                what: format!(
                    "Namespace Attachment of namespace {nsid} to secondary controller {}",
                    s.scid
                ),
                outcome,
                ok,
                elapsed: start.elapsed(),
            });
            mine.push((nsid, status));
        }
        attached.push(mine);
    }

    let what = "Identify Secondary Controller List (CNS 15h) at the end";
    let list = step(
        journal,
        what.into(),
        || secondary_controllers(&pf).map_err(nvme_err(what)),
        |l| describe_secondaries(l),
    )?;
    let what = "Identify Primary Controller Capabilities (CNS 14h) at the end";
    let caps = step(
        journal,
        what.into(),
        || primary_caps(&pf).map_err(nvme_err(what)),
        describe_caps,
    )?;
    let mut out = Vec::new();
    for ((vfn, address), attached) in (1..).zip(addresses).zip(attached) {
        let secondary = *list
            .iter()
            .find(|s| s.vfn == vfn)
            .ok_or(SriovError::NoSecondary { pf: address, vfn })?;
        out.push(Vf {
            address,
            secondary,
            attached,
        });
    }
    Ok(Enabled {
        pf,
        caps_before,
        caps,
        reset,
        vfs: out,
    })
}

/// Undoes [`enable`]: sets every online secondary controller of `pf` offline (which also
/// returns its flexible resources) and disables the VFs. Close every VF before: the
/// kernel's removal of a VF held through vfio waits for its fd. Returns the Secondary
/// Controller List at the end.
pub fn disable<B: DeviceBacking>(
    pf: &Controller<B>,
    vfs: &mut dyn VfCount,
    journal: &mut Vec<Step>,
) -> Result<Vec<SecondaryController>, SriovError> {
    let what = "Identify Secondary Controller List (CNS 15h)";
    let list = step(
        journal,
        what.into(),
        || secondary_controllers(pf).map_err(nvme_err(what)),
        |l| describe_secondaries(l),
    )?;
    for s in list.iter().filter(|s| s.online) {
        let what = virt_mgmt_name(virt_mgmt::SECONDARY_OFFLINE, 0, s.scid, 0);
        step(
            journal,
            what.clone(),
            || virt_mgmt(pf, virt_mgmt::SECONDARY_OFFLINE, 0, s.scid, 0).map_err(nvme_err(&what)),
            |_| "ok".into(),
        )?;
    }
    step(journal, "NumVFs = 0".into(), || vfs.set_vfs(0), |_| "ok".into())?;
    let what = "Identify Secondary Controller List (CNS 15h) at the end";
    step(
        journal,
        what.into(),
        || secondary_controllers(pf).map_err(nvme_err(what)),
        |l| describe_secondaries(l),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> PrimaryControllerCaps {
        // QEMU: sriov_max_vfs=2, sriov_vq_flexible=4, sriov_vi_flexible=2.
        PrimaryControllerCaps {
            vqfrt: 4,
            vqrfap: 4,
            vqfrsm: 4,
            vifrt: 2,
            virfap: 2,
            vifrsm: 2,
            ..Default::default()
        }
    }

    fn secondary(scid: u16, vfn: u16, nvq: u16, nvi: u16) -> SecondaryController {
        SecondaryController {
            scid,
            pcid: 0,
            online: false,
            vfn,
            nvq,
            nvi,
        }
    }

    #[test]
    fn plans_that_fit_and_plans_that_do_not() {
        let list = [secondary(1, 1, 0, 0), secondary(2, 2, 0, 0)];
        let ours = check_plan(&Plan::new(2), &caps(), &list).unwrap();
        assert_eq!(ours.iter().map(|s| s.scid).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            check_plan(&Plan::new(1).resources(4, 2), &caps(), &list)
                .unwrap()
                .len(),
            1
        );
        // Too many in total, too few per VF, more than a secondary may take, no such VF.
        assert!(
            check_plan(&Plan::new(2).resources(3, 1), &caps(), &list)
                .unwrap_err()
                .contains("need 6 VQ")
        );
        assert!(
            check_plan(&Plan::new(2).resources(1, 1), &caps(), &list)
                .unwrap_err()
                .contains("at least 2 VQ")
        );
        assert!(
            check_plan(&Plan::new(1).resources(5, 1), &caps(), &list)
                .unwrap_err()
                .contains("at most 4 VQ")
        );
        assert!(
            check_plan(&Plan::new(3), &caps(), &list)
                .unwrap_err()
                .contains("VF 3")
        );
        assert!(check_plan(&Plan::new(0), &caps(), &list).is_err());
        // A VF outside the plan keeps its resources; ours are reassigned whatever they hold.
        let list = [secondary(1, 1, 2, 1), secondary(2, 2, 2, 1)];
        assert!(
            check_plan(&Plan::new(1).resources(3, 1), &caps(), &list)
                .unwrap_err()
                .contains("2 VQ")
        );
        assert!(check_plan(&Plan::new(2), &caps(), &list).is_ok());
    }

    #[test]
    fn steps_are_named_after_the_spec() {
        assert_eq!(
            virt_mgmt_name(virt_mgmt::SECONDARY_ASSIGN, virt_mgmt::RESOURCE_VI, 2, 1),
            "Virtualization Management: assign 1 VI to secondary controller 2"
        );
        assert_eq!(
            describe_secondaries(&[secondary(1, 1, 2, 1)]),
            "controller 1 (VF 1): offline, 2 VQ 1 VI"
        );
        assert!(
            describe_caps(&caps()).starts_with("VQ: 4 flexible (primary 4, secondaries 0, at most 4 each)")
        );
    }
}
