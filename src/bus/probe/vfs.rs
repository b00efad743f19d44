//! [`Bus::set_vfs`]: the number of VFs of a PF a driver of the bus holds, changed with
//! that driver's agreement (see [`crate::bus::sriov`]).

use super::{Bus, guarded};
use crate::addr::PciAddress;
use crate::bus::attach::Attach;
use crate::bus::devargs::{DevArg, DevargsError};
use crate::bus::sriov::{
    ChangeError, Rollback, SetVfs, SetVfsError, SysfsVfs, VfControl, read_sriov, vf_addresses,
};
use crate::config::SriovCapability;

impl<A: Attach> Bus<A> {
    /// Admits one more device to this bus's [selection](Self::selection) with its
    /// arguments ([`Selection::allow`](crate::bus::devargs::Selection::allow)), e.g. the
    /// VFs [`set_vfs`](Self::set_vfs) created; offer it with [`probe`](Self::probe).
    pub fn allow(&mut self, devarg: DevArg) -> Result<(), DevargsError> {
        self.selection.allow(devarg)
    }

    /// NumVFs of `pf`, which a driver of this bus holds, from the SR-IOV capability in
    /// its config space (never `sriov_numvfs`, which takes the PF's device lock).
    pub fn num_vfs(&self, pf: PciAddress) -> Result<u16, SetVfsError> {
        let held = self.held.get(&pf).ok_or(SetVfsError::NotHeld(pf))?;
        Ok(capability(pf, &held.attached.backing)?.num_vfs)
    }

    /// Changes the number of VFs of `pf` to `n` (0: removes them all) through sysfs
    /// ([`SysfsVfs`] under the map's sysfs root): [`set_vfs_with`](Self::set_vfs_with).
    pub fn set_vfs(&mut self, pf: PciAddress, n: u16) -> Result<SetVfs, SetVfsError> {
        let control = SysfsVfs::new(self.map.scanner().root().clone(), pf);
        self.set_vfs_with(pf, n, &control)
    }

    /// Changes the number of VFs of `pf`, which a driver of this bus holds, to `n`
    /// through `control`, and returns the VFs' addresses.
    ///
    /// The current count (NumVFs), TotalVFs and the VFs' routing come from the PF's
    /// config space through its backing, never from `sriov_numvfs` (reading it takes
    /// the PF's device lock). When the count is `n` already nothing is done. Otherwise,
    /// in order:
    ///
    /// 1. `n` above TotalVFs: [`SetVfsError::TooMany`].
    /// 2. Any change with VFs present removes them all (the kernel goes through 0), so
    ///    the bus refuses ([`SetVfsError::VfsInUse`]) while it holds or keeps open
    ///    ([`releasing`](Self::releasing)) any of them: their removal would wait for
    ///    this process to close them, under the PF's device lock. Detach them first.
    /// 3. The PF's driver is asked ([`Driver::sriov_configure`](crate::bus::Driver::sriov_configure));
    ///    it can refuse ([`SetVfsError::Refused`]).
    /// 4. `control` changes the count, with kernel driver autoprobing of the new VFs
    ///    off ([`VfControl::change_num_vfs`]), and NumVFs is read back from config space.
    ///    If that fails or reads another count, the previous count is put back when it
    ///    had changed: [`SetVfsError::Change`] says what failed and what became of the
    ///    previous count.
    ///
    /// For a PF bound to vfio-pci, vfio-pci must have been loaded with `enable_sriov=1`
    /// (else the write fails), and opening its VFs through VFIO needs the PF's VF token
    /// ([`VfioDevice::set_vf_token`](crate::vfio::VfioDevice::set_vf_token)).
    pub fn set_vfs_with(
        &mut self,
        pf: PciAddress,
        n: u16,
        control: &dyn VfControl,
    ) -> Result<SetVfs, SetVfsError> {
        let held = self.held.get(&pf).ok_or(SetVfsError::NotHeld(pf))?;
        let backing = &held.attached.backing;
        let cap = capability(pf, backing)?;
        let now = cap.num_vfs;
        if now == n {
            return Ok(SetVfs {
                pf,
                previous: now,
                num_vfs: now,
                vfs: vf_addresses(pf, &cap, now),
                map: Vec::new(),
            });
        }
        if n > cap.total_vfs {
            return Err(SetVfsError::TooMany {
                pf,
                asked: n,
                total: cap.total_vfs,
            });
        }
        let in_use: Vec<(PciAddress, String)> = vf_addresses(pf, &cap, now)
            .into_iter()
            .filter_map(|vf| {
                let driver = match (self.held.get(&vf), self.parked.get(&vf)) {
                    (Some(h), _) => self.drivers[h.driver].name.clone(),
                    (None, Some(p)) => p.driver.clone(),
                    (None, None) => return None,
                };
                Some((vf, driver))
            })
            .collect();
        if !in_use.is_empty() {
            return Err(SetVfsError::VfsInUse { pf, vfs: in_use });
        }

        let Some(held) = self.held.get_mut(&pf) else {
            return Err(SetVfsError::NotHeld(pf));
        };
        let slot = &mut self.drivers[held.driver];
        let name = slot.name.clone();
        // Not reached: a driver is away only during a probe, inside a call of the bus.
        let Some(driver) = slot.driver.as_mut() else {
            return Err(SetVfsError::NotHeld(pf));
        };
        let state = &mut held.state;
        match guarded(&name, "sriov_configure", pf, || {
            driver.sriov_configure(state, pf, n)
        }) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(SetVfsError::Refused {
                    pf,
                    driver: name,
                    asked: n,
                    error,
                });
            }
            Err(panicked) => return Err(SetVfsError::Panicked { pf, panicked }),
        }

        let backing = &held.attached.backing;
        let changed = control
            .change_num_vfs(now, n)
            .map_err(ChangeError::from)
            .and_then(|()| {
                let cap = read_sriov(backing)?.ok_or(ChangeError::ReadBack { got: 0 })?;
                if cap.num_vfs == n {
                    Ok(cap)
                } else {
                    Err(ChangeError::ReadBack { got: cap.num_vfs })
                }
            });
        match changed {
            Ok(cap) => {
                log::info!("{pf}: NumVFs {now} -> {n}");
                // The map shows the VFs created, and no longer those removed, at once:
                // the caller may probe them without waiting for their uevents.
                let mut events = Vec::new();
                let map = self.rescan_into(&mut events).unwrap_or_else(|e| {
                    log::warn!("{pf}: rescanning after NumVFs {now} -> {n}: {e}");
                    Vec::new()
                });
                if !events.is_empty() {
                    log::info!(
                        "{pf}: the rescan after NumVFs {now} -> {n} took back {} device(s)",
                        events.len()
                    );
                }
                Ok(SetVfs {
                    pf,
                    previous: now,
                    num_vfs: n,
                    vfs: vf_addresses(pf, &cap, n),
                    map,
                })
            }
            Err(error) => {
                let rollback = match read_sriov(backing) {
                    Ok(Some(cap)) if cap.num_vfs == now => Rollback::Unchanged,
                    Ok(cap) => {
                        let got = cap.map_or(0, |c| c.num_vfs);
                        let back = control
                            .change_num_vfs(got, now)
                            .map_err(ChangeError::from)
                            .and_then(|()| match read_sriov(backing)? {
                                Some(c) if c.num_vfs == now => Ok(()),
                                c => Err(ChangeError::ReadBack {
                                    got: c.map_or(0, |c| c.num_vfs),
                                }),
                            });
                        match back {
                            Ok(()) => Rollback::RolledBack,
                            Err(e) => Rollback::Failed(Box::new(e)),
                        }
                    }
                    Err(e) => Rollback::Unknown(Box::new(e)),
                };
                let e = SetVfsError::Change {
                    pf,
                    from: now,
                    to: n,
                    error: Box::new(error),
                    rollback,
                };
                log::warn!("{e}");
                Err(e)
            }
        }
    }
}

// The SR-IOV capability of `pf`, through its backing.
fn capability<B: crate::bus::DeviceBacking>(
    pf: PciAddress,
    backing: &B,
) -> Result<SriovCapability, SetVfsError> {
    match read_sriov(backing) {
        Ok(Some(cap)) => Ok(cap),
        Ok(None) => Err(SetVfsError::NotSriov(pf)),
        Err(error) => Err(SetVfsError::Config { pf, error }),
    }
}
