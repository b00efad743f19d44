//! Usage errors (exit status 2) found after clap parsed the command line, and the value
//! parsers that keep clap's own usage errors short and in range.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

use pcibus::PciAddress;
use pcibus::error::shorten;

/// A command line that is wrong in a way clap cannot see (contradicting devargs, a bad
/// driver name): `main` exits 2 for it, printing the wrapped error and its sources.
#[derive(Debug)]
pub struct UsageError(pub Box<dyn std::error::Error>);

impl UsageError {
    /// Wraps any error (or message) as a usage error.
    pub fn new(e: impl Into<Box<dyn std::error::Error>>) -> Self {
        UsageError(e.into())
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// Transparent: the message is the wrapped error's, its sources follow as usual.
impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

// A clap usage error that quotes the argument by name and never the whole value.
fn invalid(cmd: &clap::Command, arg: Option<&clap::Arg>, message: impl fmt::Display) -> clap::Error {
    let name = arg.map_or_else(|| "value".to_owned(), |a| a.to_string());
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!("invalid value for '{name}': {message}\n"),
    )
    .with_cmd(cmd)
}

/// Parses a PCI address leniently, like `PciAddress::from_str`, but its error quotes the
/// text shortened (clap's own error would echo all of it, however long).
#[derive(Clone, Copy)]
pub struct AddressParser;

impl TypedValueParser for AddressParser {
    type Value = PciAddress;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<PciAddress, clap::Error> {
        let Some(text) = value.to_str() else {
            return Err(invalid(
                cmd,
                arg,
                format_args!("\"{}\" is not UTF-8", shorten(value.as_encoded_bytes())),
            ));
        };
        text.parse().map_err(|e| invalid(cmd, arg, e))
    }
}

/// Parses an nvme command's device argument, devargs text (`01:00.0,io_queues=2`), as
/// `-a` takes it: a bad one is a usage error, found before anything is opened. The
/// message is the devargs error's, which quotes the text shortened.
#[derive(Clone, Copy)]
pub struct DevArgParser;

impl TypedValueParser for DevArgParser {
    type Value = pcibus::bus::devargs::DevArg;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let Some(text) = value.to_str() else {
            return Err(invalid(
                cmd,
                arg,
                format_args!("\"{}\" is not UTF-8", shorten(value.as_encoded_bytes())),
            ));
        };
        pcibus::bus::devargs::DevArg::parse_allow(text).map_err(|e| invalid(cmd, arg, e))
    }
}

/// The longest deadline `--timeout` takes: a day (a longer one is a typo, and would
/// overflow `Instant` arithmetic on some systems).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses a deadline: plain numbers are milliseconds (as before), or a duration with
/// units (`500ms`, `2s`, `1m 30s`). Zero and more than [`MAX_TIMEOUT`] are refused: no
/// read starts within no time at all.
#[derive(Clone, Copy)]
pub struct TimeoutParser;

impl TimeoutParser {
    /// The parse without clap: the error says what is wrong with `text`.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            // Plain milliseconds; digits only, so the only failure is overflow.
            t.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                format!(
                    "\"{}\" is too large (at most {} ms)",
                    shorten(t.as_bytes()),
                    MAX_TIMEOUT.as_millis()
                )
            })?
        } else {
            humantime::parse_duration(t).map_err(|e| {
                format!(
                    "\"{}\": {e} (a number of milliseconds, or a duration such as 500ms or 2s)",
                    shorten(t.as_bytes())
                )
            })?
        };
        if d.is_zero() {
            return Err("the deadline must be above 0 (e.g. 1000 for 1 s, or 500ms)".to_owned());
        }
        if d > MAX_TIMEOUT {
            return Err(format!(
                "\"{}\" is too long (at most {} ms, a day)",
                shorten(t.as_bytes()),
                MAX_TIMEOUT.as_millis()
            ));
        }
        Ok(d)
    }
}

impl TypedValueParser for TimeoutParser {
    type Value = Duration;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Duration, clap::Error> {
        let text = value.to_str().ok_or_else(|| invalid(cmd, arg, "not UTF-8"))?;
        Self::parse(text).map_err(|m| invalid(cmd, arg, m))
    }
}

/// The most walker threads `--threads` takes (a scan gains nothing past a few).
pub const MAX_THREADS: usize = 64;

/// `--threads`: 1 to [`MAX_THREADS`].
pub fn threads(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n @ 1..=MAX_THREADS) => Ok(n),
        Ok(_) | Err(_) => Err(format!("expected a number from 1 to {MAX_THREADS}")),
    }
}

/// Standard output that says so when a write fails: `list > /dev/full` must not print a
/// bare "No space left on device". The error keeps its kind (a broken pipe stays one).
pub struct NamedStdout<W>(pub W);

fn named(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("writing standard output: {e}"))
}

impl<W: Write> Write for NamedStdout<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(named)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(named)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_milliseconds_or_durations_and_never_zero() {
        assert_eq!(TimeoutParser::parse("250"), Ok(Duration::from_millis(250)));
        assert_eq!(TimeoutParser::parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(TimeoutParser::parse("2s"), Ok(Duration::from_secs(2)));
        assert!(TimeoutParser::parse("0").unwrap_err().contains("above 0"));
        assert!(TimeoutParser::parse("0s").unwrap_err().contains("above 0"));
        assert!(
            TimeoutParser::parse("99999999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        assert!(TimeoutParser::parse("2d").unwrap_err().contains("too long"));
        assert!(TimeoutParser::parse("soon").unwrap_err().contains("\"soon\""));
        assert!(TimeoutParser::parse("-1").is_err());
    }

    #[test]
    fn threads_are_bounded() {
        assert_eq!(threads("4"), Ok(4));
        assert!(threads("0").is_err());
        assert!(threads("100000").is_err());
    }
}
