//! The CLI's logger: the library's `log` records (a driver restore that failed, a claims
//! directory it could not read) on stderr, one line each, prefixed like the CLI's own
//! messages.
//!
//! Level: warnings and errors by default, `-v` adds info, `-vv` debug, `-q` keeps errors
//! only. `RUST_LOG` overrides them, as in other Rust tools: a level (`debug`, `off`), or
//! comma-separated `target=level` directives (`pcibus::bus=debug,warn`), the longest
//! matching target deciding.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    /// The level for targets no directive names.
    default: LevelFilter,
    /// `(target prefix, level)`, longest prefix first.
    directives: Vec<(String, LevelFilter)>,
}

impl Logger {
    fn level_for(&self, target: &str) -> LevelFilter {
        self.directives
            .iter()
            .find(|(prefix, _)| {
                target
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
            .map_or(self.default, |(_, level)| *level)
    }

    fn max(&self) -> LevelFilter {
        self.directives
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, Ord::max)
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        // One write per line, so lines of concurrent threads do not interleave; a failed
        // write to stderr has nowhere to be reported.
        let line = format!("pcibus: {level}: {}\n", record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The level `-v` (counted) and `-q` ask for.
pub fn level(verbose: u8, quiet: bool) -> LevelFilter {
    match (quiet, verbose) {
        (true, _) => LevelFilter::Error,
        (false, 0) => LevelFilter::Warn,
        (false, 1) => LevelFilter::Info,
        (false, 2) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    }
}

/// Parses `RUST_LOG`: `None` when it names nothing usable (then the flags decide).
fn parse(spec: &str, default: LevelFilter) -> Option<Logger> {
    let mut logger = Logger {
        default,
        directives: Vec::new(),
    };
    let mut any = false;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((target, level)) => {
                if let Ok(level) = level.trim().parse() {
                    logger.directives.push((target.trim().to_owned(), level));
                    any = true;
                }
            }
            None => {
                if let Ok(level) = part.parse() {
                    logger.default = level;
                } else {
                    // A bare target turns everything on for it, as env_logger does.
                    logger.directives.push((part.to_owned(), LevelFilter::Trace));
                }
                any = true;
            }
        }
    }
    logger
        .directives
        .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    any.then_some(logger)
}

/// Installs the logger: `level` from the flags, unless `RUST_LOG` says otherwise.
pub fn init(level: LevelFilter) {
    let logger = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| parse(&spec, level))
        .unwrap_or(Logger {
            default: level,
            directives: Vec::new(),
        });
    log::set_max_level(logger.max());
    // Fails only if a logger is already set, and none is.
    let _ = log::set_logger(Box::leak(Box::new(logger)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_levels_and_directives() {
        let l = parse("debug", LevelFilter::Warn).unwrap();
        assert_eq!(l.level_for("pcibus::bus"), LevelFilter::Debug);
        let l = parse("pcibus::bus=debug, off", LevelFilter::Warn).unwrap();
        assert_eq!(l.level_for("pcibus::bus::probe"), LevelFilter::Debug);
        assert_eq!(l.level_for("pcibus::busy"), LevelFilter::Off);
        assert_eq!(l.level_for("pcibus::sysfs"), LevelFilter::Off);
        assert_eq!(l.max(), LevelFilter::Debug);
        let l = parse("pcibus=info,pcibus::bus=error", LevelFilter::Warn).unwrap();
        assert_eq!(l.level_for("pcibus::bus"), LevelFilter::Error);
        assert_eq!(l.level_for("pcibus::sysfs"), LevelFilter::Info);
        assert_eq!(l.level_for("other"), LevelFilter::Warn);
        assert!(parse(" , ", LevelFilter::Warn).is_none());
    }

    #[test]
    fn flags_set_the_level() {
        assert_eq!(level(0, false), LevelFilter::Warn);
        assert_eq!(level(1, false), LevelFilter::Info);
        assert_eq!(level(2, false), LevelFilter::Debug);
        assert_eq!(level(0, true), LevelFilter::Error);
    }
}
