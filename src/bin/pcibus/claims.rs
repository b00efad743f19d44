//! `pcibus claims`: which devices are claimed, by whom.

use super::*;
use crate::list::opt;

// `pcibus claims`: the table says "stale" for a claim whose holder is gone (free to take).
pub(super) fn write_claims(out: &mut impl Write, claims: &[ClaimRecord], json: bool) -> io::Result<()> {
    if json {
        out.write_all(b"[")?;
        for (i, c) in claims.iter().enumerate() {
            out.write_all(if i == 0 { b"\n  " } else { b",\n  " })?;
            // The library's `ClaimRecord` serialization: the schema's `claim`.
            serde_json::to_writer(&mut *out, c)?;
        }
        return out.write_all(if claims.is_empty() { b"]\n" } else { b"\n]\n" });
    }
    writeln!(
        out,
        "{:<13} {:>7} {:<15} {:>6} {:<9} {:<8} REASON",
        "ADDRESS", "PID", "COMMAND", "AGE", "STATE", "DRIVER"
    )?;
    let now = std::time::SystemTime::now();
    for c in claims {
        let state = match (&c.state, c.live) {
            (_, false) => "stale",
            (Some(ClaimState::Active), true) => "active",
            (Some(ClaimState::Releasing { .. }), true) => "releasing",
            _ => "?",
        };
        let reason = match &c.state {
            Some(ClaimState::Releasing { reason }) => reason.as_str(),
            _ => "",
        };
        let age = c
            .since
            .and_then(|t| now.duration_since(t).ok())
            .map_or_else(|| "-".to_owned(), |d| age(d.as_secs()));
        writeln!(
            out,
            "{:<13} {:>7} {:<15} {:>6} {:<9} {:<8} {reason}",
            c.address.to_string(),
            opt(c.pid),
            c.command.as_deref().unwrap_or("-"),
            age,
            state,
            c.driver.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

pub(super) fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}
