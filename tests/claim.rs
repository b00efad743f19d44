//! Claims across processes: a holder in another process (this test binary, re-run with
//! `HOLD_ENV` set so that only `holder_helper` does anything) refuses us by name, is
//! killed with SIGKILL, and its claim is free again; its release is seen in our registry.
//! SPDK's lock files, locked by a helper process the way SPDK locks them, refuse our
//! claims, and our claims refuse that helper.

#[path = "common/skip.rs"]
mod skip;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcibus::bus::claim::{ClaimDir, ClaimError, ClaimInfo, ClaimState};
use pcibus::removal::registry::Reason;
use pcibus::{PciAddress, RemovalRegistry};

/// `DIR ADDRESS [REASON]`: the helper claims ADDRESS in DIR, marks it releasing for
/// REASON if given, prints "ready" and waits to be killed.
const HOLD_ENV: &str = "PCIBUS_TEST_HOLD_CLAIM";

/// Set: the helper also starts a `sleep` that outlives it, and prints its PID first.
const SPAWN_ENV: &str = "PCIBUS_TEST_HOLD_SPAWN";

/// `PF`: the helper's claim names PF as its device's PF (the device is a VF).
const PHYSFN_ENV: &str = "PCIBUS_TEST_HOLD_PHYSFN";

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

#[test]
fn holder_helper() {
    let Ok(spec) = std::env::var(HOLD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ' ');
    let dir = ClaimDir::new(parts.next().unwrap());
    let address = addr(parts.next().unwrap());
    let physfn = std::env::var(PHYSFN_ENV).ok().map(|pf| addr(&pf));
    let claim = dir.claim(address, &ClaimInfo::new().physfn(physfn)).unwrap();
    if let Some(reason) = parts.next() {
        claim.mark_releasing(reason).unwrap();
    }
    if std::env::var_os(SPAWN_ENV).is_some() {
        // Never waited for: this process is killed first, and the test kills the sleeper.
        #[allow(clippy::zombie_processes)]
        let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        println!("\nsleeper {}", sleeper.id());
    }
    println!("\nholder ready");
    std::thread::sleep(Duration::from_secs(60));
}

/// A process holding `address` in `dir`, killed (SIGKILL) when dropped.
struct Holder(Child);

impl Holder {
    fn start(dir: &Path, address: PciAddress, releasing: Option<&str>) -> Holder {
        Self::start_with(dir, address, releasing, false).0
    }

    // A holder of VF `address` of `pf`, releasing it for `reason`.
    fn start_vf(dir: &Path, address: PciAddress, pf: PciAddress, reason: &str) -> Holder {
        Self::spawn(dir, address, Some(reason), false, Some(pf)).0
    }

    // Also returns the PID of the sleeper it started, if `spawn`.
    fn start_with(
        dir: &Path,
        address: PciAddress,
        releasing: Option<&str>,
        spawn: bool,
    ) -> (Holder, Option<u32>) {
        Self::spawn(dir, address, releasing, spawn, None)
    }

    fn spawn(
        dir: &Path,
        address: PciAddress,
        releasing: Option<&str>,
        spawn: bool,
        physfn: Option<PciAddress>,
    ) -> (Holder, Option<u32>) {
        let mut spec = format!("{} {address}", dir.display());
        if let Some(r) = releasing {
            spec = format!("{spec} {r}");
        }
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "holder_helper", "--nocapture", "--test-threads=1"])
            .env(HOLD_ENV, spec)
            .stdout(Stdio::piped());
        if spawn {
            command.env(SPAWN_ENV, "1");
        }
        if let Some(pf) = physfn {
            command.env(PHYSFN_ENV, pf.to_string());
        }
        let mut child = command.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut sleeper = None;
        for line in out.lines().map_while(Result::ok) {
            if let Some(pid) = line.strip_prefix("sleeper ") {
                sleeper = Some(pid.parse().unwrap());
            }
            if line == "holder ready" {
                return (Holder(child), sleeper);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the holder did not get ready");
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn comm(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))
            .unwrap()
            .trim_end()
            .to_owned()
    }

    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn another_process_is_refused_by_name_until_it_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:01:00.0");
    let holder = Holder::start(tmp.path(), a, None);
    let dir = ClaimDir::new(tmp.path());
    match dir.claim(a, &ClaimInfo::new()) {
        Err(ClaimError::Held {
            address,
            pid,
            command,
            ..
        }) => {
            assert_eq!(address, a);
            assert_eq!(pid, Some(holder.pid()));
            assert_eq!(command, Some(holder.comm()));
        }
        other => panic!("claimed a held device: {other:?}"),
    }
    let listed = dir.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].live);
    assert_eq!(listed[0].pid, Some(holder.pid()));
    assert_eq!(listed[0].state, Some(ClaimState::Active));

    holder.kill();
    let deadline = Instant::now() + Duration::from_secs(1);
    let claim = loop {
        match dir.claim(a, &ClaimInfo::new()) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("still held 1 s after SIGKILL: {e}"),
        }
    };
    assert_eq!(claim.address(), a);
    assert_eq!(dir.list().unwrap()[0].pid, Some(std::process::id()));
}

#[test]
fn a_program_the_holder_starts_does_not_inherit_the_claim() {
    // The lock file is opened O_CLOEXEC: a child that execs does not share the open file
    // description, so it cannot keep the claim alive after its parent dies.
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:01:00.0");
    let (holder, sleeper) = Holder::start_with(tmp.path(), a, None, true);
    let sleeper = sleeper.expect("the holder started a sleeper");
    let dir = ClaimDir::new(tmp.path());
    assert!(dir.claim(a, &ClaimInfo::new()).is_err());
    holder.kill();
    let deadline = Instant::now() + Duration::from_secs(1);
    let claimed = loop {
        match dir.claim(a, &ClaimInfo::new()) {
            Ok(_) => break true,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break false,
        }
    };
    let _ = Command::new("kill").args(["-9", &sleeper.to_string()]).status();
    assert!(claimed, "the holder's child kept the claim");
}

#[test]
fn a_release_in_another_process_reaches_our_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:01:00.0");
    let other = addr("0000:02:00.0");
    let holder = Holder::start(tmp.path(), a, Some("vfio removal request"));
    let dir = ClaimDir::new(tmp.path());
    // A claim of ours that is merely active is not a removal.
    let _ours = dir.claim(other, &ClaimInfo::new()).unwrap();

    let listed = dir.list().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0].state,
        Some(ClaimState::Releasing {
            reason: "vfio removal request".into()
        })
    );
    let releasing = dir.releasing().unwrap();
    assert_eq!(releasing.len(), 1);
    assert_eq!(
        (
            releasing[0].address,
            releasing[0].pid,
            releasing[0].reason.as_str()
        ),
        (a, holder.pid(), "vfio removal request")
    );

    // A claimant is told the device should be free soon.
    match dir.claim(a, &ClaimInfo::new()) {
        Err(ClaimError::Held { pid, releasing, .. }) => {
            assert_eq!(pid, Some(holder.pid()));
            assert_eq!(releasing.as_deref(), Some("vfio removal request"));
        }
        other => panic!("claimed a held device: {other:?}"),
    }

    let registry = RemovalRegistry::new();
    assert_eq!(dir.feed(&registry).unwrap(), vec![a]);
    let pending = registry.get(a).expect("marked");
    assert_eq!(
        pending.reason,
        Reason::Other(format!(
            "being released by PID {} ({}): vfio removal request",
            holder.pid(),
            holder.comm()
        ))
    );
    assert!(!registry.is_pending(other));
    // Feeding again changes nothing.
    assert_eq!(dir.feed(&registry).unwrap(), vec![]);
    assert!(registry.is_pending(a));

    // The holder is gone: its release is over, and the mark goes with it.
    holder.kill();
    dir.feed(&registry).unwrap();
    assert!(!registry.is_pending(a));
}

#[test]
fn a_mark_with_reasons_of_our_own_stays_when_the_release_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:01:00.0");
    let holder = Holder::start(tmp.path(), a, Some("unbind"));
    let dir = ClaimDir::new(tmp.path());
    let registry = RemovalRegistry::new();
    dir.feed(&registry).unwrap();
    registry.mark(a, Reason::Uevent);
    holder.kill();
    dir.feed(&registry).unwrap();
    assert!(
        registry.is_pending(a),
        "the uevent's mark is not the claim's to take back"
    );
}

#[test]
fn a_stale_record_is_listed_as_stale_and_is_claimable() {
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:03:00.0");
    std::fs::write(
        tmp.path().join("0000:03:00.0.lock"),
        "pid=999999\ncomm=gone\nsince=1\nreason=REQ\nstate=releasing\n",
    )
    .unwrap();
    // Not a claim: ignored.
    std::fs::write(tmp.path().join("notes.txt"), "x").unwrap();
    let dir = ClaimDir::new(tmp.path());

    let listed = dir.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].address, a);
    assert!(!listed[0].live);
    assert_eq!(listed[0].pid, Some(999_999));
    assert_eq!(listed[0].command.as_deref(), Some("gone"));
    // A dead holder releases nothing.
    assert_eq!(dir.releasing().unwrap(), vec![]);

    let claim = dir.claim(a, &ClaimInfo::new().driver("nvme")).unwrap();
    let listed = dir.list().unwrap();
    assert!(listed[0].live);
    assert_eq!(listed[0].pid, Some(std::process::id()));
    assert_eq!(listed[0].driver.as_deref(), Some("nvme"));
    assert_eq!(listed[0].state, Some(ClaimState::Active));

    // Released cleanly: the file stays, empty, and is not listed.
    drop(claim);
    assert_eq!(dir.list().unwrap(), vec![]);
    assert!(tmp.path().join("0000:03:00.0.lock").exists());
    dir.claim(a, &ClaimInfo::new()).unwrap();
}

#[test]
fn closing_another_fd_of_the_lock_file_keeps_the_claim() {
    // SPDK's F_SETLK claim is lost here: record locks go with any close in the process.
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:01:00.0");
    let dir = ClaimDir::new(tmp.path());
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    drop(std::fs::read_to_string(claim.path()).unwrap());
    assert!(matches!(
        dir.claim(a, &ClaimInfo::new()),
        Err(ClaimError::Held { .. })
    ));
    assert!(dir.list().unwrap()[0].live);
}

#[test]
fn the_directory_is_created_by_the_first_claim_and_not_by_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run/pcibus/claims");
    let dir = ClaimDir::new(&path);
    assert_eq!(dir.list().unwrap(), vec![]);
    assert_eq!(dir.feed(&RemovalRegistry::new()).unwrap(), vec![]);
    assert!(!path.exists());
    let _c = dir.claim(addr("0000:01:00.0"), &ClaimInfo::new()).unwrap();
    assert!(path.join("0000:01:00.0.lock").is_file());
}

#[test]
fn an_explicit_release_frees_the_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let a = addr("0000:01:00.0");
    let dir = ClaimDir::new(tmp.path());
    dir.claim(a, &ClaimInfo::new()).unwrap().release().unwrap();
    let again = dir.claim(a, &ClaimInfo::new()).unwrap();
    again.mark_releasing("test").unwrap();
    assert_eq!(dir.releasing().unwrap()[0].pid, std::process::id());
    // Our own releases are not fed: this process knows them.
    assert_eq!(dir.feed(&RemovalRegistry::new()).unwrap(), vec![]);
}

#[test]
fn pcibus_claims_lists_live_and_stale_claims() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("0000:03:00.0.lock"),
        "pid=999999\ncomm=gone\nsince=1\nstate=active\n",
    )
    .unwrap();
    let dir = ClaimDir::new(tmp.path());
    let claim = dir
        .claim(
            addr("0000:01:00.0"),
            &ClaimInfo::new().command("fio").driver("nvme"),
        )
        .unwrap();
    claim.mark_releasing("vfio removal request").unwrap();
    let pcibus = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pcibus"))
            .arg("claims")
            .args(args)
            .env("PCIBUS_CLAIM_DIR", tmp.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&pcibus(&["--json"])).unwrap();
    let me = std::process::id();
    let lock = |a: &str| tmp.path().join(format!("{a}.lock")).to_str().unwrap().to_owned();
    assert_eq!(
        json,
        serde_json::json!([
            {"address": "0000:01:00.0", "path": lock("0000:01:00.0"), "live": true,
             "pid": me, "command": "fio", "since": json[0]["since"], "driver": "nvme",
             "physfn": null, "state": "releasing", "reason": "vfio removal request"},
            {"address": "0000:03:00.0", "path": lock("0000:03:00.0"), "live": false,
             "pid": 999999, "command": "gone", "since": 1, "driver": null, "physfn": null,
             "state": "active", "reason": null},
        ])
    );
    let table = pcibus(&[]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1].starts_with("0000:01:00.0"), "{table}");
    assert!(
        lines[1].contains(" releasing ") && lines[1].ends_with(" vfio removal request"),
        "{table}"
    );
    assert!(lines[2].contains(" stale "), "{table}");
    // --claim-dir wins over the environment.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        pcibus(&["--json", "--claim-dir", empty.path().to_str().unwrap()]),
        "[]\n"
    );
}

#[test]
fn a_scan_keeps_away_from_a_device_another_process_is_releasing() {
    use pcibus::testing::FakeSysfs;
    use pcibus::{BlockingAttr, ProblemKind, Scanner, SysfsRoot};
    use std::sync::Arc;
    let fake = FakeSysfs::new().unwrap();
    // Its uevent never answers: reading it would cost the whole 5 s deadline.
    fake.device("0000:01:00.0").fifo("uevent").create().unwrap();
    fake.device("0000:02:00.0").create().unwrap();
    let claims = tempfile::tempdir().unwrap();
    let _holder = Holder::start(claims.path(), addr("0000:01:00.0"), Some("REQ"));
    let registry = Arc::new(RemovalRegistry::new());
    let scanner = Scanner::new(SysfsRoot::new(fake.root()))
        .registry(Arc::clone(&registry))
        .claim_dir(Arc::new(ClaimDir::new(claims.path())))
        .read_blocking(BlockingAttr::Uevent)
        .timeout(Duration::from_secs(5));
    let t0 = Instant::now();
    let scan = scanner.scan().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let held = scan.get(addr("0000:01:00.0")).unwrap();
    assert!(held.removal_pending);
    // The record says who releases it and why.
    assert_eq!(held.removal_reasons.len(), 1, "{:?}", held.removal_reasons);
    let why = &held.removal_reasons[0];
    assert!(
        why.contains("being released by PID") && why.contains("REQ"),
        "{why}"
    );
    assert_eq!(
        held.problem("uevent").map(|p| &p.kind),
        Some(&ProblemKind::RemovalPending)
    );
    let other = scan.get(addr("0000:02:00.0")).unwrap();
    assert!(!other.removal_pending && other.uevent.is_some());
    let reason = registry.get(addr("0000:01:00.0")).unwrap().reason.to_string();
    assert!(reason.contains("PID") && reason.contains("REQ"), "{reason}");
}

#[test]
fn a_scan_keeps_away_from_the_pf_of_a_vf_another_process_is_releasing() {
    // Issue 14 §1: `echo 0 > PF/sriov_numvfs` holds the PF's device lock while the VF's
    // holder (another process) releases it; by then the kernel has removed the VF's
    // `physfn` link, so only the claim record can say which PF it was.
    use pcibus::testing::FakeSysfs;
    use pcibus::{BlockingAttr, ProblemKind, Scanner, SysfsRoot};
    use std::sync::Arc;
    let fake = FakeSysfs::new().unwrap();
    // The PF's lock-taking attributes never answer: reading one costs the whole deadline.
    let mut pf = fake.device("0000:01:00.0").sriov_numvfs(1);
    for attr in BlockingAttr::ALL {
        pf = pf.fifo(attr.name());
    }
    pf.create().unwrap();
    // The VF is still listed, its `physfn` link already gone.
    fake.device("0000:01:00.1").create().unwrap();
    let claims = tempfile::tempdir().unwrap();
    let _holder = Holder::start_vf(claims.path(), addr("0000:01:00.1"), addr("0000:01:00.0"), "REQ");
    let scanner = BlockingAttr::ALL.into_iter().fold(
        Scanner::new(SysfsRoot::new(fake.root()))
            .registry(Arc::new(RemovalRegistry::new()))
            .claim_dir(Arc::new(ClaimDir::new(claims.path())))
            .timeout(Duration::from_secs(5)),
        Scanner::read_blocking,
    );
    let t0 = Instant::now();
    let scan = scanner.scan().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let pf = scan.get(addr("0000:01:00.0")).unwrap();
    for attr in BlockingAttr::ALL {
        assert_eq!(
            pf.problem(attr.name()).map(|p| &p.kind),
            Some(&ProblemKind::RemovalPending),
            "{attr:?}"
        );
    }
    assert!(!pf.removal_pending, "the PF itself is not being removed");
    assert!(scan.get(addr("0000:01:00.1")).unwrap().removal_pending);
}

#[test]
fn claims_of_holders_in_another_pid_namespace_are_listed_without_waiting() {
    // Issue 14 §4: a holder in a container writes the PID it sees, which names no process
    // here. The lock says the claim is live; its complete record is believed at once (the
    // old code re-read each such record for 50 ms, on every scan).
    let tmp = tempfile::tempdir().unwrap();
    let dir = ClaimDir::new(tmp.path());
    let n = 20;
    let mut claims = Vec::new();
    for i in 0..n {
        let a = addr(&format!("0000:{i:02x}:00.0"));
        let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
        // Another description of the file, as the holder's own writes would be.
        std::fs::write(
            dir.file_of(a),
            "pid=4000000\ncomm=spdk_tgt\nsince=1764110400\nstate=active\n",
        )
        .unwrap();
        claims.push(claim);
    }
    let t0 = Instant::now();
    let listed = dir.list().unwrap();
    let took = t0.elapsed();
    assert_eq!(listed.len(), n);
    assert!(listed.iter().all(|r| r.live && r.pid == Some(4_000_000)));
    // The old code slept 50 ms per record: at least a second for these.
    assert!(took < Duration::from_millis(500), "{took:?}");
}

// ---------------------------------------------------------------------------- SPDK

/// `hold PATH` or `try PATH`: the helper claims SPDK's way on PATH (below). `hold` keeps
/// the lock: prints "spdk ready" and waits to be killed. `try` prints "spdk locked" or
/// "spdk refused ERRNO pid=N" (N read from the file, as SPDK reports it) and exits.
const SPDK_ENV: &str = "PCIBUS_TEST_SPDK";

/// What `spdk_pci_device_claim` does: open `O_RDWR | O_CREAT` mode 0600, truncate to
/// `sizeof(int)`, `F_SETLK` a write lock on the whole file, write the PID (SPDK writes
/// through a shared mapping; `pwrite` reaches the same page cache). On failure, the PID
/// in the file.
fn spdk_claim(path: &Path) -> Result<std::fs::File, (nix::errno::Errno, i32)> {
    use nix::fcntl::{FcntlArg, fcntl};
    use nix::libc;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.set_len(4).unwrap();
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    if let Err(e) = fcntl(&file, FcntlArg::F_SETLK(&lock)) {
        let mut pid = [0u8; 4];
        file.read_exact_at(&mut pid, 0).unwrap();
        return Err((e, i32::from_ne_bytes(pid)));
    }
    file.write_all_at(&(std::process::id() as i32).to_ne_bytes(), 0)
        .unwrap();
    Ok(file)
}

#[test]
fn spdk_helper() {
    let Ok(spec) = std::env::var(SPDK_ENV) else {
        return;
    };
    let (what, path) = spec.split_once(' ').unwrap();
    match (what, spdk_claim(Path::new(path))) {
        ("hold", Ok(_file)) => {
            println!("\nspdk ready");
            std::thread::sleep(Duration::from_secs(60));
        }
        ("try", Ok(_)) => println!("\nspdk locked"),
        (_, Err((errno, pid))) => println!("\nspdk refused {errno:?} pid={pid}"),
        _ => unreachable!(),
    }
}

/// A process claiming SPDK's way; a holder is killed (SIGKILL) when dropped.
struct Spdk(Child);

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

impl Spdk {
    // The helper, what it said, and the rest of what it says.
    fn spawn(what: &str, path: &Path) -> (Child, String, Lines) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "spdk_helper", "--nocapture", "--test-threads=1"])
            .env(SPDK_ENV, format!("{what} {}", path.display()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in out.by_ref().map_while(Result::ok) {
            if let Some(said) = line.strip_prefix("spdk ") {
                return (child, said.to_owned(), out);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the SPDK helper said nothing");
    }

    /// Takes SPDK's lock on `path` and keeps it.
    fn hold(path: &Path) -> Spdk {
        match Self::spawn("hold", path) {
            // It says nothing more: its stdout may close.
            (child, said, _) if said == "ready" => Spdk(child),
            (_, said, _) => panic!("SPDK could not lock {}: {said}", path.display()),
        }
    }

    /// Tries SPDK's lock on `path` once, in another process: "locked", or "refused
    /// ERRNO pid=N".
    fn attempt(path: &Path) -> String {
        let (mut child, said, rest) = Self::spawn("try", path);
        // Read to the end: the test harness in it still reports.
        rest.for_each(drop);
        assert!(child.wait().unwrap().success());
        said
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Spdk {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// A claims directory and an SPDK lock directory, both temporary.
fn with_spdk() -> (tempfile::TempDir, tempfile::TempDir, ClaimDir) {
    let claims = tempfile::tempdir().unwrap();
    let spdk = tempfile::tempdir().unwrap();
    let dir = ClaimDir::new(claims.path()).spdk_lock_dir(Some(spdk.path().to_owned()));
    (claims, spdk, dir)
}

#[test]
fn a_device_spdk_holds_is_refused_naming_spdks_process() {
    let (_claims, spdk_dir, dir) = with_spdk();
    let a = addr("0000:01:00.0");
    let path = spdk_dir.path().join("spdk_pci_lock_0000:01:00.0");
    assert_eq!(dir.spdk_lock_file(a), Some(path.clone()));
    let spdk = Spdk::hold(&path);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", spdk.pid())).unwrap();
    let e = dir.claim(a, &ClaimInfo::new()).unwrap_err();
    match &e {
        ClaimError::HeldBySpdk {
            address,
            pid,
            command,
            path: p,
            ..
        } => {
            assert_eq!(*address, a);
            assert_eq!(*pid, Some(spdk.pid()));
            assert_eq!(command.as_deref(), Some(comm.trim_end()));
            assert_eq!(*p, path);
        }
        other => panic!("claimed a device SPDK holds: {other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!(
            "0000:01:00.0 is claimed by SPDK: PID {} ({}), lock file {}",
            spdk.pid(),
            comm.trim_end(),
            path.display()
        )
    );
    // Our own claim was dropped again: nothing listed, free for the next claimant.
    assert_eq!(dir.list().unwrap(), vec![]);
    assert!(ClaimDir::new(dir.path()).claim(a, &ClaimInfo::new()).is_ok());

    drop(spdk);
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    assert_eq!(claim.spdk_lock_file(), Some(path.as_path()));
}

#[test]
fn spdk_is_refused_while_we_hold_the_claim_and_is_told_our_pid() {
    let (_claims, spdk_dir, dir) = with_spdk();
    let a = addr("0000:01:00.0");
    let path = spdk_dir.path().join("spdk_pci_lock_0000:01:00.0");
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    assert_eq!(claim.spdk_lock_file(), Some(path.as_path()));
    let said = Spdk::attempt(&path);
    let me = std::process::id();
    assert!(
        said == format!("refused EAGAIN pid={me}") || said == format!("refused EACCES pid={me}"),
        "{said}"
    );
    // Closing another fd of the file in this process does not drop an OFD lock.
    drop(std::fs::read(&path).unwrap());
    assert!(Spdk::attempt(&path).starts_with("refused"));

    drop(claim);
    assert!(path.exists(), "the file stays");
    assert_eq!(Spdk::attempt(&path), "locked");
    // The same after an explicit release.
    dir.claim(a, &ClaimInfo::new()).unwrap().release().unwrap();
    assert_eq!(Spdk::attempt(&path), "locked");
}

#[test]
fn a_pcibus_claiming_in_another_directory_is_refused_through_spdks_file() {
    // Root's claims in /run/pcibus/claims and a user's in its runtime directory do not see
    // each other; SPDK's file is common to both, and names the holder.
    let (_claims, spdk_dir, dir) = with_spdk();
    let elsewhere = tempfile::tempdir().unwrap();
    let other = ClaimDir::new(elsewhere.path()).spdk_lock_dir(Some(spdk_dir.path().to_owned()));
    let a = addr("0000:01:00.0");
    let _claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    match other.claim(a, &ClaimInfo::new()) {
        Err(ClaimError::HeldBySpdk { pid, command, .. }) => {
            // An OFD lock has no PID to report: this one comes from the file.
            assert_eq!(pid, Some(std::process::id()));
            assert!(command.is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_claim_dir_without_an_spdk_directory_leaves_spdks_files_alone() {
    let claims = tempfile::tempdir().unwrap();
    let spdk_dir = tempfile::tempdir().unwrap();
    let path = spdk_dir.path().join("spdk_pci_lock_0000:01:00.0");
    let _spdk = Spdk::hold(&path);
    let dir = ClaimDir::new(claims.path());
    let a = addr("0000:01:00.0");
    assert_eq!(dir.spdk_lock_file(a), None);
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    assert_eq!(claim.spdk_lock_file(), None);
}

#[test]
fn in_another_users_sticky_directory_spdks_file_is_used_but_never_created() {
    // /var/tmp: a file a user creates there would, with fs.protected_regular, keep root's
    // SPDK from opening it. Only the directory's owner creates it.
    if !nix::unistd::geteuid().is_root() {
        skip::skip("needs root (to give the directory away)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let (_claims, spdk_dir, dir) = with_spdk();
    std::os::unix::fs::chown(spdk_dir.path(), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(spdk_dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let a = addr("0000:01:00.0");
    let path = spdk_dir.path().join("spdk_pci_lock_0000:01:00.0");
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    assert_eq!(claim.spdk_lock_file(), None);
    assert!(!path.exists());
    drop(claim);
    // SPDK's own file is locked as usual.
    assert_eq!(Spdk::attempt(&path), "locked");
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    assert_eq!(claim.spdk_lock_file(), Some(path.as_path()));
    assert!(Spdk::attempt(&path).starts_with("refused"));
}

#[test]
fn a_lock_file_with_other_links_is_probed_but_never_written() {
    // Another name of the file may be anyone's file (a hard link planted in /var/tmp):
    // SPDK's lock on it is still seen, as by a process that may only read it.
    let (_claims, spdk_dir, dir) = with_spdk();
    let a = addr("0000:01:00.0");
    let path = spdk_dir.path().join("spdk_pci_lock_0000:01:00.0");
    let spdk = Spdk::hold(&path);
    std::fs::hard_link(&path, spdk_dir.path().join("other-name")).unwrap();
    match dir.claim(a, &ClaimInfo::new()) {
        Err(ClaimError::HeldBySpdk { pid, .. }) => assert_eq!(pid, Some(spdk.pid())),
        other => panic!("{other:?}"),
    }
    drop(spdk);
    std::fs::write(&path, "keep").unwrap();
    let claim = dir.claim(a, &ClaimInfo::new()).unwrap();
    assert_eq!(claim.spdk_lock_file(), None);
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
}

#[test]
fn a_symlink_in_place_of_the_lock_file_is_not_followed() {
    // In /var/tmp anyone may plant one, pointing at a file of root's that writing our PID
    // would damage. SPDK would follow it: the claim fails rather than guess.
    let (_claims, spdk_dir, dir) = with_spdk();
    let victim = spdk_dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let path = spdk_dir.path().join("spdk_pci_lock_0000:01:00.0");
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let e = dir.claim(addr("0000:01:00.0"), &ClaimInfo::new()).unwrap_err();
    assert!(
        matches!(&e, ClaimError::Io { op: "open", path: p, .. } if *p == path),
        "{e:?}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(dir.list().unwrap(), vec![]);
}

// A PCI device of this machine, if /sys is the kernel's sysfs and lists one.
fn a_device_of_this_machine() -> Option<PciAddress> {
    let sysfs = pcibus::SysfsRoot::new("/sys");
    if !pcibus::sysfs::bind::is_kernel_sysfs(&sysfs) {
        return None;
    }
    std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| e.file_name().to_str()?.parse().ok())
}

// `pcibus vfio info ADDRESS` of this machine, claiming in `claims`, SPDK's files in `spdk`.
fn pcibus_vfio_info(address: PciAddress, claims: &Path, spdk: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .args(["--sysfs", "/sys", "vfio", "info", &address.to_string()])
        .env("PCIBUS_CLAIM_DIR", claims)
        .env("PCIBUS_SPDK_LOCK_DIR", spdk)
        .env_remove("PCIBUS_SYSFS")
        .env_remove("SYSFS_PCI_DEVICES")
        .output()
        .unwrap()
}

#[test]
fn pcibus_vfio_info_refuses_a_claimed_device_before_opening_anything() {
    // Opening a device through VFIO resets it: not under another owner's feet. The claim
    // comes first, so the refusal names the holder even where VFIO is missing.
    let Some(a) = a_device_of_this_machine() else {
        skip::skip("no kernel sysfs with a PCI device here");
        return;
    };
    let claims = tempfile::tempdir().unwrap();
    let spdk_dir = tempfile::tempdir().unwrap();
    let holder = Holder::start(claims.path(), a, None);
    let o = pcibus_vfio_info(a, claims.path(), spdk_dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "pcibus: {a} is claimed by PID {} ({})\n",
            holder.pid(),
            holder.comm()
        )
    );
    drop(holder);

    // SPDK's claim refuses it the same way.
    let spdk = Spdk::hold(&spdk_dir.path().join(format!("spdk_pci_lock_{a}")));
    let o = pcibus_vfio_info(a, claims.path(), spdk_dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("pcibus: {a} is claimed by SPDK: PID {} (", spdk.pid())),
        "{err}"
    );
    // Its own claim was dropped again.
    assert_eq!(ClaimDir::new(claims.path()).list().unwrap(), vec![]);
}
