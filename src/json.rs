//! The JSON of `pcibus ... --json`, as `serde::Serialize` on the library's records (feature
//! `serde`): library users get the same JSON as the CLI prints.
//!
//! The schema is `schema/pcibus-v1.schema.json` in the repository (JSON Schema draft
//! 2020-12, its `$id` is [`SCHEMA_ID`]); a field added without a schema update fails the
//! tests. One representation per kind of value:
//!
//! - PCI addresses: strings, `"0000:01:00.0"` (the kernel's form; a domain above `ffff`
//!   has more digits).
//! - Registry ids (vendor, device, subsystem ids, class codes, revisions, capability ids):
//!   lowercase hex strings of fixed width without `0x`: vendor `"8086"`, device `"10d3"`,
//!   class `"010802"` (all 24 bits), revision `"02"`, capability `"10"`, extended
//!   capability `"000e"`.
//! - Quantities (BAR addresses and sizes in bytes, config-space offsets, counts, NUMA
//!   nodes, IOMMU groups, link speed in MT/s, PIDs, seconds since the epoch): JSON numbers.
//! - Yes/no: booleans. Unknown or absent: `null`, never a missing key.
//! - Names from `pci.ids` (`vendor_name`, `device_name`, `subsystem_vendor_name`,
//!   `subsystem_name`, `class_name`, `subclass_name`, `prog_if_name`): strings, `null` where
//!   the database has none.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use crate::PciAddress;
use crate::bus::map::Change;
use crate::config::{self, Capability, ExtCapability};
use crate::hotplug::event::Uevent;
use crate::model::{Bar, ClassCode, DeviceId, LinkSpeed, Resource, VendorId};
use crate::names::{DeviceNames, Names};
use crate::record::{DeviceRecord, Problem, ProblemKind};
use crate::removal::claim::{ClaimRecord, ClaimState};
use crate::sysfs::details::Details;

/// The schema's `$id`: its version is the `v1` in the name. A change that removes or
/// retypes a field gets a new version; adding one keeps it.
pub const SCHEMA_ID: &str = "urn:pcibus:schema:pcibus-v1";

/// A device record with its names: the device object of `pcibus list --json` (and of
/// `show` and `watch`), the record's fields followed by the [`DeviceNames`] fields.
#[derive(Debug, Clone, Serialize)]
pub struct NamedRecord<'a> {
    /// The record.
    #[serde(flatten)]
    pub record: &'a DeviceRecord,
    /// Its names.
    #[serde(flatten)]
    pub names: DeviceNames,
}

impl<'a> NamedRecord<'a> {
    /// `record` with the names `names` has for it.
    pub fn new(record: &'a DeviceRecord, names: &Names) -> Self {
        NamedRecord {
            record,
            names: names.of(record),
        }
    }
}

/// What `pcibus show --json` prints: the device, and its [`Details`] under `details`.
#[derive(Debug, Clone, Serialize)]
pub struct ShownDevice<'a> {
    /// The device.
    #[serde(flatten)]
    pub device: NamedRecord<'a>,
    /// What `show` reads beyond the scan record.
    pub details: &'a Details,
}

/// A change of the device map (`change`, `address`) and the device the map holds after it
/// (`device`: `null` once removed, and for changes that name no device).
#[derive(Debug, Clone, Serialize)]
pub struct MapChange<'a> {
    /// The change.
    #[serde(flatten)]
    pub change: Change,
    /// The device after it.
    pub device: Option<NamedRecord<'a>>,
}

/// One line of `pcibus watch --json` for an event: the event's fields and what it did to
/// the device map (`map`, `null` when the map could not apply it).
#[derive(Debug, Clone, Serialize)]
pub struct WatchEvent<'a> {
    /// The event.
    #[serde(flatten)]
    pub event: &'a Uevent,
    /// Its effect on the map.
    pub map: Option<MapChange<'a>>,
}

/// One line of `pcibus watch --json` after the kernel dropped events: the changes a
/// rescan found (`{"overflow": true, "resync": [...]}`).
#[derive(Debug, Clone)]
pub struct Resync<'a> {
    /// The changes.
    pub resync: Vec<MapChange<'a>>,
}

impl Serialize for Resync<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Resync", 2)?;
        st.serialize_field("overflow", &true)?;
        st.serialize_field("resync", &self.resync)?;
        st.end()
    }
}

impl Serialize for PciAddress {
    /// `"0000:01:00.0"`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for VendorId {
    /// Four lowercase hex digits, `"8086"`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for DeviceId {
    /// Four lowercase hex digits, `"10d3"`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for ClassCode {
    /// Six lowercase hex digits, `"010802"`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for LinkSpeed {
    /// Megatransfers per second, a number: `2500` for 2.5 GT/s.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl Serialize for Problem {
    /// `attribute`, `kind` (for scripts to match on, with `errno`), `errno` (or `null`),
    /// `error` (the message).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let kind = match &self.kind {
            ProblemKind::Parse(_) => "parse",
            ProblemKind::Io { .. } => "io",
            ProblemKind::TimedOut { .. } => "timed_out",
            ProblemKind::NotStarted { .. } => "not_started",
            ProblemKind::RemovalPending => "removal_pending",
            ProblemKind::HeldOpen => "held_open",
            ProblemKind::ConfigRestricted { .. } => "config_restricted",
        };
        let mut st = s.serialize_struct("Problem", 4)?;
        st.serialize_field("attribute", self.attribute)?;
        st.serialize_field("kind", kind)?;
        st.serialize_field("errno", &self.kind.raw_os_error())?;
        st.serialize_field("error", &self.kind.to_string())?;
        st.end()
    }
}

impl Serialize for Capability {
    /// `id` (two hex digits), `offset` (a number), `name`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Capability", 3)?;
        st.serialize_field("id", &format!("{:02x}", self.id))?;
        st.serialize_field("offset", &self.offset)?;
        st.serialize_field("name", config::capability_name(self.id))?;
        st.end()
    }
}

impl Serialize for ExtCapability {
    /// `id` (four hex digits), `version`, `offset` (numbers), `name`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ExtCapability", 4)?;
        st.serialize_field("id", &format!("{:04x}", self.id))?;
        st.serialize_field("version", &self.version)?;
        st.serialize_field("offset", &self.offset)?;
        st.serialize_field("name", config::extended_capability_name(self.id))?;
        st.end()
    }
}

impl Serialize for ClaimRecord {
    /// `address`, `path`, `live`, `pid`, `command`, `since` (seconds since the epoch),
    /// `driver`, `physfn`, `state` (`"active"`, `"releasing"` or `null` for an incomplete
    /// record), `reason` (why it is releasing, else `null`).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (state, reason) = match &self.state {
            Some(ClaimState::Active) => (Some("active"), None),
            Some(ClaimState::Releasing { reason }) => (Some("releasing"), Some(reason.as_str())),
            None => (None, None),
        };
        let since = self
            .since
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let mut st = s.serialize_struct("ClaimRecord", 10)?;
        st.serialize_field("address", &self.address)?;
        st.serialize_field("path", &self.path.to_string_lossy())?;
        st.serialize_field("live", &self.live)?;
        st.serialize_field("pid", &self.pid)?;
        st.serialize_field("command", &self.command)?;
        st.serialize_field("since", &since)?;
        st.serialize_field("driver", &self.driver)?;
        st.serialize_field("physfn", &self.physfn)?;
        st.serialize_field("state", &state)?;
        st.serialize_field("reason", &reason)?;
        st.end()
    }
}

impl Serialize for Uevent {
    /// `action`, `address` (the PCI function's, else `null`), `subsystem`, `devpath`,
    /// `driver`, `seqnum`, `vars` (every variable, an object of strings).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Uevent", 7)?;
        st.serialize_field("action", self.action.as_str())?;
        st.serialize_field("address", &self.pci_address())?;
        st.serialize_field("subsystem", &self.subsystem)?;
        st.serialize_field("devpath", &self.devpath)?;
        st.serialize_field("driver", &self.driver)?;
        st.serialize_field("seqnum", &self.seqnum)?;
        st.serialize_field("vars", &VarMap(&self.vars))?;
        st.end()
    }
}

impl Serialize for Change {
    /// `change` (`added`, `removed`, `updated`, `replaced`, `unchanged`, `not_pci`) and
    /// `address` (`null` for the last two).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Change", 2)?;
        st.serialize_field("change", self.kind())?;
        st.serialize_field("address", &self.address())?;
        st.end()
    }
}

// `KEY=VALUE` pairs as an object.
struct VarMap<'a>(&'a [(String, String)]);

impl Serialize for VarMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

// Serializers for the `#[serde(serialize_with)]` fields of the records.

/// A revision: two hex digits, `"02"`.
pub(crate) fn revision<S: Serializer>(r: &Option<u8>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.collect_str(&format_args!("{r:02x}")),
        None => s.serialize_none(),
    }
}

/// The `resource` lines as the present standard BARs ([`DeviceRecord::bars`]).
pub(crate) fn bars<S: Serializer>(resources: &[Resource], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(resources.iter().filter_map(Bar::from_resource))
}

/// The `uevent` variables as an object, or `null`.
pub(crate) fn uevent_vars<S: Serializer>(
    vars: &Option<Vec<(String, String)>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match vars {
        Some(v) => VarMap(v).serialize(s),
        None => s.serialize_none(),
    }
}
