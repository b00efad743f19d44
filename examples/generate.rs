//! Generates a synthetic sysfs tree of N devices (PFs with VFs among them) that stays on
//! disk, for trying `pcibus list --sysfs DIR` at scale:
//!
//! `cargo run --release --example generate --features testing -- 4096 [PARENT_DIR]`
//! prints the root it made (delete it when done).
use pcibus::testing::{FakeSysfs, Synthetic};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: generate N [PARENT_DIR]");
    let fake = match args.next() {
        Some(parent) => FakeSysfs::new_in(parent),
        None => FakeSysfs::new(),
    }
    .expect("temp dir");
    Synthetic {
        pfs: n / 64,
        vfs_per_pf: 4,
        ..Synthetic::new(n)
    }
    .build(&fake)
    .expect("generate");
    println!("{}", fake.root().display());
    // Keep the tree: FakeSysfs deletes it on drop.
    std::mem::forget(fake);
}
