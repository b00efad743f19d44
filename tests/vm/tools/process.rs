//! What the VM-suite holders (`matrix.rs`, `soak.rs`) measure of their own process, to
//! check that a removal gives back everything it took. Included with `#[path]`: not an
//! example of its own.

/// Open fds, memory maps, and the status lines a leak would move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub fds: u64,
    pub maps: u64,
    pub rss_kb: u64,
    pub lck_kb: u64,
    pub pin_kb: u64,
}

/// Reads them from `/proc/self` (0 for what cannot be read).
pub fn usage() -> Usage {
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let maps = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count() as u64);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        fds,
        maps,
        rss_kb: kb("VmRSS:"),
        lck_kb: kb("VmLck:"),
        pin_kb: kb("VmPin:"),
    }
}
