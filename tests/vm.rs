//! The VM suite (tests/vm/run: real kernels in QEMU) as a cargo test.
//!
//! It takes minutes, so a plain `cargo test` does not run it:
//!
//! - no `qemu-system-x86_64`: prints why it skipped and passes, or fails when
//!   `PCIBUS_REQUIRE_VM=1` (CI sets it, so a runner without QEMU cannot pass quietly);
//! - QEMU present: runs `tests/vm/run` and asserts it exits 0 when `PCIBUS_VM=1` or
//!   `PCIBUS_REQUIRE_VM=1`; otherwise prints how to ask for it and passes.
//!
//! Extra arguments for the harness can go in `PCIBUS_VM_ARGS` (e.g. `-k 6.12 -p sriov`).
//!
//! It is a plain program (`harness = false`), not a libtest test, so that what it prints,
//! the skip message above all, shows in `cargo test` output instead of being captured.

use std::path::Path;
use std::process::Command;

fn env_is_1(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(program);
            std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
        })
    })
}

fn main() {
    let required = env_is_1("PCIBUS_REQUIRE_VM");
    if !in_path("qemu-system-x86_64") {
        if required {
            eprintln!("vm: FAILED: PCIBUS_REQUIRE_VM=1 but qemu-system-x86_64 is not installed");
            std::process::exit(1);
        }
        println!(
            "vm: SKIPPED: the VM suite needs qemu-system-x86_64 (apt-get install qemu-system-x86); then tests/vm/run"
        );
        return;
    }
    if !required && !env_is_1("PCIBUS_VM") {
        println!(
            "vm: SKIPPED: the VM suite takes minutes; PCIBUS_VM=1 cargo test --test vm (or tests/vm/run) runs it"
        );
        return;
    }
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/run");
    let args: Vec<String> = std::env::var("PCIBUS_VM_ARGS")
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    eprintln!("running {} {}", run.display(), args.join(" "));
    let status = Command::new(&run)
        .args(&args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", run.display()));
    if !status.success() {
        eprintln!(
            "vm: FAILED: {} ({status}); its summary is above, logs in tests/vm/work/",
            run.display()
        );
        std::process::exit(1);
    }
    println!("vm: the VM suite passed");
}
