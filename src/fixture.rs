//! A text format for sysfs trees, for tests and checked-in fixtures.
//!
//! Sysfs names are full of colons (`0000:00:04.0`), which `cargo package` refuses in file
//! names, and sysfs trees hold symlinks and named pipes; so a tree is checked in as one text
//! file, a *fixture*, and materialized in a temporary directory by tests (see
//! `pcibus::testing::FakeSysfs`, feature `testing`). [`parse`] reads a fixture without any
//! I/O; [`write()`] produces one.
//!
//! # Format
//!
//! A fixture is UTF-8 text, line based:
//!
//! ```text
//! pcibus-fixture 1
//! # comments start with '#'; blank lines are ignored
//! dir devices/pci0000:00
//! link bus/pci/devices/0000:00:04.0 ../../../devices/pci0000:00/0000:00:04.0
//! file devices/pci0000:00/0000:00:04.0/vendor
//! > 0x1af4
//! file devices/pci0000:00/0000:00:04.0/empty_attr
//! file devices/pci0000:00/0000:00:04.0/no_newline noeol
//! > abc
//! hex devices/pci0000:00/0000:00:04.0/config
//! : f4 1a 53 10 07 05 10 00 01 00 00 ff 00 00 00 00
//! fifo devices/pci0000:00/0000:00:04.0/uevent
//! ```
//!
//! - The first line that is neither blank nor a comment is the header `pcibus-fixture 1`.
//! - Comment lines (first non-blank character `#`) and blank lines may appear anywhere,
//!   also inside a body; they never end a body. [`parse`] keeps the comments' text in
//!   [`Fixture::notes`] and [`write()`] writes the notes right after the header.
//! - Every other line is an entry line `KEYWORD PATH [ARGUMENT]` or a body line of the
//!   entry above it. Lines may end in `\r\n`; the `\r` is dropped.
//! - `PATH` is relative to the sysfs root and is one token: bytes that are whitespace, `%`,
//!   control characters or not UTF-8 are written `%XX` (two hex digits), so any name
//!   round-trips. Absolute paths, empty components (`a//b`, a trailing `/`), `.` and `..`
//!   components and NUL bytes are errors: materializing a fixture never leaves its root.
//! - `file PATH [noeol]`: a regular file. Each body line `> TEXT` (or a bare `>`)
//!   contributes `TEXT` and a newline; `noeol` drops the last newline. Everything after
//!   `"> "` is content, trailing spaces included. No body means an empty file.
//! - `hex PATH`: a regular file whose body lines are `:` followed by whitespace-separated
//!   two-digit hex bytes. [`write()`] writes 16 bytes a line, and uses `hex` for any content
//!   that is not UTF-8, contains a control character other than newline and tab, or has
//!   a line with trailing whitespace (which editors strip); otherwise `file`.
//! - `link PATH TARGET`: a symlink whose link text is exactly `TARGET` (the rest of the
//!   line, trimmed, then unescaped like `PATH`). The target may be absolute, contain `..`,
//!   dangle or loop: it is text and nothing here follows it.
//! - `dir PATH`: a directory. Parents of every entry are implied, so `dir` is only needed
//!   for empty directories; [`Fixture::normalize`] drops the implied ones.
//! - `fifo PATH`: a named pipe. Opening it for reading blocks until a writer appears,
//!   which is how a fixture models an attribute whose kernel read blocks (the device lock
//!   is held while a removal is pending).
//!
//! # Conflicts
//!
//! [`parse`] (and [`Fixture::check`], which materializing calls for fixtures built in code)
//! rejects the same path twice, and any entry below a path that is a `file`, `hex`, `link`
//! or `fifo` entry — the latter also means no fixture can make a later entry write through
//! one of its own symlinks.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt::{self, Write as _};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The header line of version 1 of the format.
pub const HEADER: &str = "pcibus-fixture 1";

/// A sysfs tree as a list of entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fixture {
    /// The entries, in any order ([`write()`] sorts them by path).
    pub entries: Vec<Entry>,
    /// Free text written as `#` comments after the header (one comment per line), e.g.
    /// the files a snapshot could not read. [`parse`] collects every comment here, in order.
    pub notes: Vec<String>,
}

/// One file, directory, symlink or named pipe of a fixture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path relative to the sysfs root: relative, without empty, `.` or `..` components.
    pub path: PathBuf,
    /// What is at that path.
    pub kind: EntryKind,
}

/// What an [`Entry`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symlink with this link text, kept byte for byte (not a `PathBuf`, whose equality
    /// ignores repeated slashes and `.` components).
    Link(OsString),
    /// A named pipe.
    Fifo,
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir,
        }
    }
    /// A regular file entry.
    pub fn file(path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::File(contents.into()),
        }
    }
    /// A symlink entry with link text `target`.
    pub fn link(path: impl Into<PathBuf>, target: impl Into<OsString>) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::Link(target.into()),
        }
    }
    /// A named pipe entry.
    pub fn fifo(path: impl Into<PathBuf>) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::Fifo,
        }
    }
}

/// Why a fixture was rejected.
///
/// `line` is the 1-based line of the text, or 0 for a fixture built in code and checked by
/// [`Fixture::check`]; `text` quotes the line (or the path), shortened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fixture line {line}: {kind} in \"{text}\"")]
pub struct FixtureError {
    /// 1-based line number; 0 when the fixture was not parsed from text.
    pub line: usize,
    /// What is wrong.
    pub kind: FixtureErrorKind,
    /// The offending line (or path), shortened by [`crate::error::shorten`].
    pub text: String,
}

/// What is wrong with a fixture.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FixtureErrorKind {
    /// The text does not start with `pcibus-fixture 1`.
    MissingHeader,
    /// Not one of `file`, `hex`, `link`, `dir`, `fifo`, a body line, comment or blank.
    UnknownKeyword,
    /// The entry line lacks its path (or a link its target).
    MissingArgument,
    /// More words than the keyword takes.
    ExtraArgument,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The path is absolute, empty, or has an empty, `.` or `..` component, or a NUL.
    BadPath(&'static str),
    /// A body line that does not belong to the entry above it.
    StrayBody,
    /// A `hex` body word that is not two hex digits.
    BadHex,
    /// The same path appears twice.
    Duplicate,
    /// An entry below a path that is not a directory.
    UnderNonDirectory,
}

impl fmt::Display for FixtureErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FixtureErrorKind::MissingHeader => write!(f, "expected header \"{HEADER}\""),
            FixtureErrorKind::UnknownKeyword => write!(f, "expected file, hex, link, dir or fifo"),
            FixtureErrorKind::MissingArgument => write!(f, "missing path or link target"),
            FixtureErrorKind::ExtraArgument => write!(f, "unexpected extra words"),
            FixtureErrorKind::BadEscape => write!(f, "'%' not followed by two hex digits"),
            FixtureErrorKind::BadPath(why) => write!(f, "bad path: {why}"),
            FixtureErrorKind::StrayBody => write!(f, "body line without a matching file or hex entry"),
            FixtureErrorKind::BadHex => write!(f, "expected two-digit hex bytes"),
            FixtureErrorKind::Duplicate => write!(f, "path appears twice"),
            FixtureErrorKind::UnderNonDirectory => write!(f, "entry below a file, link or fifo"),
        }
    }
}

fn error(line: usize, kind: FixtureErrorKind, text: &[u8]) -> FixtureError {
    FixtureError {
        line,
        kind,
        text: crate::error::shorten(text),
    }
}

/// Checks that `path` is a usable fixture path; `Err` says why not.
pub fn check_path(path: &Path) -> Result<(), &'static str> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err("empty");
    }
    if bytes.starts_with(b"/") {
        return Err("absolute");
    }
    if bytes.contains(&0) {
        return Err("contains NUL");
    }
    for part in bytes.split(|&b| b == b'/') {
        match part {
            b"" => return Err("empty component"),
            b"." | b".." => return Err("'.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

impl Fixture {
    /// Checks the rules [`parse`] enforces, for a fixture built in code: valid paths and
    /// link targets, no duplicate path, nothing below a non-directory.
    pub fn check(&self) -> Result<(), FixtureError> {
        let lines = vec![0; self.entries.len()];
        self.check_with_lines(&lines)
    }

    fn check_with_lines(&self, lines: &[usize]) -> Result<(), FixtureError> {
        let mut seen: HashMap<&Path, (bool, usize)> = HashMap::with_capacity(self.entries.len());
        for (entry, &line) in self.entries.iter().zip(lines) {
            let raw = entry.path.as_os_str().as_bytes();
            check_path(&entry.path).map_err(|why| error(line, FixtureErrorKind::BadPath(why), raw))?;
            if let EntryKind::Link(target) = &entry.kind {
                let t = target.as_bytes();
                if t.is_empty() {
                    return Err(error(line, FixtureErrorKind::MissingArgument, raw));
                }
                if t.contains(&0) {
                    return Err(error(
                        line,
                        FixtureErrorKind::BadPath("link target contains NUL"),
                        t,
                    ));
                }
            }
            let is_dir = matches!(entry.kind, EntryKind::Dir);
            if seen.insert(&entry.path, (is_dir, line)).is_some() {
                return Err(error(line, FixtureErrorKind::Duplicate, raw));
            }
        }
        for (entry, &line) in self.entries.iter().zip(lines) {
            for ancestor in entry.path.ancestors().skip(1) {
                if let Some(&(false, _)) = seen.get(ancestor) {
                    let raw = entry.path.as_os_str().as_bytes();
                    return Err(error(line, FixtureErrorKind::UnderNonDirectory, raw));
                }
            }
        }
        Ok(())
    }

    /// Sorts the entries by path and drops `dir` entries that are implied by an entry
    /// below them: the canonical form [`crate::sysfs::snapshot::capture`] returns.
    pub fn normalize(&mut self) {
        self.entries.sort_by(|a, b| a.path.cmp(&b.path));
        let mut implied = std::collections::HashSet::new();
        for e in &self.entries {
            for a in e.path.ancestors().skip(1) {
                if a.as_os_str().is_empty() || !implied.insert(a.to_path_buf()) {
                    break;
                }
            }
        }
        self.entries
            .retain(|e| !(matches!(e.kind, EntryKind::Dir) && implied.contains(&e.path)));
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: impl AsRef<Path>) -> Option<&Entry> {
        let path = path.as_ref();
        self.entries.iter().find(|e| e.path == path)
    }
}

/// Parses a fixture. Pure: no I/O, never panics.
pub fn parse(text: &str) -> Result<Fixture, FixtureError> {
    enum Body {
        None,
        Text { noeol: bool },
        Hex,
    }
    let mut fixture = Fixture::default();
    let mut lines = Vec::new();
    let mut header_seen = false;
    let mut body = Body::None;
    // Finishes the body of the last entry: applies `noeol`.
    let finish = |fixture: &mut Fixture, body: &Body| {
        if let (Body::Text { noeol: true }, Some(e)) = (body, fixture.entries.last_mut())
            && let EntryKind::File(data) = &mut e.kind
            && data.last() == Some(&b'\n')
        {
            data.pop();
        }
    };
    for (n, raw_line) in text.split('\n').enumerate() {
        let line_no = n + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        let trimmed = line.trim_start_matches([' ', '\t']);
        if trimmed.trim_end_matches([' ', '\t']).is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            fixture.notes.push(comment.to_string());
            continue;
        }
        let err = |kind| error(line_no, kind, line.as_bytes());
        if !header_seen {
            let mut words = line.split_ascii_whitespace();
            if (words.next(), words.next(), words.next()) != (Some("pcibus-fixture"), Some("1"), None) {
                return Err(err(FixtureErrorKind::MissingHeader));
            }
            header_seen = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix('>') {
            let Body::Text { .. } = body else {
                return Err(err(FixtureErrorKind::StrayBody));
            };
            let content = rest.strip_prefix(' ').unwrap_or(rest);
            if let Some(Entry {
                kind: EntryKind::File(data),
                ..
            }) = fixture.entries.last_mut()
            {
                data.extend_from_slice(content.as_bytes());
                data.push(b'\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix(':') {
            let Body::Hex = body else {
                return Err(err(FixtureErrorKind::StrayBody));
            };
            let mut bytes = Vec::new();
            for word in rest.split_ascii_whitespace() {
                if word.len() != 2 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err(FixtureErrorKind::BadHex));
                }
                bytes.push(u8::from_str_radix(word, 16).map_err(|_| err(FixtureErrorKind::BadHex))?);
            }
            if let Some(Entry {
                kind: EntryKind::File(data),
                ..
            }) = fixture.entries.last_mut()
            {
                data.extend_from_slice(&bytes);
            }
            continue;
        }
        finish(&mut fixture, &body);
        body = Body::None;
        let mut words = line.split_ascii_whitespace();
        let keyword = words.next().unwrap_or_default();
        let path = words
            .next()
            .ok_or_else(|| err(FixtureErrorKind::MissingArgument))?;
        let path = PathBuf::from(OsString::from_vec(
            unescape(path).ok_or_else(|| err(FixtureErrorKind::BadEscape))?,
        ));
        let kind = match keyword {
            "file" => {
                let noeol = match words.next() {
                    None => false,
                    Some("noeol") => true,
                    Some(_) => return Err(err(FixtureErrorKind::ExtraArgument)),
                };
                body = Body::Text { noeol };
                EntryKind::File(Vec::new())
            }
            "hex" => {
                body = Body::Hex;
                EntryKind::File(Vec::new())
            }
            "dir" => EntryKind::Dir,
            "fifo" => EntryKind::Fifo,
            "link" => {
                // The target is the rest of the line after the path.
                let after_keyword = line.trim_start().strip_prefix("link").unwrap_or_default();
                let after_path = after_keyword
                    .trim_start_matches([' ', '\t'])
                    .trim_start_matches(|c: char| c != ' ' && c != '\t');
                let target = after_path.trim_matches([' ', '\t']);
                if target.is_empty() {
                    return Err(err(FixtureErrorKind::MissingArgument));
                }
                let target = unescape(target).ok_or_else(|| err(FixtureErrorKind::BadEscape))?;
                EntryKind::Link(OsString::from_vec(target))
            }
            _ => return Err(err(FixtureErrorKind::UnknownKeyword)),
        };
        if keyword != "link" && words.next().is_some() {
            return Err(err(FixtureErrorKind::ExtraArgument));
        }
        fixture.entries.push(Entry { path, kind });
        lines.push(line_no);
    }
    finish(&mut fixture, &body);
    if !header_seen {
        return Err(error(
            1,
            FixtureErrorKind::MissingHeader,
            text.lines().next().unwrap_or("").as_bytes(),
        ));
    }
    fixture.check_with_lines(&lines)?;
    Ok(fixture)
}

fn unescape(token: &str) -> Option<Vec<u8>> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Writes `bytes` as one whitespace-free token: whitespace, `%`, control characters and
/// bytes that are not UTF-8 become `%XX`.
pub fn escape(bytes: &[u8], out: &mut String) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' || c.is_whitespace() || c.is_control() {
                let mut buf = [0; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "%{b:02X}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Whether `data` can be written as `file` text (see the module docs), not `hex`.
fn is_text(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    text.chars().all(|c| c == '\n' || c == '\t' || !c.is_control())
        && text.split('\n').all(|l| !l.ends_with([' ', '\t']))
}

/// Writes a fixture in the format of the module docs: the header, the notes as comments,
/// then the entries sorted by path. Deterministic; [`parse`] reads it back.
pub fn write(fixture: &Fixture) -> String {
    let mut out = String::new();
    out.push_str(HEADER);
    out.push('\n');
    for note in &fixture.notes {
        for line in note.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            out.push('#');
            if !line.is_empty() {
                out.push(' ');
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    let mut entries: Vec<&Entry> = fixture.entries.iter().collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for entry in entries {
        let mut path = String::new();
        escape(entry.path.as_os_str().as_bytes(), &mut path);
        match &entry.kind {
            EntryKind::Dir => {
                let _ = writeln!(out, "dir {path}");
            }
            EntryKind::Fifo => {
                let _ = writeln!(out, "fifo {path}");
            }
            EntryKind::Link(target) => {
                let mut t = String::new();
                escape(OsStr::as_bytes(target), &mut t);
                let _ = writeln!(out, "link {path} {t}");
            }
            EntryKind::File(data) if is_text(data) => {
                let text = std::str::from_utf8(data).unwrap_or_default();
                let (text, noeol) = match text.strip_suffix('\n') {
                    Some(t) => (t, false),
                    None => (text, !text.is_empty()),
                };
                let _ = writeln!(out, "file {path}{}", if noeol { " noeol" } else { "" });
                if !data.is_empty() {
                    for line in text.split('\n') {
                        if line.is_empty() {
                            out.push_str(">\n");
                        } else {
                            let _ = writeln!(out, "> {line}");
                        }
                    }
                }
            }
            EntryKind::File(data) => {
                let _ = writeln!(out, "hex {path}");
                for chunk in data.chunks(16) {
                    out.push(':');
                    for b in chunk {
                        let _ = write!(out, " {b:02x}");
                    }
                    out.push('\n');
                }
            }
        }
    }
    out
}

impl fmt::Display for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&write(self))
    }
}

impl std::str::FromStr for Fixture {
    type Err = FixtureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "pcibus-fixture 1
# a comment

dir devices/pci0000:00
link bus/pci/devices/0000:00:04.0 ../../../devices/pci0000:00/0000:00:04.0
file devices/pci0000:00/0000:00:04.0/vendor
> 0x1af4
file devices/pci0000:00/0000:00:04.0/resource
> 0x0000004000180000 0x00000040001fffff 0x0000000000140204
> 0x0000000000000000 0x0000000000000000 0x0000000000000000
file devices/pci0000:00/0000:00:04.0/empty_attr
file devices/pci0000:00/0000:00:04.0/no_newline noeol
> abc
hex devices/pci0000:00/0000:00:04.0/config
: f4 1a 53 10
: 07 05
fifo devices/pci0000:00/0000:00:04.0/uevent
";

    #[test]
    fn parses_the_documented_example() {
        let f = parse(EXAMPLE).unwrap();
        assert_eq!(f.notes, ["a comment"]);
        let dev = "devices/pci0000:00/0000:00:04.0";
        assert_eq!(f.get("devices/pci0000:00").unwrap().kind, EntryKind::Dir);
        assert_eq!(
            f.get("bus/pci/devices/0000:00:04.0").unwrap().kind,
            EntryKind::Link("../../../devices/pci0000:00/0000:00:04.0".into())
        );
        assert_eq!(
            f.get(format!("{dev}/vendor")).unwrap().kind,
            EntryKind::File(b"0x1af4\n".to_vec())
        );
        let EntryKind::File(res) = &f.get(format!("{dev}/resource")).unwrap().kind else {
            panic!()
        };
        assert_eq!(res.iter().filter(|&&b| b == b'\n').count(), 2);
        assert_eq!(
            f.get(format!("{dev}/empty_attr")).unwrap().kind,
            EntryKind::File(vec![])
        );
        assert_eq!(
            f.get(format!("{dev}/no_newline")).unwrap().kind,
            EntryKind::File(b"abc".to_vec())
        );
        assert_eq!(
            f.get(format!("{dev}/config")).unwrap().kind,
            EntryKind::File(vec![0xf4, 0x1a, 0x53, 0x10, 0x07, 0x05])
        );
        assert_eq!(f.get(format!("{dev}/uevent")).unwrap().kind, EntryKind::Fifo);
        // And back (sorted).
        let mut sorted = f.clone();
        sorted.entries.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(parse(&write(&f)).unwrap(), sorted);
    }

    #[test]
    fn writer_is_deterministic_and_sorted() {
        let f = Fixture {
            entries: vec![
                Entry::file("b/x", "1\n"),
                Entry::dir("a"),
                Entry::file("b/bin", vec![0, 1, 2]),
                Entry::file("b/cr", "a\r\n"),
                Entry::file("b/trailing", "a \n"),
                Entry::link("b/l", "../a b"),
                Entry::file("b/two", "\n\n"),
            ],
            notes: vec![],
        };
        let text = write(&f);
        assert_eq!(
            text,
            "pcibus-fixture 1\ndir a\nhex b/bin\n: 00 01 02\nhex b/cr\n: 61 0d 0a\nlink b/l ../a%20b\n\
             hex b/trailing\n: 61 20 0a\nfile b/two\n>\n>\nfile b/x\n> 1\n"
        );
    }

    #[test]
    fn escapes_names() {
        let mut out = String::new();
        escape(b"a b%c\xff\xc3\xa9\n", &mut out);
        assert_eq!(out, "a%20b%25c%FF\u{e9}%0A");
        assert_eq!(unescape(&out).unwrap(), b"a b%c\xff\xc3\xa9\n");
        assert_eq!(unescape("%4"), None);
        assert_eq!(unescape("%zz"), None);
    }

    fn err(text: &str) -> FixtureError {
        parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_line_and_quote_it() {
        let e = err("pcibus-fixture 1\ndir a\nbogus b\n");
        assert_eq!(
            (e.line, e.kind.clone(), e.text.as_str()),
            (3, FixtureErrorKind::UnknownKeyword, "bogus b")
        );
        assert_eq!(
            e.to_string(),
            "fixture line 3: expected file, hex, link, dir or fifo in \"bogus b\""
        );
        assert_eq!(err("").kind, FixtureErrorKind::MissingHeader);
        assert_eq!(err("pcibus-fixture 2\n").kind, FixtureErrorKind::MissingHeader);
        assert_eq!(err("# c\ndir a\n").line, 2);
        assert_eq!(
            err("pcibus-fixture 1\nfile /etc/passwd\n").kind,
            FixtureErrorKind::BadPath("absolute")
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir a/../../x\n").kind,
            FixtureErrorKind::BadPath("'.' or '..' component")
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir a//x\n").kind,
            FixtureErrorKind::BadPath("empty component")
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir a/\n").kind,
            FixtureErrorKind::BadPath("empty component")
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir a%00\n").kind,
            FixtureErrorKind::BadPath("contains NUL")
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir a%2\n").kind,
            FixtureErrorKind::BadEscape
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir\n").kind,
            FixtureErrorKind::MissingArgument
        );
        assert_eq!(
            err("pcibus-fixture 1\nlink a\n").kind,
            FixtureErrorKind::MissingArgument
        );
        assert_eq!(
            err("pcibus-fixture 1\ndir a b\n").kind,
            FixtureErrorKind::ExtraArgument
        );
        assert_eq!(
            err("pcibus-fixture 1\nfile a eol\n").kind,
            FixtureErrorKind::ExtraArgument
        );
        assert_eq!(err("pcibus-fixture 1\n> x\n").kind, FixtureErrorKind::StrayBody);
        assert_eq!(
            err("pcibus-fixture 1\nhex a\n> x\n").kind,
            FixtureErrorKind::StrayBody
        );
        assert_eq!(
            err("pcibus-fixture 1\nfile a\n: 00\n").kind,
            FixtureErrorKind::StrayBody
        );
        assert_eq!(
            err("pcibus-fixture 1\nhex a\n: 0\n").kind,
            FixtureErrorKind::BadHex
        );
        assert_eq!(
            err("pcibus-fixture 1\nhex a\n: +1\n").kind,
            FixtureErrorKind::BadHex
        );
        let e = err("pcibus-fixture 1\ndir a\nfile b\nfile a\n");
        assert_eq!((e.line, e.kind), (4, FixtureErrorKind::Duplicate));
        let e = err("pcibus-fixture 1\nfile a\nfile a/b\n");
        assert_eq!((e.line, e.kind), (3, FixtureErrorKind::UnderNonDirectory));
        let e = err("pcibus-fixture 1\nfile x/y/z\nlink x /\n");
        assert_eq!((e.line, e.kind), (2, FixtureErrorKind::UnderNonDirectory));
        let long = format!("pcibus-fixture 1\nzz {}\n", "y".repeat(100));
        assert_eq!(err(&long).text.chars().count(), crate::error::QUOTE_MAX + 1);
    }

    #[test]
    fn tolerates_crlf_comments_in_bodies_and_links_with_spaces() {
        let f = parse("pcibus-fixture 1\r\nfile a\r\n> x\r\n# note\r\n\r\n> y\r\nlink b  ../c d \n").unwrap();
        assert_eq!(f.get("a").unwrap().kind, EntryKind::File(b"x\ny\n".to_vec()));
        assert_eq!(f.get("b").unwrap().kind, EntryKind::Link("../c d".into()));
        assert_eq!(f.notes, ["note"]);
    }

    #[test]
    fn normalize_drops_implied_dirs() {
        let mut f = Fixture {
            entries: vec![
                Entry::dir("a"),
                Entry::file("a/b/c", ""),
                Entry::dir("a/b"),
                Entry::dir("d"),
            ],
            notes: vec![],
        };
        f.normalize();
        assert_eq!(f.entries, vec![Entry::file("a/b/c", ""), Entry::dir("d")]);
    }

    fn component() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 1..12).prop_map(|mut v| {
            for b in &mut v {
                if *b == b'/' || *b == 0 {
                    *b = b'x';
                }
            }
            if v == b"." || v == b".." {
                v.push(b'x');
            }
            v
        })
    }

    fn kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::Dir),
            Just(EntryKind::Fifo),
            prop::collection::vec(any::<u8>(), 0..200).prop_map(EntryKind::File),
            "[ -~\t\n]{0,80}".prop_map(|s| EntryKind::File(s.into_bytes())),
            prop::collection::vec(any::<u8>(), 1..40).prop_map(|mut v| {
                v.iter_mut().filter(|b| **b == 0).for_each(|b| *b = b'/');
                EntryKind::Link(OsString::from_vec(v))
            }),
        ]
    }

    fn fixture() -> impl Strategy<Value = Fixture> {
        let entry = (prop::collection::vec(component(), 0..3), kind());
        let notes = prop::collection::vec("[^\r\n]{0,30}", 0..3);
        (prop::collection::vec(entry, 0..12), notes).prop_map(|(entries, notes)| {
            let entries = entries
                .into_iter()
                .enumerate()
                .map(|(i, (parts, kind))| {
                    // A unique first component: no duplicates, nothing below another entry.
                    let mut path = PathBuf::from(format!("e{i}"));
                    for p in parts {
                        path.push(OsString::from_vec(p));
                    }
                    Entry { path, kind }
                })
                .collect();
            Fixture { entries, notes }
        })
    }

    proptest! {
        #[test]
        fn write_then_parse_round_trips(f in fixture()) {
            let text = write(&f);
            let mut back = parse(&text).unwrap();
            let mut f = f;
            f.entries.sort_by(|a, b| a.path.cmp(&b.path));
            back.entries.sort_by(|a, b| a.path.cmp(&b.path));
            prop_assert_eq!(&back, &f);
            prop_assert_eq!(write(&back), text);
        }

        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = parse(&text);
            let _ = parse(&format!("pcibus-fixture 1\n{text}"));
        }

        #[test]
        fn parse_never_panics_on_line_soup(lines in prop::collection::vec(
            "(file|hex|link|dir|fifo|>|:|#|noeol| |%|%0|%zz|a|/|\\.\\.|[0-9a-f]{2}|\u{e9}|\t)*", 0..10)) {
            let text = format!("pcibus-fixture 1\n{}", lines.join("\n"));
            let _ = parse(&text);
        }
    }
}
