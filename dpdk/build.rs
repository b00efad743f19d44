//! Build script of the drop-in librte_bus_pci.so.23.
//!
//! 1. Finds DPDK 22.11's driver-SDK headers (`bus_driver.h`, `bus_pci_driver.h`,
//!    `dev_driver.h`): `$PCIBUS_DPDK_SDK`, or the tree `dpdk/fetch-sdk` cached. Debian's
//!    libdpdk-dev lacks them; they are never copied into the repository.
//! 2. Compiles and runs `src/layout_probe.c` against them and the installed public headers:
//!    it prints compile-time assertions (sizes, alignments, offsets of every field PMDs
//!    reach) that `src/ffi/types.rs` includes, so a layout that differs from the headers
//!    does not build.
//! 3. Links the cdylib the way DPDK's own is: SONAME `librte_bus_pci.so.23`, the version
//!    nodes of `abi/version.map`, against `librte_eal.so.23`, `librte_kvargs.so.23` and
//!    `librte_pci.so.23`, with `src/errno_shim.c` (the setter of the thread-local
//!    `rte_errno`) compiled in.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=PCIBUS_DPDK_SDK");
    println!("cargo:rerun-if-env-changed=PCIBUS_DPDK_CACHE");
    println!("cargo:rerun-if-changed=src/layout_probe.c");
    println!("cargo:rerun-if-changed=abi/version.map");

    let sdk = find_sdk(&manifest);
    println!("cargo:rerun-if-changed={}", sdk.display());
    let mut includes = vec![sdk.join("drivers/bus/pci"), sdk.join("lib/eal/include")];
    includes.extend(installed_includes());

    write_layout(&manifest, &out, &includes);

    let map = manifest.join("abi/version.map");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librte_bus_pci.so.23");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    println!("cargo:rerun-if-changed=src/errno_shim.c");
    cc::Build::new()
        .file(manifest.join("src/errno_shim.c"))
        .includes(&includes)
        .flag("-include")
        .flag("rte_config.h")
        .compile("pcibus_dpdk_errno_shim");
    println!("cargo:rustc-link-lib=dylib=rte_eal");
    println!("cargo:rustc-link-lib=dylib=rte_kvargs");
    println!("cargo:rustc-link-lib=dylib=rte_pci");
}

/// The unpacked dpdk source tree: `$PCIBUS_DPDK_SDK`, else what `fetch-sdk --info` prints.
fn find_sdk(manifest: &Path) -> PathBuf {
    let marker = "drivers/bus/pci/bus_pci_driver.h";
    if let Some(dir) = env::var_os("PCIBUS_DPDK_SDK") {
        let dir = PathBuf::from(dir);
        if !dir.join(marker).is_file() {
            panic!(
                "PCIBUS_DPDK_SDK={} has no {marker}: point it at an unpacked DPDK 22.11 \
                 source tree, or unset it and run dpdk/fetch-sdk",
                dir.display()
            );
        }
        return dir;
    }
    let script = manifest.join("fetch-sdk");
    let found = Command::new(&script)
        .arg("--info")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .filter(|d| d.join(marker).is_file());
    match found {
        Some(dir) => dir,
        None => panic!(
            "\n\nThe DPDK 22.11 driver-SDK headers ({marker} and friends) are not fetched.\n\
             Run `{}` once (it installs libdpdk-dev if needed and unpacks Debian's dpdk \
             source package into /var/cache/pcibus/dpdk), or set PCIBUS_DPDK_SDK to an \
             unpacked DPDK 22.11 source tree.\n\n",
            script.display()
        ),
    }
}

/// The installed DPDK's include directories (rte_config.h, rte_pci.h...), from pkg-config
/// when it knows libdpdk, else Debian's paths.
fn installed_includes() -> Vec<PathBuf> {
    let from_pkg_config = Command::new("pkg-config")
        .args(["--cflags-only-I", "libdpdk"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| {
            s.split_whitespace()
                .filter_map(|w| w.strip_prefix("-I"))
                .map(PathBuf::from)
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty());
    let dirs = from_pkg_config.unwrap_or_else(|| {
        vec![
            "/usr/include/dpdk".into(),
            "/usr/include/x86_64-linux-gnu/dpdk".into(),
        ]
    });
    if !dirs.iter().any(|d| d.join("rte_config.h").is_file()) {
        panic!(
            "DPDK's installed headers (rte_config.h) not found in {dirs:?}: install libdpdk-dev \
             (dpdk/fetch-sdk does)"
        );
    }
    dirs
}

/// Compiles and runs the layout probe; its stdout becomes `$OUT_DIR/layout.rs`.
fn write_layout(manifest: &Path, out: &Path, includes: &[PathBuf]) {
    let probe = out.join("layout_probe");
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .cargo_warnings(false)
        .get_compiler();
    let mut cmd = compiler.to_command();
    for dir in includes {
        cmd.arg("-I").arg(dir);
    }
    cmd.args([
        "-include",
        "rte_config.h",
        "-DALLOW_INTERNAL_API",
        "-DALLOW_EXPERIMENTAL_API",
    ])
    .arg(manifest.join("src/layout_probe.c"))
    .arg("-o")
    .arg(&probe);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cmd:?}: {e}"));
    assert!(status.success(), "compiling src/layout_probe.c failed: {cmd:?}");
    let output = Command::new(&probe)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", probe.display()));
    assert!(output.status.success(), "{} failed", probe.display());
    std::fs::write(out.join("layout.rs"), &output.stdout).expect("writing layout.rs into OUT_DIR");
}
