//! The namespace list: found at bring-up, kept up to date from Namespace Attribute Changed
//! events (the Changed Namespace List, log page 04h), and looked up by I/O queues.
//!
//! The list is an immutable snapshot (`Arc<[Namespace]>`, sorted by NSID) replaced as a
//! whole when it changes, with a generation count: a queue keeps its snapshot and looks
//! at the count (one atomic load) on each request, taking the new snapshot when it moved.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::events::AdminData;
use super::{Namespace, Shared};
use crate::addr::PciAddress;
use crate::bus::backing::DeviceBacking;
use crate::nvme::NvmeError;
use crate::nvme::spec::{self, Command, IdentifyNamespace, Status, admin, cns};

/// The Changed Namespace List entry saying more than 1,024 namespaces changed.
const MANY_CHANGED: u32 = 0xffff_ffff;

/// The active namespace list, 1,024 ids at a time (`page(after)` reads the ids above
/// `after`), asking again from the last until a page is not full.
pub(super) fn active_namespace_ids(
    mut page: impl FnMut(u32) -> Result<Vec<u8>, NvmeError>,
) -> Result<Vec<u32>, NvmeError> {
    let mut list = Vec::new();
    loop {
        let after = list.last().copied().unwrap_or(0);
        let ids = spec::parse_namespace_list(&page(after)?);
        let full = ids.len() == 1024;
        // Ids must ascend; a controller that repeats itself ends the walk.
        list.extend(ids.into_iter().filter(|&n| n > after));
        let last = list.last().copied().unwrap_or(0);
        if !full || last <= after || last >= 0xffff_fffe {
            return Ok(list);
        }
    }
}

/// Namespace `nsid` as Identify Namespace data `data` describes it; `None` (logged) when
/// it is inactive (all zeros), has no usable LBA format, or size 0.
pub(super) fn namespace_from(
    address: PciAddress,
    nsid: u32,
    data: &[u8],
) -> Result<Option<Namespace>, NvmeError> {
    let id = IdentifyNamespace::parse(data)?;
    match id.block_size() {
        Some(bs) if id.nsze > 0 => {
            let ns = Namespace::new(nsid, bs, id);
            if let Some(why) = &ns.unusable {
                log::warn!("{address}: namespace {nsid} is not usable: {why}");
            }
            Ok(Some(ns))
        }
        _ => {
            log::warn!("{address}: namespace {nsid} left out: inactive, no usable LBA format or size 0");
            Ok(None)
        }
    }
}

impl<B: DeviceBacking> Shared<B> {
    /// The namespace list now.
    pub(crate) fn namespace_list(&self) -> Arc<[Namespace]> {
        Arc::clone(&self.namespaces.read())
    }

    /// Namespace `nsid`, as the list has it now.
    pub(crate) fn namespace(&self, nsid: u32) -> Option<Namespace> {
        find_namespace(&self.namespaces.read(), nsid).cloned()
    }

    /// Bumped each time the namespace list changes.
    #[inline]
    pub(crate) fn namespace_generation(&self) -> u64 {
        self.namespace_generation.load(Ordering::Acquire)
    }

    /// Whether namespace `nsid` was in the list and left it at run time.
    pub(crate) fn namespace_removed(&self, nsid: u32) -> bool {
        self.removed_namespaces.lock().contains(&nsid)
    }

    // Sets the list (sorted by NSID here).
    pub(super) fn set_namespaces(&self, mut list: Vec<Namespace>) {
        list.sort_by_key(|n| n.nsid);
        list.dedup_by_key(|n| n.nsid);
        *self.namespaces.write() = list.into();
        self.namespace_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// After a Namespace Attribute Changed event with Changed Namespace List `changed`:
    /// identifies each namespace named again (all active ones when more than 1,024
    /// changed) and updates the list — a namespace now inactive leaves it, one newly
    /// attached joins it, one resized or reformatted has its new Identify data. A
    /// namespace whose Identify fails otherwise stays as it was (logged).
    pub(super) fn refresh_namespaces(&self, changed: &[u32]) -> Result<(), NvmeError> {
        let address = self.info.address;
        let identify = |cns_value: u32, nsid: u32, what: &str| -> Result<Option<Vec<u8>>, NvmeError> {
            let mut cmd = Command::new(admin::IDENTIFY);
            cmd.nsid = nsid;
            cmd.cdw[0] = cns_value;
            let (c, data) = self.admin_data(cmd, AdminData::FromDevice(4096), what)?;
            match c.status() {
                s if s.is_success() => Ok(Some(data)),
                // An NSID beyond the controller's: gone as well.
                Status::INVALID_NAMESPACE => Ok(None),
                status => Err(NvmeError::Command {
                    command: what.to_owned(),
                    status,
                }),
            }
        };
        let all = changed.contains(&MANY_CHANGED);
        let nsids = if all {
            active_namespace_ids(|after| {
                identify(cns::ACTIVE_NAMESPACES, after, "Identify active namespace list")?
                    .ok_or_else(|| NvmeError::Invalid("active namespace list refused".into()))
            })?
        } else {
            changed.to_vec()
        };
        let mut list: Vec<Namespace> = self.namespace_list().to_vec();
        if all {
            self.note_removed(&list, |n| !nsids.contains(&n));
            list.retain(|n| nsids.contains(&n.nsid));
        }
        for nsid in nsids {
            let what = format!("Identify namespace {nsid}");
            let ns = match identify(cns::NAMESPACE, nsid, &what) {
                Ok(Some(data)) => namespace_from(address, nsid, &data)?,
                Ok(None) => None,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    log::warn!("{address}: namespace {nsid} changed, but {e}: kept as it was");
                    continue;
                }
            };
            self.note_removed(&list, |n| n == nsid && ns.is_none());
            list.retain(|n| n.nsid != nsid);
            match ns {
                Some(ns) => {
                    log::info!(
                        "{address}: namespace {nsid}: {} blocks of {} bytes",
                        ns.blocks,
                        ns.block_size
                    );
                    self.removed_namespaces.lock().retain(|&n| n != nsid);
                    list.push(ns);
                }
                None => log::info!("{address}: namespace {nsid} is no longer active"),
            }
        }
        self.set_namespaces(list);
        Ok(())
    }

    // Notes the namespaces of `list` that `gone` says left.
    fn note_removed(&self, list: &[Namespace], gone: impl Fn(u32) -> bool) {
        let mut removed = self.removed_namespaces.lock();
        for n in list.iter().map(|n| n.nsid).filter(|&n| gone(n)) {
            if !removed.contains(&n) {
                removed.push(n);
            }
        }
    }
}

/// Namespace `nsid` in `list` (sorted by NSID): a binary search, as each I/O request looks
/// its namespace up.
#[inline]
pub(crate) fn find_namespace(list: &[Namespace], nsid: u32) -> Option<&Namespace> {
    list.binary_search_by_key(&nsid, |n| n.nsid)
        .ok()
        .map(|i| &list[i])
}
