//! SR-IOV on the emulated NVMe primary controller: the order in which
//! `nvme::sriov::enable`/`disable` change the VF count against the controller's
//! Virtualization Management steps, and that they ask the count of a [`VfCount`]
//! (config space, or the bus) rather than reading `sriov_numvfs`, which takes the PF's
//! device lock.

use pcibus::PciAddress;
use pcibus::nvme::sriov::{self, Plan, SriovError, VfCount};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme, SriovConfig};

mod common;
use common::{emu, quick, up};

// A VF count kept in memory, with every call noted; VF n sits at function n of the PF's
// device.
struct Counted {
    pf: PciAddress,
    now: u16,
    calls: Vec<String>,
}

impl VfCount for Counted {
    fn num_vfs(&mut self) -> Result<u16, SriovError> {
        self.calls.push("num_vfs".into());
        Ok(self.now)
    }

    fn set_vfs(&mut self, n: u16) -> Result<Vec<PciAddress>, SriovError> {
        self.calls.push(format!("set_vfs {n}"));
        self.now = n;
        Ok((1..=n)
            .map(|i| PciAddress::new(self.pf.domain(), self.pf.bus(), 0, i as u8).unwrap())
            .collect())
    }
}

fn sriov_emu() -> EmulatedNvme {
    emu(EmuConfig {
        sriov: Some(SriovConfig {
            vfs: 3,
            flexible_vq: 8,
            flexible_vi: 4,
        }),
        ..EmuConfig::default()
    })
}

#[test]
fn enable_sets_the_count_after_the_reset_and_before_assigning_and_disable_clears_it() {
    let e = sriov_emu();
    let pf = up(&e);
    let mut count = Counted {
        pf: pf.info().address,
        now: 0,
        calls: Vec::new(),
    };
    let plan = Plan::new(2).resources(2, 1).options(quick());
    let mut journal = Vec::new();
    let enabled = sriov::enable(pf, &e, &mut count, &plan, &mut journal).unwrap();
    // Nothing to remove first; the count changes once, after the PF's reset.
    assert_eq!(count.calls, ["num_vfs", "set_vfs 2"]);
    let steps: Vec<&str> = journal.iter().map(|s| s.what.as_str()).collect();
    let at = |what: &str| {
        steps
            .iter()
            .position(|s| s.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} in {steps:?}"))
    };
    assert!(at("Function-level reset") < at("NumVFs = 2"), "{steps:?}");
    assert!(
        at("NumVFs = 2") < at("Virtualization Management: assign"),
        "{steps:?}"
    );
    assert!(!steps.iter().any(|s| s.contains("sriov_numvfs")), "{steps:?}");
    assert!(enabled.reset);
    assert_eq!(enabled.vfs.len(), 2);
    for vf in &enabled.vfs {
        assert!(vf.secondary.online, "{vf:?}");
        assert_eq!((vf.secondary.nvq, vf.secondary.nvi), (2, 1));
    }

    let mut journal = Vec::new();
    let list = sriov::disable(&enabled.pf, &mut count, &mut journal).unwrap();
    assert_eq!(count.calls.last().unwrap(), "set_vfs 0");
    assert_eq!(count.now, 0);
    assert!(list.iter().all(|s| !s.online), "{list:?}");
}

// VFs left from an earlier run are removed before the reset (which would take their
// controllers away under a driver's feet), and the count is set again after it.
#[test]
fn vfs_left_from_before_are_removed_before_the_reset() {
    let e = sriov_emu();
    let pf = up(&e);
    let mut count = Counted {
        pf: pf.info().address,
        now: 3,
        calls: Vec::new(),
    };
    let plan = Plan::new(1).resources(2, 1).options(quick());
    let mut journal = Vec::new();
    let enabled = sriov::enable(pf, &e, &mut count, &plan, &mut journal).unwrap();
    assert_eq!(count.calls, ["num_vfs", "set_vfs 0", "set_vfs 1"]);
    let steps: Vec<&str> = journal.iter().map(|s| s.what.as_str()).collect();
    let reset = steps
        .iter()
        .position(|s| s.starts_with("Function-level reset"))
        .unwrap();
    let removed = steps.iter().position(|s| s.starts_with("NumVFs = 0")).unwrap();
    assert!(removed < reset, "{steps:?}");
    assert_eq!(enabled.vfs.len(), 1);
}

// A count that cannot be changed (the bus refuses: it holds a VF) stops `enable` before
// any secondary is assigned, with the reason.
#[test]
fn a_refused_count_change_stops_enable_and_says_why() {
    struct Refusing;
    impl VfCount for Refusing {
        fn num_vfs(&mut self) -> Result<u16, SriovError> {
            Ok(0)
        }
        fn set_vfs(&mut self, _: u16) -> Result<Vec<PciAddress>, SriovError> {
            Err(SriovError::Capability {
                address: "0000:01:00.0".parse().unwrap(),
                what: "refused for the test".into(),
            })
        }
    }
    let e = sriov_emu();
    let pf = up(&e);
    let plan = Plan::new(2).resources(2, 1).options(quick());
    let mut journal = Vec::new();
    let err = sriov::enable(pf, &e, &mut Refusing, &plan, &mut journal).unwrap_err();
    assert!(err.to_string().contains("refused for the test"), "{err}");
    assert!(
        !journal
            .iter()
            .any(|s| s.what.starts_with("Virtualization Management: assign"))
    );
    let last = journal.last().unwrap();
    assert!(!last.ok && last.what == "NumVFs = 2", "{last:?}");
}
