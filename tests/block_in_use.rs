//! The in-use check's `O_EXCL` probe against real block devices (issue 14 §5): a disk
//! another program holds exclusively — a filesystem mounted in another mount namespace, a
//! ZFS pool, a VM's disk — is seen as in use, which `/proc/self/mounts` alone misses. A
//! loop device stands in for the disk; skipped (with the reason printed) without root or
//! `losetup`.

#[path = "common/skip.rs"]
mod skip;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

use pcibus::sysfs::bind::held_exclusively;

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn loop_device(backing: &Path) -> Result<Loop, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

#[test]
fn a_block_device_held_exclusively_is_in_use_and_free_once_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(1 << 20).unwrap();
    let dev = match loop_device(&backing) {
        Ok(d) => d,
        Err(why) => {
            skip::skip(format!("needs a loop device: {why}"));
            return;
        }
    };
    let node = Path::new(&dev.0);
    assert!(!held_exclusively(node), "nobody holds {}", dev.0);
    // A plain open (a reader, `blkid`) is not an exclusive hold.
    let plain = std::fs::File::open(node).unwrap();
    assert!(!held_exclusively(node), "a plain open is not exclusive");
    drop(plain);
    // What a mount in another namespace, a ZFS pool or a VM's O_EXCL open does.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(node)
        .unwrap();
    assert!(held_exclusively(node), "{} is held exclusively", dev.0);
    drop(holder);
    assert!(!held_exclusively(node), "free again once let go");
    // Nothing there at all: not in use (and no panic).
    assert!(!held_exclusively(Path::new("/dev/pcibus-no-such-disk")));
}
