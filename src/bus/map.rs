//! The device map: the scan's records by address, kept current from uevents.
//!
//! One event updates one record: [`DeviceMap::apply`] re-reads the directory of the device
//! the event names (through [`Scanner::scan_device`], so the record is what a full scan
//! would give) or, for `remove`, drops its record without reading sysfs. A full rescan
//! happens only when asked for, with [`DeviceMap::resync`], which is what an
//! [`Event::Overflow`](crate::hotplug::monitor::Event::Overflow) calls for.
//!
//! ```no_run
//! use pcibus::bus::map::DeviceMap;
//! use pcibus::hotplug::monitor::{Event, UeventMonitor};
//! use pcibus::sysfs::scan::{Scanner, SysfsRoot};
//! let mut map = DeviceMap::new(Scanner::new(SysfsRoot::from_env()))?;
//! let mut mon = UeventMonitor::open()?;
//! while let Some(event) = mon.next_timeout(std::time::Duration::from_secs(1))? {
//!     match event {
//!         Event::Uevent(ev) => println!("{:?}", map.apply(&ev)?),
//!         Event::Overflow => println!("{:?}", map.resync()?),
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::addr::PciAddress;
use crate::hotplug::event::{Action, Uevent};
use crate::record::DeviceRecord;
use crate::sysfs::scan::{ScanError, Scanner};

/// What applying an event (or a resync) did to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// A device the map did not have.
    Added(PciAddress),
    /// A device the map had is gone.
    Removed(PciAddress),
    /// A device's record changed (a driver bound or unbound, an attribute changed).
    Updated(PciAddress),
    /// The device at this address is another one than the map had: the old one was
    /// removed and a new one added (its [`identity`](DeviceRecord::identity) differs),
    /// though the events that would have said so were not seen. Whatever was known of the
    /// old device is void.
    Replaced(PciAddress),
    /// A PCI event that left the map as it was.
    Unchanged,
    /// Not an event of a PCI function (`SUBSYSTEM` is not `pci`, or no address).
    NotPci,
}

impl Change {
    /// The change's name in the JSON and in `watch`'s lines: `added`, `removed`,
    /// `updated`, `replaced`, `unchanged`, `not_pci`.
    pub fn kind(self) -> &'static str {
        match self {
            Change::Added(_) => "added",
            Change::Removed(_) => "removed",
            Change::Updated(_) => "updated",
            Change::Replaced(_) => "replaced",
            Change::Unchanged => "unchanged",
            Change::NotPci => "not_pci",
        }
    }

    /// The device changed, if any.
    pub fn address(self) -> Option<PciAddress> {
        match self {
            Change::Added(a) | Change::Removed(a) | Change::Updated(a) | Change::Replaced(a) => Some(a),
            Change::Unchanged | Change::NotPci => None,
        }
    }
}

/// The devices of one sysfs tree by address, as its [`Scanner`] reads them.
#[derive(Debug, Clone)]
pub struct DeviceMap {
    scanner: Scanner,
    devices: BTreeMap<PciAddress, DeviceRecord>,
}

impl DeviceMap {
    /// A map filled by one full scan with `scanner`, which also reads every device later
    /// events name.
    pub fn new(scanner: Scanner) -> Result<Self, ScanError> {
        let devices = by_address(scanner.scan()?.devices);
        Ok(DeviceMap { scanner, devices })
    }

    /// The record of `address`.
    pub fn get(&self, address: PciAddress) -> Option<&DeviceRecord> {
        self.devices.get(&address)
    }

    /// The records, by address.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &DeviceRecord> + DoubleEndedIterator {
        self.devices.values()
    }

    /// How many devices the map has.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the map has no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The scanner that reads the devices.
    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// Updates the record of the device `event` names: `remove` drops it without reading
    /// sysfs; any other action, and a synthetic `remove` ([`Uevent::is_synthetic`]),
    /// re-reads that one device (and drops its record if the device is gone by then).
    /// Events that are not of a PCI function change nothing.
    pub fn apply(&mut self, event: &Uevent) -> Result<Change, ScanError> {
        let Some(address) = event.pci_address().filter(|_| event.is_pci()) else {
            return Ok(Change::NotPci);
        };
        // A real `remove` comes before the kernel deletes the directory, so it is taken at
        // its word; a synthetic one (root's `echo remove > uevent`) removes nothing, so
        // the device is re-read and kept if it is there.
        if event.action == Action::Remove && !event.is_synthetic() {
            return Ok(match self.devices.remove(&address) {
                Some(_) => Change::Removed(address),
                None => Change::Unchanged,
            });
        }
        let now = self.scanner.scan_device(address)?;
        Ok(self.put(address, now))
    }

    /// Replaces the map with one full scan (after events were lost), returning what
    /// changed, by address.
    pub fn resync(&mut self) -> Result<Vec<Change>, ScanError> {
        let mut fresh = by_address(self.scanner.scan()?.devices);
        let mut changes = Vec::new();
        for (&address, old) in &self.devices {
            match fresh.get(&address) {
                None => changes.push(Change::Removed(address)),
                Some(new) if another(old, new) => changes.push(Change::Replaced(address)),
                Some(new) if new != old => changes.push(Change::Updated(address)),
                Some(_) => {}
            }
        }
        for &address in fresh.keys() {
            if !self.devices.contains_key(&address) {
                changes.push(Change::Added(address));
            }
        }
        changes.sort_by_key(|c| c.address());
        std::mem::swap(&mut self.devices, &mut fresh);
        Ok(changes)
    }

    // Puts what a read of `address` found in the map.
    fn put(&mut self, address: PciAddress, now: Option<DeviceRecord>) -> Change {
        match (self.devices.entry(address), now) {
            (Entry::Vacant(_), None) => Change::Unchanged,
            (Entry::Occupied(e), None) => {
                e.remove();
                Change::Removed(address)
            }
            (Entry::Vacant(e), Some(dev)) => {
                e.insert(dev);
                Change::Added(address)
            }
            (Entry::Occupied(mut e), Some(dev)) => {
                if *e.get() == dev {
                    Change::Unchanged
                } else {
                    let change = match another(e.get(), &dev) {
                        true => Change::Replaced(address),
                        false => Change::Updated(address),
                    };
                    e.insert(dev);
                    change
                }
            }
        }
    }
}

impl<'a> IntoIterator for &'a DeviceMap {
    type Item = &'a DeviceRecord;
    type IntoIter = std::collections::btree_map::Values<'a, PciAddress, DeviceRecord>;

    fn into_iter(self) -> Self::IntoIter {
        self.devices.values()
    }
}

// Whether `new` is another device than `old` (both of one address): both incarnations
// known and different.
fn another(old: &DeviceRecord, new: &DeviceRecord) -> bool {
    matches!((old.identity, new.identity), (Some(a), Some(b)) if a != b)
}

fn by_address(devices: Vec<DeviceRecord>) -> BTreeMap<PciAddress, DeviceRecord> {
    devices.into_iter().map(|d| (d.address, d)).collect()
}
