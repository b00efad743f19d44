//! Errors of the parsers, shared by every sysfs attribute.

use std::fmt;

/// The longest quote of offending text an error carries, in characters.
pub const QUOTE_MAX: usize = 40;

/// Quotes bytes for an error message: lossy UTF-8, control characters escaped, cut to
/// [`QUOTE_MAX`] characters with a trailing `…` when longer.
pub fn shorten(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == QUOTE_MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// An error and its sources on one line (`what: why: deeper cause`), for a message that
/// quotes an error which is not its own source.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A sysfs attribute (or a part of one) could not be parsed.
///
/// The message names the attribute and quotes the offending text, shortened:
/// `resource: line 3: expected three hex numbers in "0x00 zz"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{attribute}: {kind} in \"{text}\"")]
pub struct ParseError {
    /// The attribute, as its sysfs file is named (`vendor`, `resource`, `config`, ...).
    pub attribute: &'static str,
    /// What is wrong.
    pub kind: ParseErrorKind,
    /// The offending text, shortened by [`shorten`].
    pub text: String,
}

impl ParseError {
    /// Builds an error quoting `bytes` (shortened).
    pub fn new(attribute: &'static str, kind: ParseErrorKind, bytes: &[u8]) -> Self {
        ParseError {
            attribute,
            kind,
            text: shorten(bytes),
        }
    }
}

/// What is wrong with an attribute's text.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// The attribute is empty (or only whitespace).
    Empty,
    /// Not a number of the expected form (`expected` says which).
    Invalid {
        /// What was expected, e.g. "a hex number with 0x prefix".
        expected: &'static str,
    },
    /// A number too large for the field.
    OutOfRange {
        /// The largest value allowed.
        max: u64,
    },
    /// A problem on one line of a multi-line attribute (1-based).
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        expected: &'static str,
    },
    /// Binary data shorter than needed.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A structure inside the data is inconsistent (e.g. a capability pointer out of range).
    Malformed {
        /// What is inconsistent.
        what: &'static str,
    },
}

impl fmt::Display for ParseErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseErrorKind::Empty => write!(f, "empty"),
            ParseErrorKind::Invalid { expected } => write!(f, "expected {expected}"),
            ParseErrorKind::OutOfRange { max } => write!(f, "value above {max:#x}"),
            ParseErrorKind::Line { line, expected } => write!(f, "line {line}: expected {expected}"),
            ParseErrorKind::Truncated { needed, got } => write!(f, "truncated: {got} of {needed} bytes"),
            ParseErrorKind::Malformed { what } => write!(f, "malformed: {what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_escapes_and_cuts() {
        assert_eq!(shorten(b"0x8086\n"), "0x8086\\n");
        assert_eq!(shorten(&[0xff, b'a']), "\u{fffd}a");
        let long = "x".repeat(100);
        assert_eq!(shorten(long.as_bytes()).chars().count(), QUOTE_MAX + 1);
    }

    #[test]
    fn message_names_attribute_and_text() {
        let e = ParseError::new(
            "vendor",
            ParseErrorKind::Invalid {
                expected: "a hex number",
            },
            b"zz\n",
        );
        assert_eq!(e.to_string(), "vendor: expected a hex number in \"zz\\n\"");
    }
}
