//! Scan speed on generated trees of 64, 1,024 and 4,096 devices, beside its baselines
//! measured in the same run: the syscall floor (the same opens, reads and readlinks in a
//! plain loop, nothing parsed) and the scan with every read guarded. Also: a scan of a tree
//! whose lock-taking attributes never answer, which should cost its deadline and little
//! more.
//!
//! `cargo bench --bench scan`. Trees are built once per size, in /dev/shm when it has room
//! (see `FakeSysfs::new`), so the figures are page-cached sysfs-like trees.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use divan::Bencher;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::Mode;
use pcibus::testing::{FakeSysfs, Synthetic};
use pcibus::{BlockingAttr, BlockingPool, IdSource, PoolLimits, Scanner, SysfsRoot};

fn main() {
    divan::main();
    // Statics are never dropped: delete the trees (hundreds of MB of tmpfs) explicitly.
    TREES.lock().unwrap().clear();
}

const SIZES: [usize; 3] = [64, 1024, 4096];

// The trees, kept until the end of main; `ROOTS` hands out their paths.
static TREES: Mutex<Vec<FakeSysfs>> = Mutex::new(Vec::new());

fn tree(n: usize) -> &'static Path {
    static ROOTS: [OnceLock<PathBuf>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = SIZES.iter().position(|&s| s == n).expect("a benchmark size");
    ROOTS[i].get_or_init(|| {
        let fake = FakeSysfs::new().expect("temp dir");
        // One PF with 4 VFs per 64 devices, like a host with a few SR-IOV NICs.
        Synthetic {
            pfs: n / 64,
            vfs_per_pf: 4,
            ..Synthetic::new(n)
        }
        .build(&fake)
        .expect("generate");
        let root = fake.root().to_path_buf();
        TREES.lock().unwrap().push(fake);
        root
    })
}

fn device_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("bus/pci/devices"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The files the scanner's fast path reads for a device that is not a PF: modalias,
/// revision, resource, numa_node, a probe of sriov_totalvfs, and three links.
const FILES: [(&str, usize); 5] = [
    ("modalias", 4096),
    ("revision", 4096),
    ("resource", 4096),
    ("numa_node", 4096),
    ("sriov_totalvfs", 4096),
];
const LINKS: [&str; 3] = ["physfn", "driver", "iommu_group"];

/// Baseline: a plain loop over the same files by full path, one thread, no parsing (what
/// a C loop with open/read/readlink does). Returns bytes read, so nothing is optimized out.
#[divan::bench(args = SIZES)]
fn floor_paths(b: Bencher, n: usize) {
    let root = tree(n);
    b.bench(|| {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        for dir in device_dirs(root) {
            for (f, len) in FILES {
                if let Ok(mut file) = std::fs::File::open(dir.join(f)) {
                    total += file.read(&mut buf[..len]).unwrap_or(0);
                }
            }
            for l in LINKS {
                total += std::fs::read_link(dir.join(l)).map_or(0, |t| t.as_os_str().len());
            }
        }
        total
    });
}

/// Baseline: the same, relative to a directory fd per device as the scanner does.
#[divan::bench(args = SIZES)]
fn floor_dirfd(b: Bencher, n: usize) {
    let root = tree(n);
    b.bench(|| {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        for dir in device_dirs(root) {
            let Ok(d) = nix::fcntl::open(&dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()) else {
                continue;
            };
            for (f, len) in FILES {
                if let Ok(fd) = openat(d.as_fd(), f, OFlag::O_RDONLY, Mode::empty()) {
                    total += nix::unistd::read(fd.as_fd(), &mut buf[..len]).unwrap_or(0);
                }
            }
            for l in LINKS {
                total += readlinkat(d.as_fd(), l).map_or(0, |t| t.len());
            }
        }
        total
    });
}

fn scanner(n: usize) -> Scanner {
    Scanner::new(SysfsRoot::new(tree(n)))
}

/// The scan as `pcibus list` runs it: a thread per core, ids from `modalias` and
/// `revision` (the default, [`IdSource::Files`]).
#[divan::bench(args = SIZES)]
fn scan(b: Bencher, n: usize) {
    let s = scanner(n);
    b.bench(|| s.scan().unwrap().devices.len());
}

/// The default scan with walkers sharing the process's fd table, the way the guarded
/// scan's pool threads must: the baseline for the cost of guarding.
#[divan::bench(args = SIZES)]
fn scan_shared_fd_table(b: Bencher, n: usize) {
    let s = scanner(n).private_fd_tables(false);
    b.bench(|| s.scan().unwrap().devices.len());
}

/// The scan on one thread, to compare with the one-thread floor.
#[divan::bench(args = SIZES)]
fn scan_one_thread(b: Bencher, n: usize) {
    let s = scanner(n).threads(1);
    b.bench(|| s.scan().unwrap().devices.len());
}

/// Ids from the six id files.
#[divan::bench(args = SIZES)]
fn scan_id_files(b: Bencher, n: usize) {
    let s = scanner(n).id_source(IdSource::IdFiles);
    b.bench(|| s.scan().unwrap().devices.len());
}

/// Ids from the config header, each header read guarded (through the pool, its own
/// deadline), as a `config` read can wait for a reset.
#[divan::bench(args = SIZES)]
fn scan_config_guarded(b: Bencher, n: usize) {
    let s = scanner(n).id_source(IdSource::Config);
    b.bench(|| s.scan().unwrap().devices.len());
}

/// The default ids and every blocking attribute asked for, with a 50 ms deadline per
/// read (`pcibus list --read all --timeout 50`): every read must complete.
#[divan::bench(args = SIZES, sample_count = 10)]
fn scan_read_all(b: Bencher, n: usize) {
    let s = BlockingAttr::ALL
        .into_iter()
        .fold(scanner(n), Scanner::read_blocking)
        .timeout(Duration::from_millis(50));
    b.bench(|| {
        let scan = s.scan().unwrap();
        assert!(scan.devices.iter().all(|d| d.problems.is_empty()));
        scan.devices.len()
    });
}

/// Every device read as one guarded job.
#[divan::bench(args = SIZES)]
fn scan_guard_everything(b: Bencher, n: usize) {
    let s = scanner(n).guard_everything(true);
    b.bench(|| s.scan().unwrap().devices.len());
}

/// A 1,024-device tree where K devices' lock-taking attributes never answer (FIFOs), with
/// all of them requested and a 100 ms deadline: the scan should take the deadline plus
/// the scan itself. (The stuck guard threads are released between samples.)
#[divan::bench(args = [1, 8, 64], sample_count = 5, sample_size = 1)]
fn blocked_attributes(b: Bencher, k: usize) {
    let fake = FakeSysfs::new().unwrap();
    let built = Synthetic::new(1024).build(&fake).unwrap();
    for a in built.iter().take(k) {
        let name = a.to_string();
        let dir = fake.device_dir(&name).unwrap();
        for attr in ["uevent", "driver_override"] {
            let rel = dir.join(attr);
            std::fs::remove_file(fake.root().join(&rel)).unwrap();
            fake.mkfifo(&rel).unwrap();
        }
    }
    // A pool of its own: the threads its FIFOs get stuck in must not change the shared
    // pool the other benchmarks use.
    let s = BlockingAttr::ALL
        .into_iter()
        .fold(Scanner::new(SysfsRoot::new(fake.root())), Scanner::read_blocking)
        .pool(BlockingPool::new(PoolLimits::default()))
        .timeout(Duration::from_millis(100));
    b.bench(|| {
        let scan = s.scan().unwrap();
        // Registry entries would make the next sample skip the reads: start afresh.
        for p in s.removal_registry().pending() {
            s.removal_registry().release(p.address);
        }
        fake.answer_fifos();
        scan.devices.len()
    });
}

/// The incremental map: one `change` event for one device of the tree applied to a map of
/// all of them (re-reads that device), to compare with `scan` of the same tree.
#[divan::bench(args = [4096])]
fn map_apply_event(b: Bencher, n: usize) {
    use pcibus::bus::map::DeviceMap;
    use pcibus::hotplug::event::{Action, Uevent};

    let mut map = DeviceMap::new(scanner(n)).unwrap();
    let address = map.iter().nth(map.len() / 2).unwrap().address;
    let devpath = format!("/devices/pci0000:00/{address}");
    let vars = vec![
        ("ACTION".to_string(), "change".to_string()),
        ("DEVPATH".to_string(), devpath.clone()),
        ("SUBSYSTEM".to_string(), "pci".to_string()),
        ("PCI_SLOT_NAME".to_string(), address.to_string()),
    ];
    let event = Uevent::from_vars(Action::Change, devpath, vars).unwrap();
    b.bench_local(|| map.apply(&event).unwrap());
}
