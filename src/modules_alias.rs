//! The kernel modules that could drive a device, from `modules.alias`, as `lspci -k` shows
//! them ("Kernel modules: nvme").
//!
//! `modules.alias` (written by depmod in `/lib/modules/$(uname -r)/`) has lines
//! `alias pci:v00008086d00001533sv*sd*bc*sc*i* igb`: a glob pattern over a device's
//! `modalias` and a module name. [`ModuleAliases::parse`] keeps the `pci:` lines of the
//! file's bytes; [`ModuleAliases::modules_for`] matches a modalias against each pattern
//! with the shell's glob rules (`*`, `?`, `[...]`), as kmod does.

use std::path::{Path, PathBuf};

/// The environment variable that overrides the path of `modules.alias`.
pub const ENV: &str = "PCIBUS_MODULES_ALIAS";

/// The `pci:` aliases of a `modules.alias` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleAliases {
    /// `(pattern, module)` in file order.
    aliases: Vec<(Vec<u8>, String)>,
}

impl ModuleAliases {
    /// Reads the file's bytes: lines `alias PATTERN MODULE`; other lines, and aliases of
    /// other buses, are skipped (so is a line that is not valid UTF-8 in its module name).
    pub fn parse(bytes: &[u8]) -> Self {
        let aliases = bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let mut words = line.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
                if words.next()? != b"alias" {
                    return None;
                }
                let pattern = words.next()?;
                let module = std::str::from_utf8(words.next()?).ok()?;
                pattern
                    .starts_with(b"pci:")
                    .then(|| (pattern.to_vec(), module.to_owned()))
            })
            .collect();
        ModuleAliases { aliases }
    }

    /// How many `pci:` aliases the file has.
    pub fn len(&self) -> usize {
        self.aliases.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.aliases.is_empty()
    }

    /// The modules whose patterns match `modalias` (`pci:v...d...sv...sd...bc..sc..i..`,
    /// trailing whitespace ignored), each once, in file order.
    pub fn modules_for(&self, modalias: &str) -> Vec<&str> {
        let text = modalias.trim_end().as_bytes();
        let mut modules: Vec<&str> = Vec::new();
        for (pattern, module) in &self.aliases {
            if !modules.contains(&module.as_str()) && glob_match(pattern, text) {
                modules.push(module);
            }
        }
        modules
    }
}

/// `modules.alias` of the running kernel: `$PCIBUS_MODULES_ALIAS` if set, else
/// `/lib/modules/RELEASE/modules.alias` with the release from `/proc/sys/kernel/osrelease`
/// (what `uname -r` prints); `None` when neither is known.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(ENV) {
        return Some(PathBuf::from(p));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(
        Path::new("/lib/modules")
            .join(release.trim())
            .join("modules.alias"),
    )
}

/// Whether `text` matches the glob `pattern`: `*` any run of bytes, `?` one byte,
/// `[abc]`, `[a-z]`, `[!a]`/`[^a]` one byte of a set, `\x` a literal `x`; other bytes
/// stand for themselves. An unclosed `[` is a literal `[`. Linear backtracking on the
/// last `*` only, so its time is at most `pattern.len() * text.len()`.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, text index it took up to).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() {
            // How many pattern bytes the next text byte matches, if it does.
            let step = match pattern[p] {
                b'*' => {
                    star = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                _ if t == text.len() => None,
                b'?' => Some(1),
                b'[' => match class_match(pattern, p, text[t]) {
                    Some((matched, next)) => matched.then_some(next - p),
                    None => (text[t] == b'[').then_some(1),
                },
                b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(2),
                c => (c == text[t]).then_some(1),
            };
            if let Some(n) = step {
                p += n;
                t += 1;
                continue;
            }
        } else if t == text.len() {
            return true;
        }
        // Mismatch: let the last `*` take one more byte, if there is one.
        match star {
            Some((sp, st)) if st < text.len() => {
                star = Some((sp, st + 1));
                p = sp;
                t = st + 1;
            }
            _ => return false,
        }
    }
}

/// A `[...]` set at `pattern[start]` against byte `c`: `Some((matched, index after the
/// set))`, or `None` when the `[` is not closed.
fn class_match(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let b = *pattern.get(i)?;
        if b == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&e| e != b']') {
            let e = pattern[i + 2];
            matched |= b <= c && c <= e;
            i += 3;
        } else {
            matched |= b == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00008086d00001533sv*sd*bc*sc*i* igb
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias pci:v0000106Bd00002001sv*sd*bc*sc*i* nvme
alias pci:v00001B36d00000010sv*sd*bc*sc*i* qemu_fake
alias usb:v0BDAp8153d*dc*dsc*dp*ic*isc*ip*in* r8152
alias pci:v*d*sv*sd*bc0Csc03i30* xhci_pci
alias pci:v00008086d0000[0-9A]5[!4]3sv*sd*bc*sc*i* setty
alias broken
not an alias line
alias pci:v*d*sv*sd*bc*sc*i* vfio_pci_catchall
";
    const NVME: &str = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\n";

    #[test]
    fn modules_of_a_qemu_nvme_controller() {
        let a = ModuleAliases::parse(FILE.as_bytes());
        assert_eq!(a.len(), 7);
        assert_eq!(a.modules_for(NVME), ["nvme", "qemu_fake", "vfio_pci_catchall"]);
        assert_eq!(
            a.modules_for("pci:v00008086d00001533sv000015D9sd00001533bc02sc00i00"),
            ["igb", "setty", "vfio_pci_catchall"]
        );
        assert_eq!(
            a.modules_for("pci:v00008086d00001543sv0sd0bc02sc00i00"),
            ["vfio_pci_catchall"]
        );
        assert!(ModuleAliases::parse(b"").modules_for(NVME).is_empty());
    }

    #[test]
    fn globs_as_the_shell_reads_them() {
        for (p, t, want) in [
            ("", "", true),
            ("*", "", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[abc]x", "bx", true),
            ("[!abc]x", "bx", false),
            ("[^abc]x", "dx", true),
            ("[a-c]", "b", true),
            ("[a-]", "-", true),
            ("[]]", "]", true),
            ("[", "[", true),
            ("[ab", "[ab", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("**a", "a", true),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), want, "{p:?} {t:?}");
        }
    }

    /// The obvious exponential reference for patterns of `*`, `?` and literals.
    fn reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((b'?', rest)) => !t.is_empty() && reference(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_reference(p in "[ab*?]{0,8}", t in "[ab]{0,10}") {
            prop_assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), reference(p.as_bytes(), t.as_bytes()));
        }

        #[test]
        fn parse_and_match_never_panic(file in proptest::collection::vec(any::<u8>(), 0..400), m in "\\PC{0,60}") {
            let a = ModuleAliases::parse(&file);
            let _ = a.modules_for(&m);
        }

        #[test]
        fn bytes_in_patterns_never_panic(p in proptest::collection::vec(any::<u8>(), 0..30), t in proptest::collection::vec(any::<u8>(), 0..30)) {
            let _ = glob_match(&p, &t);
        }
    }
}
