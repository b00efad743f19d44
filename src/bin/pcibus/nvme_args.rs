//! The numbers the `pcibus nvme` commands take, checked when the command line is parsed:
//! a number out of range is a usage error (exit 2) that names the bad text, before any
//! device is touched. What only the device can tell (an LBA beyond the namespace, a queue
//! depth above the controller's queue size) is checked once it is up.

use std::time::Duration;

/// The longest `--time` / `--hold`: longer runs are a typo (`1e20`), and a deadline that far
/// ahead would overflow the clock.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The largest `--bs`: one I/O is one command, and no controller takes a transfer this big
/// (the controller's own limit, MDTS, is checked once it is up).
pub(crate) const MAX_IO_SIZE: u64 = 1 << 30;

// A bad value's text, shortened if huge, for a message.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("\"{s}\"")
    } else {
        format!(
            "\"{}...\" ({} characters)",
            s.chars().take(MAX).collect::<String>(),
            s.len()
        )
    }
}

/// A duration: a plain number of seconds (`10`, `2.5`, as before) or with units, as
/// humantime reads them (`10s`, `500ms`, `1m30s`, `2h`). Positive and at most a year.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) => {
            if !secs.is_finite() || secs < 0.0 {
                return Err(format!(
                    "{}: expected a positive number of seconds, or a duration such as 10s or 500ms",
                    shown(s)
                ));
            }
            if secs > MAX_DURATION.as_secs_f64() {
                return Err(format!("{}: longer than a year", shown(s)));
            }
            Duration::from_secs_f64(secs)
        }
        Err(_) => humantime::parse_duration(t).map_err(|e| {
            format!(
                "{}: expected seconds or a duration such as 10s, 500ms or 1m30s ({e})",
                shown(s)
            )
        })?,
    };
    if d.is_zero() {
        return Err(format!("{}: the duration must be more than zero", shown(s)));
    }
    if d > MAX_DURATION {
        return Err(format!("{}: longer than a year", shown(s)));
    }
    Ok(d)
}

/// Like [`parse_duration`], but 0 is allowed (`--hold 0`: do not wait).
pub(crate) fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

/// Bytes: a whole number with an optional binary suffix as fio and spdk_nvme_perf read
/// them (`512`, `4k` = 4096, `128K`, `1m`, `1MiB`, `1g`). The crates that parse sizes read
/// `4k` as 4000 by default; here it must be 4096, so this is a dozen lines of its own.
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{}: expected a size such as 512, 4k, 128k or 1m", shown(s));
    let t = s.trim().to_ascii_lowercase();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let shift = match suffix.trim_start() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{}: too large", shown(s)))
}

/// `--bs`: a size (see [`parse_bytes`]) that can be a whole number of blocks of any
/// namespace (a multiple of 512, the smallest block size) and at most [`MAX_IO_SIZE`].
pub(crate) fn parse_io_size(s: &str) -> Result<usize, String> {
    let n = parse_bytes(s)?;
    if n == 0 || n % 512 != 0 {
        return Err(format!(
            "{}: an I/O is a whole number of blocks, so a multiple of 512 bytes (e.g. 512, 4k)",
            shown(s)
        ));
    }
    if n > MAX_IO_SIZE {
        return Err(format!("{}: more than 1 GiB in one I/O", shown(s)));
    }
    usize::try_from(n).map_err(|_| format!("{}: too large", shown(s)))
}

/// A namespace ID: 1 to FFFFFFFEh (0 and FFFFFFFFh, "all namespaces", name no one
/// namespace). Decimal or 0x-hex.
pub(crate) fn parse_nsid(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse::<u64>(),
    }
    .map_err(|_| format!("{}: expected a namespace ID (1, 2, ...)", shown(s)))?;
    match u32::try_from(n) {
        Ok(n @ 1..=0xffff_fffe) => Ok(n),
        _ => Err(format!(
            "{}: a namespace ID is 1 to 4294967294 (0 and 0xffffffff name no one namespace)",
            shown(s)
        )),
    }
}

/// A whole number in `min..=max`, named `what` in the message.
pub(crate) fn in_range(s: &str, min: u64, max: u64, what: &str) -> Result<u64, String> {
    let n: u64 = s.trim().parse().map_err(|_| {
        format!(
            "{}: expected {what}, a whole number from {min} to {max}",
            shown(s)
        )
    })?;
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{}: {what} must be from {min} to {max}", shown(s)))
    }
}

/// `--qd`: I/Os in flight per queue. A queue of N entries holds N - 1, and the driver's
/// queues have at most 65535 entries.
pub(crate) fn parse_queue_depth(s: &str) -> Result<u16, String> {
    in_range(s, 1, 65534, "the queue depth").map(|n| n as u16)
}

/// `--queues`: I/O queues (threads). NVMe has at most 65535 I/O queues.
pub(crate) fn parse_queues(s: &str) -> Result<u16, String> {
    in_range(s, 1, 65535, "the number of queues").map(|n| n as u16)
}

/// `--rwmixread`: the percentage of reads.
pub(crate) fn parse_percent(s: &str) -> Result<u8, String> {
    in_range(s, 0, 100, "a percentage").map(|n| n as u8)
}

/// `--blocks`: at least one.
pub(crate) fn parse_blocks(s: &str) -> Result<u64, String> {
    in_range(s, 1, u64::MAX, "the number of blocks")
}

/// `--settle-ms`: at most an hour.
pub(crate) fn parse_settle_ms(s: &str) -> Result<u64, String> {
    in_range(s, 0, 3_600_000, "milliseconds")
}

/// `--spin-us`: at most 10 seconds.
pub(crate) fn parse_spin_us(s: &str) -> Result<u64, String> {
    in_range(s, 0, 10_000_000, "microseconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_humantime() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        for bad in ["0", "0s", "-1", "NaN", "inf", "1e20", "400days", "", "10x", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration_or_zero("NaN").is_err());
        // A huge bad value is shortened in the message.
        let e = parse_duration(&"9".repeat(100_000)).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("4k"), Ok(4096));
        assert_eq!(parse_bytes("4K"), Ok(4096));
        assert_eq!(parse_bytes("4KiB"), Ok(4096));
        assert_eq!(parse_bytes("1m"), Ok(1 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        for bad in [
            "",
            "k",
            "4x",
            "-4k",
            "4.5k",
            "1e3",
            "99999999999999999999k",
            "18446744073709551615k",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_io_size("128k"), Ok(128 << 10));
        for bad in ["0", "1000", "4097", "2g"] {
            assert!(parse_io_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn namespace_ids_and_counts_have_ranges() {
        assert_eq!(parse_nsid("1"), Ok(1));
        assert_eq!(parse_nsid("0x10"), Ok(16));
        for bad in ["0", "0xffffffff", "4294967296", "x", "-1"] {
            assert!(parse_nsid(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_queue_depth("32"), Ok(32));
        assert!(parse_queue_depth("0").is_err());
        assert!(parse_queue_depth("65535").is_err());
        assert!(parse_queues("0").is_err());
        assert_eq!(parse_percent("70"), Ok(70));
        assert!(parse_percent("101").is_err());
        assert!(parse_blocks("0").is_err());
        assert!(parse_settle_ms("3600001").is_err());
        assert!(parse_spin_us("10000001").is_err());
    }
}
