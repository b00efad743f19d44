//! The removal-safety layer under load: scans while every helper thread is stuck in the
//! kernel, and the registry those scans feed.

use std::sync::Arc;
use std::time::Duration;

use pcibus::testing::FakeSysfs;
use pcibus::{BlockingAttr, BlockingPool, PoolLimits, ProblemKind, RemovalRegistry, Scanner, SysfsRoot};

// The tests count this process's fds and memory: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

// Two devices whose `uevent` never answers (FIFOs), and 30 healthy ones.
fn tree() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    for n in 0..2 {
        fake.device(&format!("0000:01:{n:02x}.0"))
            .fifo("uevent")
            .create()
            .unwrap();
    }
    for n in 0..30 {
        fake.device(&format!("0000:02:{n:02x}.0")).create().unwrap();
    }
    fake
}

fn pool() -> BlockingPool {
    BlockingPool::new(PoolLimits {
        parallelism: 2,
        max_threads: 2,
        stall: Duration::from_millis(5),
        idle_exit: Duration::from_secs(1),
    })
}

fn scanner(fake: &FakeSysfs, pool: &BlockingPool, registry: &Arc<RemovalRegistry>) -> Scanner {
    Scanner::new(SysfsRoot::new(fake.root()))
        .pool(pool.clone())
        .registry(Arc::clone(registry))
        .read_blocking(BlockingAttr::Uevent)
        .timeout(Duration::from_millis(20))
        .threads(1)
}

#[test]
fn scans_while_every_helper_is_stuck_leave_fds_and_memory_flat() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for guard_everything in [false, true] {
        let fake = tree();
        let pool = pool();
        let registry = Arc::new(RemovalRegistry::new());
        let scanner = scanner(&fake, &pool, &registry).guard_everything(guard_everything);
        // The first scans get both helper threads stuck on the two FIFOs (the stall
        // threshold must pass before they count as stuck).
        for _ in 0..3 {
            scanner.scan().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(pool.stuck(), 2, "guard_everything={guard_everything}");
        let (fds, rss) = (open_fds(), rss_kib());
        for _ in 0..100 {
            let scan = scanner.scan().unwrap();
            // Nothing could start: every read is "not started" (the two stuck devices are
            // pending and not read at all), and no healthy device is marked.
            for dev in &scan.devices {
                assert!(
                    dev.problems.iter().all(|p| matches!(
                        p.kind,
                        ProblemKind::NotStarted { .. } | ProblemKind::RemovalPending
                    )),
                    "{}: {:?}",
                    dev.address,
                    dev.problems
                );
            }
            assert_eq!(pool.queued(), 0, "given-up jobs left the queue");
        }
        let (fds_after, rss_after) = (open_fds(), rss_kib());
        assert!(
            fds_after <= fds,
            "fds {fds} -> {fds_after} (guard_everything={guard_everything})"
        );
        assert!(
            rss_after < rss + 4096,
            "RSS {rss} KiB -> {rss_after} KiB (guard_everything={guard_everything})"
        );
        // Only the two stuck reads marked their devices; the healthy ones stay unmarked.
        let pending: Vec<String> = registry.pending().iter().map(|p| p.address.to_string()).collect();
        assert_eq!(pending, ["0000:01:00.0", "0000:01:01.0"]);
        // The stuck reads return: their marks go with them.
        fake.answer_fifos();
        let mut waited = 0;
        while !registry.is_empty() && waited < 200 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        assert!(registry.is_empty(), "{:?}", registry.pending());
    }
}

#[test]
fn walker_threads_leave_the_callers_fd_table_as_it_was() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Walkers unshare their fd table; nothing they open may leak into the caller's, and
    // the caller's own fds stay usable.
    let fake = FakeSysfs::new().unwrap();
    for n in 0..200 {
        fake.device(&format!("0000:03:{:02x}.{}", n / 8, n % 8))
            .create()
            .unwrap();
    }
    let probe = std::fs::File::open("/proc/self/status").unwrap();
    let before = open_fds();
    for _ in 0..20 {
        let scan = Scanner::new(SysfsRoot::new(fake.root()))
            .threads(4)
            .scan()
            .unwrap();
        assert_eq!(scan.devices.len(), 200);
    }
    assert_eq!(open_fds(), before);
    use std::io::Read;
    let mut text = String::new();
    (&probe).read_to_string(&mut text).unwrap();
    assert!(text.contains("VmRSS"));
}
