//! DPDK's devargs syntax: allow and block lists with per-device arguments.
//!
//! What DPDK and SPDK users type after `-a` (allow) and `-b` (block):
//!
//! - `-a 0000:02:00.0,key=val,flag`: the device, then arguments separated by commas; a key
//!   without `=` is a flag. `-a 03:00.0` means domain 0, and `pci:` before the address
//!   (DPDK's bus-name prefix) is accepted and dropped.
//! - `-b 0000:04:00.0`: an address only. DPDK silently ignores arguments after a blocked
//!   address; here they are an error, since they are a typo or a misunderstanding.
//!
//! The rules where DPDK is loose or silent:
//!
//! - A key is letters, digits, `_`, `-` and `.`; it may not be empty or repeated.
//! - A value follows the first `=` and may itself contain `=` (`opt=a=b` has the value
//!   `a=b`). It may not be empty (`key=` is an error: write `key` for a flag) and may not
//!   contain whitespace or control characters. A comma ends it unless it is inside square
//!   brackets, DPDK's list syntax (`representor=[0,2-3]`); brackets must balance.
//! - Keys are not checked against any list here: the driver that gets the device knows its
//!   keys and calls [`DevArg::reject_unknown`].
//!
//! [`DevArg`]'s `Display` writes the canonical form, which parses back to the same value.
//!
//! ```
//! use pcibus::bus::devargs::{DevArg, Selection};
//!
//! let d = DevArg::parse_allow("pci:2:0.0,mode=poll,list=[0,2-3],v").unwrap();
//! assert_eq!(d.to_string(), "0000:02:00.0,mode=poll,list=[0,2-3],v");
//! assert_eq!(d.get("mode"), Some(Some("poll")));
//! assert_eq!(d.get("v"), Some(None), "a flag");
//! assert_eq!(d.get("queues"), None);
//! let e = d.reject_unknown(&["mode", "v"]).unwrap_err();
//! assert_eq!(
//!     e.to_string(),
//!     "devargs \"0000:02:00.0,mode=poll,list=[0,2-3],v\" at byte 23: \
//!      unknown key \"list\" (known keys: mode, v)"
//! );
//!
//! let s = Selection::from_args([("-a", "02:00.0,mode=poll"), ("-b", "0000:04:00.0")]).unwrap();
//! assert!(s.admits("0000:02:00.0".parse().unwrap()));
//! assert!(!s.admits("0000:03:00.0".parse().unwrap()), "an allow list admits only its devices");
//! ```

use std::fmt;

use crate::addr::{AddressError, PciAddress};
use crate::error::shorten;

/// Why a devargs text (or a selection) was refused.
///
/// `text` quotes the offending devargs (shortened), `position` is the byte offset in it
/// where the problem starts, and `kind` says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("devargs \"{text}\" at byte {position}: {kind}")]
pub struct DevargsError {
    /// The devargs text, shortened to [`crate::error::QUOTE_MAX`] characters.
    pub text: String,
    /// Byte offset of the problem in the full (unshortened) text.
    pub position: usize,
    /// What is wrong.
    pub kind: DevargsErrorKind,
}

/// What is wrong with a devargs text or a selection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DevargsErrorKind {
    /// The address part is not a PCI address.
    #[error("not a PCI address: {}", .0.reason)]
    Address(AddressError),
    /// Two commas in a row, or a trailing comma.
    #[error("empty argument (expected key or key=value)")]
    EmptyArgument,
    /// `=value` with no key.
    #[error("empty key before '='")]
    EmptyKey,
    /// A key with a character other than letters, digits, `_`, `-`, `.`.
    #[error("invalid key {key:?} (keys are letters, digits, '_', '-', '.')")]
    BadKey {
        /// The key, shortened.
        key: String,
    },
    /// `key=` with nothing after the `=`.
    #[error("empty value for key {key:?} (write just the key for a flag)")]
    EmptyValue {
        /// The key.
        key: String,
    },
    /// A value with whitespace or control characters, or unbalanced brackets.
    #[error("invalid value for key {key:?}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with the value.
        reason: &'static str,
    },
    /// A key given twice for one device.
    #[error("key {key:?} given twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// Arguments after a blocked address.
    #[error("a blocked device takes no arguments (expected only an address after -b)")]
    ArgumentsOnBlock,
    /// A key the driver does not know ([`DevArg::reject_unknown`]).
    #[error("unknown key {key:?} ({})", known_list(.known))]
    UnknownKey {
        /// The unknown key.
        key: String,
        /// The keys the driver knows.
        known: Vec<String>,
    },
    /// An address in both the allow and the block list.
    #[error("{address} is both allowed and blocked")]
    AllowedAndBlocked {
        /// The address.
        address: PciAddress,
    },
    /// An address allowed twice (its arguments could disagree).
    #[error("{address} is allowed twice (give all its arguments in one -a)")]
    AllowedTwice {
        /// The address.
        address: PciAddress,
    },
    /// An option other than `-a`/`--allow`/`-b`/`--block` in [`Selection::from_args`].
    #[error("unknown option (expected -a, --allow, -b or --block)")]
    UnknownOption,
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "this driver takes no arguments".to_owned()
    } else {
        format!("known keys: {}", known.join(", "))
    }
}

impl DevargsError {
    fn new(text: &str, position: usize, kind: DevargsErrorKind) -> Self {
        DevargsError {
            text: shorten(text.as_bytes()),
            position,
            kind,
        }
    }
}

/// One allowed device and its arguments, as given after `-a`.
///
/// Always valid: its keys and values are ones the parser accepts, so its `Display` (the
/// canonical form, `0000:02:00.0,key=val,flag`) parses back to the same value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DevArg {
    address: PciAddress,
    args: Vec<(String, Option<String>)>,
}

impl DevArg {
    /// A device with no arguments.
    pub fn new(address: PciAddress) -> Self {
        DevArg {
            address,
            args: Vec::new(),
        }
    }

    /// Parses what follows `-a`: `[pci:]ADDRESS[,key[=value]]...`.
    pub fn parse_allow(text: &str) -> Result<Self, DevargsError> {
        let err = |position, kind| DevargsError::new(text, position, kind);
        let start = if text.starts_with("pci:") { 4 } else { 0 };
        let body = &text[start..];
        let (addr_text, rest) = match body.find(',') {
            Some(i) => (&body[..i], Some((start + i + 1, &body[i + 1..]))),
            None => (body, None),
        };
        let address =
            PciAddress::parse_lenient(addr_text).map_err(|e| err(start, DevargsErrorKind::Address(e)))?;
        let mut devarg = DevArg::new(address);
        let Some((mut offset, rest)) = rest else {
            return Ok(devarg);
        };
        for item in split_items(rest) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            if item.is_empty() {
                return Err(err(offset, DevargsErrorKind::EmptyArgument));
            }
            devarg
                .push_arg(key, value)
                .map_err(|(kind, at)| err(offset + at, kind))?;
            offset += item.len() + 1;
        }
        Ok(devarg)
    }

    /// Parses what follows `-b`: `[pci:]ADDRESS`, with no arguments.
    pub fn parse_block(text: &str) -> Result<PciAddress, DevargsError> {
        let start = if text.starts_with("pci:") { 4 } else { 0 };
        if let Some(i) = text[start..].find(',') {
            return Err(DevargsError::new(
                text,
                start + i,
                DevargsErrorKind::ArgumentsOnBlock,
            ));
        }
        PciAddress::parse_lenient(&text[start..])
            .map_err(|e| DevargsError::new(text, start, DevargsErrorKind::Address(e)))
    }

    /// Adds an argument (`value` `None` for a flag), checked by the parser's rules.
    ///
    /// On error, returns the problem and its byte offset within `key[=value]`.
    fn push_arg(&mut self, key: &str, value: Option<&str>) -> Result<(), (DevargsErrorKind, usize)> {
        check_key(key).map_err(|k| (k, 0))?;
        if let Some(v) = value {
            check_value(key, v).map_err(|(k, p)| (k, key.len() + 1 + p))?;
        }
        if self.args.iter().any(|(k, _)| k == key) {
            return Err((DevargsErrorKind::DuplicateKey { key: key.to_owned() }, 0));
        }
        self.args.push((key.to_owned(), value.map(str::to_owned)));
        Ok(())
    }

    /// This device with one more argument (`value` `None` for a flag), checked by the
    /// parser's rules: the error quotes the canonical form with the new argument.
    pub fn with_arg(mut self, key: &str, value: Option<&str>) -> Result<Self, DevargsError> {
        let position = self.to_string().len() + 1;
        self.push_arg(key, value).map_err(|(kind, p)| {
            let mut text = self.to_string();
            text.push(',');
            text.push_str(key);
            if let Some(v) = value {
                text.push('=');
                text.push_str(v);
            }
            DevargsError::new(&text, position + p, kind)
        })?;
        Ok(self)
    }

    /// The device's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The arguments in the order given: `(key, None)` for a flag.
    pub fn args(&self) -> impl ExactSizeIterator<Item = (&str, Option<&str>)> + '_ {
        self.args.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// The argument `key`: `None` when absent, `Some(None)` for a flag, `Some(Some(v))` for
    /// `key=v`.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }

    /// For drivers: an error naming the first key not in `known`, and the known ones.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), DevargsError> {
        let mut position = self.address.to_string().len() + 1;
        for (key, value) in &self.args {
            if !known.contains(&key.as_str()) {
                return Err(DevargsError::new(
                    &self.to_string(),
                    position,
                    DevargsErrorKind::UnknownKey {
                        key: key.clone(),
                        known: known.iter().map(|k| (*k).to_owned()).collect(),
                    },
                ));
            }
            position += key.len() + value.as_ref().map_or(0, |v| v.len() + 1) + 1;
        }
        Ok(())
    }
}

impl std::str::FromStr for DevArg {
    type Err = DevargsError;
    /// See [`DevArg::parse_allow`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_allow(s)
    }
}

impl fmt::Display for DevArg {
    /// The canonical form: `0000:02:00.0,key=val,flag`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        for (k, v) in &self.args {
            match v {
                Some(v) => write!(f, ",{k}={v}")?,
                None => write!(f, ",{k}")?,
            }
        }
        Ok(())
    }
}

/// Splits the arguments at commas outside square brackets.
fn split_items(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'[' => depth += 1,
            // An unmatched ']' is reported by check_value, with its key.
            b']' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

fn check_key(key: &str) -> Result<(), DevargsErrorKind> {
    if key.is_empty() {
        return Err(DevargsErrorKind::EmptyKey);
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(DevargsErrorKind::BadKey {
            key: shorten(key.as_bytes()),
        });
    }
    Ok(())
}

/// Checks a value; on error, the byte offset within it.
fn check_value(key: &str, value: &str) -> Result<(), (DevargsErrorKind, usize)> {
    let bad = |reason, at| {
        Err((
            DevargsErrorKind::BadValue {
                key: key.to_owned(),
                reason,
            },
            at,
        ))
    };
    if value.is_empty() {
        return Err((DevargsErrorKind::EmptyValue { key: key.to_owned() }, 0));
    }
    let mut depth = 0usize;
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' if depth == 0 => return bad("']' without '['", i),
            ']' => depth -= 1,
            ',' if depth == 0 => return bad("',' outside brackets", i),
            c if c.is_whitespace() || c.is_control() => {
                return bad("whitespace or control character", i);
            }
            _ => {}
        }
    }
    if depth > 0 {
        return bad("'[' without ']'", value.len());
    }
    Ok(())
}

/// Which devices a bus takes: DPDK's allow list (`-a`) and block list (`-b`).
///
/// An empty allow list admits every device not blocked; a non-empty one admits only its
/// devices. An address both allowed and blocked, or allowed twice, is refused when the
/// selection is built; an address blocked twice is harmless and kept once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    allow: Vec<DevArg>,
    block: Vec<PciAddress>,
}

impl Selection {
    /// Admits every device.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selection from parsed lists; see the type's rules.
    pub fn new(allow: Vec<DevArg>, mut block: Vec<PciAddress>) -> Result<Self, DevargsError> {
        block.sort_unstable();
        block.dedup();
        for (i, d) in allow.iter().enumerate() {
            let address = d.address;
            if allow[..i].iter().any(|e| e.address == address) {
                return Err(DevargsError::new(
                    &d.to_string(),
                    0,
                    DevargsErrorKind::AllowedTwice { address },
                ));
            }
            if block.binary_search(&address).is_ok() {
                return Err(DevargsError::new(
                    &address.to_string(),
                    0,
                    DevargsErrorKind::AllowedAndBlocked { address },
                ));
            }
        }
        Ok(Selection { allow, block })
    }

    /// A selection from command-line pairs `(option, value)`: `-a`/`--allow` with
    /// [`DevArg::parse_allow`], `-b`/`--block` with [`DevArg::parse_block`].
    pub fn from_args<I, O, V>(args: I) -> Result<Self, DevargsError>
    where
        I: IntoIterator<Item = (O, V)>,
        O: AsRef<str>,
        V: AsRef<str>,
    {
        let (mut allow, mut block) = (Vec::new(), Vec::new());
        for (option, value) in args {
            let value = value.as_ref();
            match option.as_ref() {
                "-a" | "--allow" => allow.push(DevArg::parse_allow(value)?),
                "-b" | "--block" => block.push(DevArg::parse_block(value)?),
                other => return Err(DevargsError::new(other, 0, DevargsErrorKind::UnknownOption)),
            }
        }
        Self::new(allow, block)
    }

    /// Admits one more device, with its arguments: a device the bus learns of while it
    /// runs (a VF it created, a device hot-added by request), as DPDK's
    /// `rte_dev_probe` adds a devargs. A selection that admits every device not blocked
    /// stays so (the device is admitted already, its arguments are dropped). A device
    /// already on the allow list or blocked is refused, as in [`Selection::new`].
    pub fn allow(&mut self, devarg: DevArg) -> Result<(), DevargsError> {
        let address = devarg.address;
        if self.block.binary_search(&address).is_ok() {
            return Err(DevargsError::new(
                &address.to_string(),
                0,
                DevargsErrorKind::AllowedAndBlocked { address },
            ));
        }
        if self.allow.is_empty() {
            return Ok(());
        }
        if self.devarg(address).is_some() {
            return Err(DevargsError::new(
                &devarg.to_string(),
                0,
                DevargsErrorKind::AllowedTwice { address },
            ));
        }
        self.allow.push(devarg);
        Ok(())
    }

    /// The allowed devices, in the order given.
    pub fn allowed(&self) -> &[DevArg] {
        &self.allow
    }

    /// The blocked addresses, in address order.
    pub fn blocked(&self) -> &[PciAddress] {
        &self.block
    }

    /// Whether the bus may take the device at `address`.
    pub fn admits(&self, address: PciAddress) -> bool {
        if self.allow.is_empty() {
            self.block.binary_search(&address).is_err()
        } else {
            self.devarg(address).is_some()
        }
    }

    /// The allow-list entry of `address` (its arguments), if it has one.
    pub fn devarg(&self, address: PciAddress) -> Option<&DevArg> {
        self.allow.iter().find(|d| d.address == address)
    }
}

impl fmt::Display for Selection {
    /// As command-line options: `-a 0000:02:00.0,k=v -b 0000:04:00.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for d in &self.allow {
            write!(f, "{sep}-a {d}")?;
            sep = " ";
        }
        for b in &self.block {
            write!(f, "{sep}-b {b}")?;
            sep = " ";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn kind(text: &str) -> (usize, DevargsErrorKind) {
        let e = DevArg::parse_allow(text).unwrap_err();
        (e.position, e.kind)
    }

    #[test]
    fn allow_forms() {
        let d = DevArg::parse_allow("0000:02:00.0,key=val,flag").unwrap();
        assert_eq!(d.address(), addr("0000:02:00.0"));
        let args: Vec<_> = d.args().collect();
        assert_eq!(args, [("key", Some("val")), ("flag", None)]);
        assert_eq!(d.to_string(), "0000:02:00.0,key=val,flag");

        for same in ["03:00.0", "pci:03:00.0", "0000:03:00.0", "pci:0:3:0.0", "3:0.0"] {
            assert_eq!(
                DevArg::parse_allow(same).unwrap(),
                DevArg::new(addr("0000:03:00.0")),
                "{same}"
            );
        }
        assert_eq!(
            DevArg::parse_allow("10000:e1:00.0,x").unwrap().to_string(),
            "10000:e1:00.0,x"
        );
    }

    #[test]
    fn values_may_contain_equals_and_bracketed_lists() {
        let d = DevArg::parse_allow("1:0.0,opt=a=b,representor=[0,2-3],pf=[[1,2],[3]],x").unwrap();
        assert_eq!(d.get("opt"), Some(Some("a=b")));
        assert_eq!(d.get("representor"), Some(Some("[0,2-3]")));
        assert_eq!(d.get("pf"), Some(Some("[[1,2],[3]]")));
        assert_eq!(d.get("x"), Some(None));
        assert_eq!(d.get("y"), None);
    }

    #[test]
    fn errors_name_the_text_position_and_expectation() {
        let e = DevArg::parse_allow("0000:02:00.0,a=1,a").unwrap_err();
        assert_eq!(
            e.to_string(),
            "devargs \"0000:02:00.0,a=1,a\" at byte 17: key \"a\" given twice"
        );
        assert_eq!(kind("02:00.0,,a"), (8, DevargsErrorKind::EmptyArgument));
        assert_eq!(kind("02:00.0,a,"), (10, DevargsErrorKind::EmptyArgument));
        assert_eq!(kind("02:00.0,=v"), (8, DevargsErrorKind::EmptyKey));
        assert_eq!(
            kind("02:00.0,mode="),
            (13, DevargsErrorKind::EmptyValue { key: "mode".into() })
        );
        assert_eq!(
            kind("02:00.0,a b=1"),
            (8, DevargsErrorKind::BadKey { key: "a b".into() })
        );
        assert!(matches!(
            kind("02:00.0,k=[1,2"),
            (14, DevargsErrorKind::BadValue { .. })
        ));
        assert!(matches!(
            kind("02:00.0,k=1],j"),
            (11, DevargsErrorKind::BadValue { .. })
        ));
        assert!(matches!(
            kind("02:00.0,k=a\tb"),
            (11, DevargsErrorKind::BadValue { .. })
        ));
        let e = DevArg::parse_allow("pci:02:ab.0,k").unwrap_err();
        assert_eq!(e.position, 4);
        assert_eq!(
            e.to_string(),
            "devargs \"pci:02:ab.0,k\" at byte 4: not a PCI address: device number above 0x1f"
        );
        for bad in ["", "pci:", ",k", "02:00", "0000:02:00.0 x", "eth0"] {
            assert!(matches!(kind(bad).1, DevargsErrorKind::Address(_)), "{bad:?}");
        }
    }

    #[test]
    fn block_takes_an_address_only() {
        assert_eq!(DevArg::parse_block("pci:4:0.0").unwrap(), addr("0000:04:00.0"));
        let e = DevArg::parse_block("0000:04:00.0,k=v").unwrap_err();
        assert_eq!((e.position, e.kind), (12, DevargsErrorKind::ArgumentsOnBlock));
    }

    #[test]
    fn reject_unknown_names_the_key_and_the_known_ones() {
        let d = DevArg::parse_allow("02:00.0,mode=poll,qd=64").unwrap();
        assert!(d.reject_unknown(&["qd", "mode", "other"]).is_ok());
        let e = d.reject_unknown(&["mode"]).unwrap_err();
        assert_eq!(e.position, "0000:02:00.0,mode=poll,".len());
        assert_eq!(
            e.kind,
            DevargsErrorKind::UnknownKey {
                key: "qd".into(),
                known: vec!["mode".into()]
            }
        );
        let e = d.reject_unknown(&[]).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("unknown key \"mode\" (this driver takes no arguments)")
        );
    }

    #[test]
    fn with_arg_checks_like_the_parser() {
        let d = DevArg::new(addr("02:00.0")).with_arg("k", Some("v")).unwrap();
        assert_eq!(d.to_string(), "0000:02:00.0,k=v");
        let e = d.clone().with_arg("k", None).unwrap_err();
        assert_eq!(e.kind, DevargsErrorKind::DuplicateKey { key: "k".into() });
        let e = d.with_arg("j", Some("a,b")).unwrap_err();
        assert_eq!(e.text, "0000:02:00.0,k=v,j=a,b");
        assert_eq!(e.position, 20);
    }

    #[test]
    fn selection_rules() {
        let all = Selection::everything();
        assert!(all.admits(addr("0:0.0")));

        let s = Selection::from_args([("-b", "04:00.0"), ("--block", "pci:0000:04:00.0")]).unwrap();
        assert_eq!(s.blocked(), [addr("04:00.0")]);
        assert!(!s.admits(addr("04:00.0")) && s.admits(addr("05:00.0")));

        let s = Selection::from_args([("-a", "02:00.0,k=v"), ("--allow", "03:00.0")]).unwrap();
        assert!(s.admits(addr("02:00.0")) && s.admits(addr("03:00.0")) && !s.admits(addr("04:00.0")));
        assert_eq!(s.devarg(addr("02:00.0")).unwrap().get("k"), Some(Some("v")));
        assert_eq!(s.to_string(), "-a 0000:02:00.0,k=v -a 0000:03:00.0");

        let e = Selection::from_args([("-a", "02:00.0"), ("-b", "0000:02:00.0")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "devargs \"0000:02:00.0\" at byte 0: 0000:02:00.0 is both allowed and blocked"
        );
        let e = Selection::from_args([("-a", "02:00.0,x"), ("-a", "2:0.0")]).unwrap_err();
        assert_eq!(
            e.kind,
            DevargsErrorKind::AllowedTwice {
                address: addr("02:00.0")
            }
        );
        let e = Selection::from_args([("-w", "02:00.0")]).unwrap_err();
        assert_eq!((e.text.as_str(), e.kind), ("-w", DevargsErrorKind::UnknownOption));
    }

    #[test]
    fn long_text_is_shortened_in_errors() {
        let text = format!("02:00.0,{}=1,a,a", "k".repeat(100));
        let e = DevArg::parse_allow(&text).unwrap_err();
        assert_eq!(e.position, text.len() - 1);
        assert!(e.text.chars().count() <= crate::error::QUOTE_MAX + 1);
    }

    fn any_address() -> impl Strategy<Value = PciAddress> {
        (any::<u32>(), any::<u8>(), 0u8..32, 0u8..8)
            .prop_map(|(d, b, s, f)| PciAddress::new(d, b, s, f).unwrap())
    }

    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9=:._/+-]{1,10}",
            "[a-z0-9]{0,3}\\[[0-9,-]{0,6}\\][a-z]{0,2}",
            "\\[\\[[0-9,]{0,3}\\],\\[[0-9]{0,2}\\]\\]",
            "[é€a=]{1,4}",
        ]
    }

    fn any_devarg() -> impl Strategy<Value = DevArg> {
        (
            any_address(),
            proptest::collection::vec(("[a-zA-Z0-9_.-]{1,8}", proptest::option::of(any_value())), 0..6),
        )
            .prop_map(|(address, args)| {
                let mut d = DevArg::new(address);
                for (k, v) in args {
                    // Duplicate keys are refused; keep the first.
                    let _ = d.push_arg(&k, v.as_deref());
                }
                d
            })
    }

    proptest! {
        #[test]
        fn display_round_trips(d in any_devarg()) {
            let text = d.to_string();
            prop_assert_eq!(DevArg::parse_allow(&text).unwrap(), d.clone());
            prop_assert_eq!(DevArg::parse_allow(&format!("pci:{text}")).unwrap(), d.clone());
            prop_assert_eq!(d.reject_unknown(&[]).is_err(), d.args().next().is_some());
        }

        #[test]
        fn reject_unknown_positions_point_at_the_key(d in any_devarg(), skip in 0usize..6) {
            let known: Vec<&str> = d.args().map(|(k, _)| k).take(skip).collect();
            if let Err(e) = d.reject_unknown(&known) {
                let DevargsErrorKind::UnknownKey { key, .. } = &e.kind else {
                    panic!("{e}");
                };
                let text = d.to_string();
                prop_assert!(text[e.position..].starts_with(key.as_str()));
                prop_assert_eq!(&text[e.position - 1..e.position], ",");
                prop_assert!(!known.contains(&key.as_str()));
            }
        }

        #[test]
        fn never_panics(s in ".{0,60}") {
            if let Ok(d) = DevArg::parse_allow(&s) {
                prop_assert_eq!(DevArg::parse_allow(&d.to_string()).unwrap(), d);
            }
            let _ = DevArg::parse_block(&s);
            let _ = Selection::from_args([("-a", s.as_str())]);
        }

        #[test]
        fn never_panics_near_valid(s in "(pci:)?[0-9a-f:.]{0,12}[,=\\[\\]a-z0-9 ]{0,20}") {
            match DevArg::parse_allow(&s) {
                Ok(d) => prop_assert_eq!(DevArg::parse_allow(&d.to_string()).unwrap(), d),
                Err(e) => prop_assert!(e.position <= s.len()),
            }
            if let Ok(a) = DevArg::parse_block(&s) {
                prop_assert_eq!(DevArg::parse_block(&a.to_string()).unwrap(), a);
            }
        }

        #[test]
        fn allow_admits_one_more_or_refuses(
            allow in proptest::collection::vec(any_address(), 0..4),
            block in proptest::collection::vec(any_address(), 0..4),
            more in any_address(),
            probe in any_address(),
        ) {
            let allow: Vec<DevArg> = allow.into_iter().map(DevArg::new).collect();
            let Ok(mut s) = Selection::new(allow.clone(), block.clone()) else {
                return Ok(());
            };
            let before = s.clone();
            match s.allow(DevArg::new(more)) {
                Ok(()) => {
                    prop_assert!(s.admits(more));
                    // Nothing else changed: every other device is admitted as before.
                    if probe != more {
                        prop_assert_eq!(s.admits(probe), before.admits(probe));
                    }
                }
                Err(e) => {
                    prop_assert_eq!(&s, &before);
                    let blocked = block.contains(&more);
                    let twice = allow.iter().any(|d| d.address() == more);
                    prop_assert!(blocked || twice, "{e}");
                }
            }
        }

        #[test]
        fn admits_follows_the_lists(
            allow in proptest::collection::vec(any_address(), 0..4),
            block in proptest::collection::vec(any_address(), 0..4),
            probe in any_address(),
        ) {
            let allow: Vec<DevArg> = allow.into_iter().map(DevArg::new).collect();
            match Selection::new(allow.clone(), block.clone()) {
                Ok(s) => {
                    let allowed = allow.iter().any(|d| d.address() == probe);
                    let expected = if allow.is_empty() { !block.contains(&probe) } else { allowed };
                    prop_assert_eq!(s.admits(probe), expected);
                    // Display as options, and back.
                    let text = s.to_string();
                    let words: Vec<&str> = text.split_whitespace().collect();
                    let pairs = words.chunks(2).map(|p| (p[0], p[1]));
                    prop_assert_eq!(Selection::from_args(pairs).unwrap(), s);
                }
                Err(e) => {
                    let refused = matches!(
                        e.kind,
                        DevargsErrorKind::AllowedAndBlocked { .. } | DevargsErrorKind::AllowedTwice { .. }
                    );
                    prop_assert!(refused, "{}", e);
                }
            }
        }
    }
}
