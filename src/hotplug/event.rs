//! The kernel's uevent datagrams (`NETLINK_KOBJECT_UEVENT`), parsed.
//!
//! A kernel message is `ACTION@DEVPATH\0` followed by `KEY=VALUE\0` pairs (the same
//! variables a `/sys/.../uevent` file lists, plus `ACTION`, `DEVPATH`, `SUBSYSTEM` and
//! `SEQNUM`). udev re-broadcasts events on the same netlink family with a `libudev\0`
//! magic and a binary header; those are recognised and reported as [`Datagram::Udev`],
//! not as errors.
//!
//! The parser is pure, bounded ([`UEVENT_MSG_MAX`] bytes, [`UEVENT_VARS_MAX`] variables)
//! and never panics; `fuzz/fuzz_targets/kobject_uevent.rs` checks that and the round trip
//! through [`Uevent::to_bytes`].

use std::fmt;

use crate::addr::{AddressError, PciAddress};
use crate::error::shorten;

/// The largest datagram accepted, in bytes. The kernel builds a message from the header
/// and at most 2048 bytes of variables (`UEVENT_BUFFER_SIZE`); 8 KiB leaves room for a
/// long `DEVPATH` and rejects anything absurd.
pub const UEVENT_MSG_MAX: usize = 8192;

/// The most variables accepted. The kernel allows 64 (`UEVENT_NUM_ENVP`); twice that
/// leaves room for kernels yet to come.
pub const UEVENT_VARS_MAX: usize = 128;

/// The magic that starts a message relayed by udev (`libudev\0`).
pub const UDEV_MAGIC: &[u8] = b"libudev\0";

/// What a `ACTION` says happened to the device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// The device appeared.
    Add,
    /// The device is gone.
    Remove,
    /// Something about it changed (also what a write of `change` to its `uevent` file
    /// sends).
    Change,
    /// It was renamed or moved (`DEVPATH_OLD` names the old path).
    Move,
    /// It was brought online (CPUs, memory).
    Online,
    /// It was taken offline.
    Offline,
    /// A driver was bound to it (`DRIVER` names it).
    Bind,
    /// Its driver was unbound (without `DRIVER`: the event comes after the driver left).
    Unbind,
    /// An action this crate does not know; never one of the names above.
    Other(String),
}

impl Action {
    /// The action for a kernel action name (`add`, `remove`, ...): the known names map to
    /// their variant, anything else to [`Action::Other`].
    pub fn from_name(name: &str) -> Action {
        match name {
            "add" => Action::Add,
            "remove" => Action::Remove,
            "change" => Action::Change,
            "move" => Action::Move,
            "online" => Action::Online,
            "offline" => Action::Offline,
            "bind" => Action::Bind,
            "unbind" => Action::Unbind,
            other => Action::Other(other.to_owned()),
        }
    }

    /// The name as the kernel writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Change => "change",
            Action::Move => "move",
            Action::Online => "online",
            Action::Offline => "offline",
            Action::Bind => "bind",
            Action::Unbind => "unbind",
            Action::Other(s) => s,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kernel uevent.
///
/// The typed fields are derived from `vars` (which keeps every variable in message order,
/// `ACTION`, `DEVPATH`, `SUBSYSTEM` and `SEQNUM` included) by [`parse_datagram`] and
/// [`Uevent::from_vars`], so such a `Uevent` is consistent with the message it came from.
/// [`Uevent::to_bytes`] writes the header and `vars` only: after changing a typed field
/// by hand, rebuild the event with `from_vars` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// What happened.
    pub action: Action,
    /// The device's path under `/sys`, starting with `/` (`/devices/pci0000:00/0000:00:01.0`).
    pub devpath: String,
    /// `SUBSYSTEM` (`pci`, `nvme`, `block`, ...).
    pub subsystem: Option<String>,
    /// `SEQNUM`: the kernel's event counter; a gap means events were lost.
    pub seqnum: Option<u64>,
    /// `PCI_SLOT_NAME`, parsed strictly (`DDDD:BB:DD.F`, as the kernel writes it).
    pub pci_slot_name: Option<PciAddress>,
    /// `DRIVER`: on `bind`, the new driver; on other actions of a bound device (`change`),
    /// its driver. `unbind` and `remove` have none: the kernel sends them after the driver
    /// is detached (seen on 6.1 and 6.12), so who was bound is not in the event.
    pub driver: Option<String>,
    /// Every `KEY=VALUE` variable, in message order.
    pub vars: Vec<(String, String)>,
}

/// What a datagram on the uevent netlink family is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    /// A message from the kernel.
    Kernel(Uevent),
    /// A message relayed by udev (`libudev\0` and a binary header): not parsed here.
    Udev,
}

/// Why a datagram is not a valid kernel uevent. Every variant quotes the offending text,
/// shortened by [`shorten`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UeventError {
    /// The datagram is longer than [`UEVENT_MSG_MAX`].
    #[error("uevent: {len} bytes, more than the {max} a kernel message can have")]
    TooLong {
        /// Its length.
        len: usize,
        /// [`UEVENT_MSG_MAX`].
        max: usize,
    },
    /// More than [`UEVENT_VARS_MAX`] variables.
    #[error("uevent: more than {max} variables")]
    TooManyVars {
        /// [`UEVENT_VARS_MAX`].
        max: usize,
    },
    /// The `ACTION@DEVPATH` header is missing or malformed.
    #[error("uevent header: expected {expected} in \"{text}\"")]
    Header {
        /// What was expected.
        expected: &'static str,
        /// The header, shortened.
        text: String,
    },
    /// A variable is malformed (no `=`, not UTF-8, an empty key, ...).
    #[error("uevent variable {index}: expected {expected} in \"{text}\"")]
    Var {
        /// Its 0-based position among the variables.
        index: usize,
        /// What was expected.
        expected: &'static str,
        /// The variable, shortened.
        text: String,
    },
    /// A variable the parser interprets has a bad value, is repeated, or contradicts the
    /// header.
    #[error("uevent {key}: expected {expected} in \"{text}\"")]
    Value {
        /// The variable's key (`SEQNUM`, `ACTION`, ...).
        key: &'static str,
        /// What was expected.
        expected: &'static str,
        /// The value, shortened.
        text: String,
    },
    /// `PCI_SLOT_NAME` is not a strict PCI address.
    #[error("uevent PCI_SLOT_NAME")]
    SlotName(#[source] AddressError),
}

/// Parses one datagram received on a `NETLINK_KOBJECT_UEVENT` socket.
///
/// Returns [`Datagram::Udev`] for a message relayed by udev, [`Datagram::Kernel`] for a
/// valid kernel message, and an error naming what is wrong otherwise. A missing final
/// `\0` is tolerated.
pub fn parse_datagram(bytes: &[u8]) -> Result<Datagram, UeventError> {
    if bytes.len() > UEVENT_MSG_MAX {
        return Err(UeventError::TooLong {
            len: bytes.len(),
            max: UEVENT_MSG_MAX,
        });
    }
    if bytes.starts_with(UDEV_MAGIC) {
        return Ok(Datagram::Udev);
    }
    let body = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    let mut parts = body.split(|&b| b == 0);
    // `split` yields at least one (possibly empty) part.
    let header = parts.next().unwrap_or_default();
    let header_err = |expected| UeventError::Header {
        expected,
        text: shorten(header),
    };
    let at = header
        .iter()
        .position(|&b| b == b'@')
        .ok_or_else(|| header_err("ACTION@DEVPATH"))?;
    let action = std::str::from_utf8(&header[..at]).map_err(|_| header_err("UTF-8"))?;
    let devpath = std::str::from_utf8(&header[at + 1..]).map_err(|_| header_err("UTF-8"))?;
    let mut vars = Vec::new();
    for (index, part) in parts.enumerate() {
        if index == UEVENT_VARS_MAX {
            return Err(UeventError::TooManyVars { max: UEVENT_VARS_MAX });
        }
        let var_err = |expected| UeventError::Var {
            index,
            expected,
            text: shorten(part),
        };
        let text = std::str::from_utf8(part).map_err(|_| var_err("UTF-8"))?;
        let (key, value) = text.split_once('=').ok_or_else(|| var_err("KEY=VALUE"))?;
        if !valid_key(key) {
            return Err(var_err("a key of ASCII letters, digits and '_'"));
        }
        vars.push((key.to_owned(), value.to_owned()));
    }
    Uevent::from_vars(Action::from_name(action), devpath.to_owned(), vars).map(Datagram::Kernel)
}

/// Keys the kernel writes: `ASCII letters, digits, '_'` (synthetic events add
/// `SYNTH_ARG_name` with the user's alphanumeric name). Crate-visible so that
/// `hotplug::udev` can tell which udev properties the kernel's format can carry.
pub(crate) fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Uevent {
    /// Builds an event from its header and variables, deriving the typed fields; checks
    /// what [`parse_datagram`] checks (a header `ACTION`/`DEVPATH` agreeing with the
    /// variables of the same name, interpreted keys not repeated, values well formed).
    pub fn from_vars(
        action: Action,
        devpath: String,
        vars: Vec<(String, String)>,
    ) -> Result<Uevent, UeventError> {
        // `Other("add")` is written as `add` and would read back as `Add`: normalise.
        let action = Action::from_name(action.as_str());
        let action_text = action.as_str();
        let header_err = |expected| UeventError::Header {
            expected,
            text: shorten(format!("{action_text}@{devpath}").as_bytes()),
        };
        if action_text.is_empty() || !action_text.bytes().all(|b| b.is_ascii_graphic() && b != b'@') {
            return Err(header_err("an action of printable ASCII before '@'"));
        }
        if !devpath.starts_with('/') || devpath.contains('\0') {
            return Err(header_err("a DEVPATH starting with '/'"));
        }
        if vars.len() > UEVENT_VARS_MAX {
            return Err(UeventError::TooManyVars { max: UEVENT_VARS_MAX });
        }
        let mut ev = Uevent {
            action,
            devpath,
            subsystem: None,
            seqnum: None,
            pci_slot_name: None,
            driver: None,
            vars: Vec::new(),
        };
        let mut seen: Vec<&'static str> = Vec::new();
        for (key, value) in &vars {
            let key: &'static str = match key.as_str() {
                "ACTION" => "ACTION",
                "DEVPATH" => "DEVPATH",
                "SUBSYSTEM" => "SUBSYSTEM",
                "SEQNUM" => "SEQNUM",
                "PCI_SLOT_NAME" => "PCI_SLOT_NAME",
                "DRIVER" => "DRIVER",
                _ => continue,
            };
            let value_err = |expected| UeventError::Value {
                key,
                expected,
                text: shorten(value.as_bytes()),
            };
            if seen.contains(&key) {
                return Err(value_err("one occurrence only"));
            }
            seen.push(key);
            match key {
                "ACTION" if value != ev.action.as_str() => return Err(value_err("the header's action")),
                "DEVPATH" if *value != ev.devpath => return Err(value_err("the header's DEVPATH")),
                "SUBSYSTEM" => ev.subsystem = Some(value.clone()),
                "SEQNUM" => {
                    // At most 20 digits: u64::MAX has 20; parse() also rejects overflow.
                    let digits =
                        !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit());
                    let n = if digits { value.parse().ok() } else { None };
                    ev.seqnum = Some(n.ok_or_else(|| value_err("a decimal number"))?);
                }
                "PCI_SLOT_NAME" => {
                    let a = PciAddress::parse_strict(value).map_err(UeventError::SlotName)?;
                    ev.pci_slot_name = Some(a);
                }
                "DRIVER" => ev.driver = Some(value.clone()),
                _ => {}
            }
        }
        ev.vars = vars;
        Ok(ev)
    }

    /// The message as the kernel sends it: `ACTION@DEVPATH\0` then each `KEY=VALUE\0`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(self.action.as_str().as_bytes());
        out.push(b'@');
        out.extend_from_slice(self.devpath.as_bytes());
        out.push(0);
        for (k, v) in &self.vars {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    /// The value of variable `key` (the first, if repeated).
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether a process wrote the event into the device's `uevent` file (`echo remove >
    /// /sys/.../uevent`, root only) rather than the kernel sending it for a real change:
    /// such events carry `SYNTH_UUID` (`0` when the writer gave none). A synthetic `remove`
    /// removes nothing.
    pub fn is_synthetic(&self) -> bool {
        self.var("SYNTH_UUID").is_some()
    }

    /// Whether the event is about a PCI function (`SUBSYSTEM=pci`). Events of devices
    /// below one (an `nvme` controller, a `block` disk) are not.
    pub fn is_pci(&self) -> bool {
        self.subsystem.as_deref() == Some("pci")
    }

    /// The PCI address the event is about: `PCI_SLOT_NAME`, else, for a `pci` event, the
    /// last component of `DEVPATH` when it is a strict address.
    pub fn pci_address(&self) -> Option<PciAddress> {
        if let Some(a) = self.pci_slot_name {
            return Some(a);
        }
        if !self.is_pci() {
            return None;
        }
        let last = self.devpath.rsplit('/').next()?;
        PciAddress::parse_strict(last).ok()
    }
}

/// Writes bytes with `\0` as `\0`, printable ASCII as is and other bytes as `\xNN`: the
/// form the recorded samples in tests and the VM dump use.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 16);
    for &b in bytes {
        match b {
            0 => out.push_str("\\0"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kernel(bytes: &[u8]) -> Uevent {
        match parse_datagram(bytes) {
            Ok(Datagram::Kernel(ev)) => ev,
            other => panic!("not a kernel event: {other:?}"),
        }
    }

    fn addr(s: &str) -> PciAddress {
        PciAddress::parse_strict(s).unwrap()
    }

    /// The host's `echo change > /sys/devices/virtual/mem/null/uevent`, as received.
    const NULL_CHANGE: &[u8] = b"change@/devices/virtual/mem/null\0ACTION=change\0DEVPATH=/devices/virtual/mem/null\0SUBSYSTEM=mem\0SYNTH_UUID=0\0MAJOR=1\0MINOR=3\0DEVNAME=null\0DEVMODE=0666\0SEQNUM=814\0";

    // Recorded on Debian's 6.12.117 in QEMU (q35, SR-IOV NVMe behind a root port) by
    // `tests/vm/run -k 6.12 -p sriov -e uevent_dump`: `remove` then `rescan` of the PF,
    // nvme's bind after the rescan, an `unbind` through nvme's driver directory, and the
    // first VF's `add` when `sriov_numvfs` went to 2. The bytes are as received.
    const PF_REMOVE: &[u8] = b"remove@/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0ACTION=remove\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0SUBSYSTEM=pci\0PCI_CLASS=10802\0PCI_ID=1B36:0010\0PCI_SUBSYS_ID=1AF4:1100\0PCI_SLOT_NAME=0000:01:00.0\0MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=768\0";
    const PF_ADD: &[u8] = b"add@/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0SUBSYSTEM=pci\0PCI_CLASS=10802\0PCI_ID=1B36:0010\0PCI_SUBSYS_ID=1AF4:1100\0PCI_SLOT_NAME=0000:01:00.0\0MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=770\0";
    const PF_BIND: &[u8] = b"bind@/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0ACTION=bind\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0SUBSYSTEM=pci\0DRIVER=nvme\0PCI_CLASS=10802\0PCI_ID=1B36:0010\0PCI_SUBSYS_ID=1AF4:1100\0PCI_SLOT_NAME=0000:01:00.0\0MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=778\0";
    const PF_UNBIND: &[u8] = b"unbind@/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0ACTION=unbind\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0SUBSYSTEM=pci\0PCI_CLASS=10802\0PCI_ID=1B36:0010\0PCI_SUBSYS_ID=1AF4:1100\0PCI_SLOT_NAME=0000:01:00.0\0SEQNUM=785\0";
    const VF_ADD: &[u8] = b"add@/devices/pci0000:00/0000:00:01.0/0000:01:00.1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.1\0SUBSYSTEM=pci\0PCI_CLASS=10802\0PCI_ID=1B36:0010\0PCI_SUBSYS_ID=1AF4:1100\0PCI_SLOT_NAME=0000:01:00.1\0MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=794\0";

    #[test]
    fn recorded_pci_events_of_6_12() {
        let pf = addr("0000:01:00.0");
        let cases = [
            (PF_REMOVE, Action::Remove, pf, None, 768),
            (PF_ADD, Action::Add, pf, None, 770),
            (PF_BIND, Action::Bind, pf, Some("nvme"), 778),
            (PF_UNBIND, Action::Unbind, pf, None, 785),
            (VF_ADD, Action::Add, addr("0000:01:00.1"), None, 794),
        ];
        for (bytes, action, a, driver, seqnum) in cases {
            let ev = kernel(bytes);
            assert_eq!(ev.action, action);
            assert_eq!(ev.devpath, format!("/devices/pci0000:00/0000:00:01.0/{a}"));
            assert!(ev.is_pci());
            assert_eq!((ev.pci_slot_name, ev.pci_address()), (Some(a), Some(a)));
            assert_eq!(ev.driver.as_deref(), driver);
            assert_eq!(ev.seqnum, Some(seqnum));
            assert_eq!(ev.var("PCI_ID"), Some("1B36:0010"));
            assert_eq!(ev.to_bytes(), bytes, "round trip of {action}");
        }
        // As recorded, unbind carries no MODALIAS either: do not rely on it.
        assert_eq!(kernel(PF_UNBIND).var("MODALIAS"), None);
    }

    #[test]
    fn a_child_of_a_pci_device_is_not_pci() {
        let ev = kernel(NVME_CHILD_REMOVE);
        assert_eq!(ev.subsystem.as_deref(), Some("nvme"));
        assert!(!ev.is_pci());
        assert_eq!(ev.pci_address(), None);
    }

    /// Recorded with the samples above: the nvme controller below the PF going away.
    const NVME_CHILD_REMOVE: &[u8] = b"remove@/devices/pci0000:00/0000:00:01.0/0000:01:00.0/nvme/nvme0\0ACTION=remove\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0/nvme/nvme0\0SUBSYSTEM=nvme\0MAJOR=244\0MINOR=0\0DEVNAME=nvme0\0NVME_TRTYPE=pcie\0SEQNUM=764\0";

    #[test]
    fn synthetic_change_of_a_char_device() {
        let ev = kernel(NULL_CHANGE);
        assert_eq!(ev.action, Action::Change);
        assert_eq!(ev.devpath, "/devices/virtual/mem/null");
        assert_eq!(ev.subsystem.as_deref(), Some("mem"));
        assert_eq!(ev.seqnum, Some(814));
        assert_eq!(ev.var("DEVMODE"), Some("0666"));
        assert_eq!(
            (ev.is_pci(), ev.pci_address(), ev.driver.as_deref()),
            (false, None, None)
        );
        assert_eq!(ev.to_bytes(), NULL_CHANGE);
    }

    #[test]
    fn udev_messages_are_not_kernel_messages() {
        let mut msg = b"libudev\0\xfe\xed\xca\xfe\x28\0\0\0".to_vec();
        msg.extend_from_slice(b"ACTION=add\0DEVPATH=/devices/x\0");
        assert_eq!(parse_datagram(&msg), Ok(Datagram::Udev));
    }

    #[test]
    fn pci_address_falls_back_to_devpath_for_pci_events_only() {
        let pci = kernel(b"add@/devices/pci0000:00/0000:00:1c.0/0000:01:00.0\0SUBSYSTEM=pci\0");
        assert_eq!(pci.pci_address(), Some(addr("0000:01:00.0")));
        let nvme = kernel(b"add@/devices/pci0000:00/0000:00:01.0/nvme/nvme0\0SUBSYSTEM=nvme\0");
        assert_eq!(nvme.pci_address(), None);
        let root = kernel(b"add@/devices/pci0000:00\0SUBSYSTEM=pci\0");
        assert_eq!(root.pci_address(), None);
    }

    #[test]
    fn unknown_actions_are_kept_and_known_ones_normalised() {
        let ev = kernel(b"frobnicate@/devices/x\0");
        assert_eq!(ev.action, Action::Other("frobnicate".into()));
        let ev = Uevent::from_vars(Action::Other("bind".into()), "/devices/x".into(), vec![]).unwrap();
        assert_eq!(ev.action, Action::Bind);
    }

    #[test]
    fn missing_final_nul_is_tolerated() {
        let ev = kernel(b"remove@/devices/x\0SEQNUM=7");
        assert_eq!((ev.action, ev.seqnum), (Action::Remove, Some(7)));
    }

    #[test]
    fn errors_say_what_is_wrong_and_quote_it() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "uevent header: expected ACTION@DEVPATH in \"\""),
            (
                b"add /devices/x\0",
                "uevent header: expected ACTION@DEVPATH in \"add /devices/x\"",
            ),
            (
                b"@/devices/x\0",
                "uevent header: expected an action of printable ASCII before '@' in \"@/devices/x\"",
            ),
            (
                b"add@devices\0",
                "uevent header: expected a DEVPATH starting with '/' in \"add@devices\"",
            ),
            (
                b"add@/x\0NOEQUALS\0",
                "uevent variable 0: expected KEY=VALUE in \"NOEQUALS\"",
            ),
            (
                b"add@/x\0A=1\0\0",
                "uevent variable 1: expected KEY=VALUE in \"\"",
            ),
            (
                b"add@/x\0=v\0",
                "uevent variable 0: expected a key of ASCII letters, digits and '_' in \"=v\"",
            ),
            (
                b"add@/x\0K=\xff\0",
                "uevent variable 0: expected UTF-8 in \"K=\u{fffd}\"",
            ),
            (
                b"add@/x\0SEQNUM=12a\0",
                "uevent SEQNUM: expected a decimal number in \"12a\"",
            ),
            (
                b"add@/x\0SEQNUM=99999999999999999999\0",
                "uevent SEQNUM: expected a decimal number in \"99999999999999999999\"",
            ),
            (
                b"add@/x\0ACTION=remove\0",
                "uevent ACTION: expected the header's action in \"remove\"",
            ),
            (
                b"add@/x\0DEVPATH=/y\0",
                "uevent DEVPATH: expected the header's DEVPATH in \"/y\"",
            ),
            (
                b"add@/x\0DRIVER=a\0DRIVER=b\0",
                "uevent DRIVER: expected one occurrence only in \"b\"",
            ),
            (b"add@/x\0PCI_SLOT_NAME=01:00.0\0", "uevent PCI_SLOT_NAME"),
        ];
        for (msg, want) in cases {
            let e = parse_datagram(msg).unwrap_err();
            assert_eq!(e.to_string(), *want, "for {}", escape_bytes(msg));
        }
        let e = parse_datagram(b"add@/x\0PCI_SLOT_NAME=01:00.0\0").unwrap_err();
        let src = std::error::Error::source(&e).unwrap().to_string();
        assert!(src.contains("\"01:00.0\""), "{src}");
    }

    #[test]
    fn sizes_are_bounded() {
        let long = vec![b'a'; UEVENT_MSG_MAX + 1];
        assert_eq!(
            parse_datagram(&long),
            Err(UeventError::TooLong {
                len: UEVENT_MSG_MAX + 1,
                max: UEVENT_MSG_MAX
            })
        );
        let many = format!("add@/x\0{}", "K=v\0".repeat(UEVENT_VARS_MAX + 1));
        assert_eq!(
            parse_datagram(many.as_bytes()),
            Err(UeventError::TooManyVars { max: UEVENT_VARS_MAX })
        );
        let enough = format!("add@/x\0{}", "K=v\0".repeat(UEVENT_VARS_MAX));
        assert_eq!(kernel(enough.as_bytes()).vars.len(), UEVENT_VARS_MAX);
    }

    #[test]
    fn escape_bytes_is_rust_string_syntax() {
        assert_eq!(
            escape_bytes(b"a@/b\0K=\"\\\x01\xff"),
            "a@/b\\0K=\\\"\\\\\\x01\\xff"
        );
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Add),
            Just(Action::Remove),
            Just(Action::Change),
            Just(Action::Move),
            Just(Action::Online),
            Just(Action::Offline),
            Just(Action::Bind),
            Just(Action::Unbind),
            "[a-z!-?A-_]{1,12}".prop_map(|s| Action::from_name(&s)),
        ]
    }

    fn var() -> impl Strategy<Value = (String, String)> {
        let key = prop_oneof![
            Just("SUBSYSTEM".to_string()),
            Just("DRIVER".to_string()),
            "[A-Za-z0-9_]{1,16}",
        ];
        (key, "[^\0]{0,40}")
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_datagram(&bytes);
        }

        #[test]
        fn parse_never_panics_on_near_messages(
            head in "(add|remove|bind|@|/|[a-z]){0,8}",
            parts in prop::collection::vec(
                "(ACTION|DEVPATH|SUBSYSTEM|SEQNUM|PCI_SLOT_NAME|DRIVER|=|pci|0000:0[0-9]:00\\.[0-7]|[0-9]{1,22}|/|@|\u{e9})*",
                0..8),
        ) {
            let msg = format!("{head}\0{}", parts.join("\0"));
            if let Ok(Datagram::Kernel(ev)) = parse_datagram(msg.as_bytes()) {
                let _ = (ev.pci_address(), ev.is_pci());
            }
        }

        #[test]
        fn built_events_round_trip(
            action in action(),
            devpath in "/[^\0]{0,60}",
            vars in prop::collection::vec(var(), 0..10),
            seqnum in prop::option::of(any::<u64>()),
            slot in prop::option::of((any::<u16>(), any::<u8>(), 0u8..32, 0u8..8)),
        ) {
            let mut vars: Vec<(String, String)> = vars;
            // Interpreted keys at most once, as the kernel writes them.
            let mut seen = std::collections::HashSet::new();
            vars.retain(|(k, _)| !matches!(k.as_str(), "SUBSYSTEM" | "DRIVER") || seen.insert(k.clone()));
            vars.retain(|(k, _)| !matches!(k.as_str(), "ACTION" | "DEVPATH" | "SEQNUM" | "PCI_SLOT_NAME"));
            vars.insert(0, ("ACTION".into(), action.as_str().into()));
            vars.insert(1, ("DEVPATH".into(), devpath.clone()));
            if let Some(n) = seqnum {
                vars.push(("SEQNUM".into(), n.to_string()));
            }
            if let Some((d, b, dev, f)) = slot {
                vars.push(("PCI_SLOT_NAME".into(), format!("{d:04x}:{b:02x}:{dev:02x}.{f:x}")));
            }
            let ev = Uevent::from_vars(action, devpath, vars).unwrap();
            prop_assert_eq!(ev.seqnum, seqnum);
            prop_assert_eq!(ev.pci_slot_name.is_some(), slot.is_some());
            let back = parse_datagram(&ev.to_bytes()).unwrap();
            prop_assert_eq!(back, Datagram::Kernel(ev));
        }
    }
}
