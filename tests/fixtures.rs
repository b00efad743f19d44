//! Checked-in fixtures, FakeSysfs and snapshot capture working together.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pcibus::fixture::{self, Entry, EntryKind, Fixture};
use pcibus::sysfs::snapshot::{self, CaptureOptions};
use pcibus::testing::{FakeSysfs, Synthetic};

fn fixture_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcifix"))
        .collect();
    files.sort();
    files
}

fn normalized(mut f: Fixture) -> Vec<Entry> {
    f.normalize();
    f.entries
}

fn kind<'a>(f: &'a Fixture, path: &str) -> &'a EntryKind {
    &f.get(path).unwrap_or_else(|| panic!("no entry {path}")).kind
}

fn file(f: &Fixture, path: &str) -> Vec<u8> {
    match kind(f, path) {
        EntryKind::File(data) => data.clone(),
        other => panic!("{path} is {other:?}"),
    }
}

fn link(f: &Fixture, path: &str) -> String {
    match kind(f, path) {
        EntryKind::Link(t) => t.to_string_lossy().into_owned(),
        other => panic!("{path} is {other:?}"),
    }
}

#[test]
fn checked_in_fixtures_round_trip_through_a_tree() {
    let files = fixture_files();
    assert!(files.len() >= 2, "{files:?}");
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        let parsed = fixture::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let fake = FakeSysfs::from_fixture_file(&path).unwrap();
        let captured = fake.capture();
        assert!(
            captured.notes.is_empty(),
            "{}: {:?}",
            path.display(),
            captured.notes
        );
        let (want, got) = (normalized(parsed.clone()), normalized(captured.clone()));
        if want != got {
            let want_text = fixture::write(&Fixture {
                entries: want,
                notes: vec![],
            });
            let got_text = fixture::write(&Fixture {
                entries: got,
                notes: vec![],
            });
            for (a, b) in want_text.lines().zip(got_text.lines()) {
                assert_eq!(a, b, "{}: first difference", path.display());
            }
            assert_eq!(
                want_text.lines().count(),
                got_text.lines().count(),
                "{}",
                path.display()
            );
        }
        // Writing the capture gives the checked-in text back, up to comments.
        let strip = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(&fixture::write(&captured)),
            strip(&text),
            "{}",
            path.display()
        );
    }
}

#[test]
fn this_machine_fixture_looks_like_a_virtio_vm() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/this-machine.pcifix");
    let f = fixture::parse(&fs::read_to_string(path).unwrap()).unwrap();
    let links: Vec<_> = f
        .entries
        .iter()
        .filter(|e| e.path.starts_with("bus/pci/devices") && matches!(e.kind, EntryKind::Link(_)))
        .collect();
    assert_eq!(links.len(), 6);
    let dev = "devices/pci0000:00/0000:00:04.0";
    assert_eq!(file(&f, &format!("{dev}/vendor")), b"0x1af4\n");
    assert_eq!(
        link(&f, &format!("{dev}/driver")),
        "../../../bus/pci/drivers/virtio-pci"
    );
    let config = file(&f, &format!("{dev}/config"));
    assert!(config.len() == 256 || config.len() == 4096, "{}", config.len());
    assert_eq!(&config[..2], &[0xf4, 0x1a]);
    // Never read: BAR mappings and triggers.
    assert_eq!(file(&f, &format!("{dev}/remove")), b"");
    assert_eq!(file(&f, "bus/pci/drivers/virtio-pci/bind"), b"");
}

#[test]
fn dpdk_legacy_fixture_has_the_historical_devices() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dpdk-legacy.pcifix");
    let fake = FakeSysfs::from_fixture_file(path).unwrap();
    let devices = fake.root().join("bus/pci/devices");
    let mut names: Vec<String> = fs::read_dir(&devices)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["0000:01:00.0", "0000:01:02.0", "0000:02:ab.0"]);
    let read = |p: &str| fs::read_to_string(devices.join(p)).unwrap();
    assert_eq!(read("0000:01:00.0/vendor"), "0x0001\n");
    assert_eq!(read("0000:01:00.0/numa_node"), "-1\n");
    assert_eq!(read("0000:01:00.0/resource").lines().count(), 13);
    assert_eq!(read("0000:01:02.0/class"), "0x100000\n");
    assert_eq!(read("0000:02:ab.0/device"), "0x4444\n");
    assert!(!devices.join("0000:01:00.0/config").exists());
}

#[test]
fn builder_writes_what_capture_reads() {
    let fake = FakeSysfs::new().unwrap();
    let dir = fake
        .device("0000:01:00.0")
        .vendor(0x8086)
        .device_id(0x0953)
        .class(0x010802)
        .revision(2)
        .subsystem(0x8086, 0x3702)
        .numa_node(1)
        .driver("nvme")
        .iommu_group(12)
        .resources(&[(0xfb410000, 0xfb413fff, 0x140204)])
        .class_dir("nvme/nvme0")
        .sriov_totalvfs(4)
        .sriov_numvfs(2)
        .attr("name", "hello")
        .create()
        .unwrap();
    assert_eq!(dir, fake.root().join("devices/pci0000:01/0000:01:00.0"));
    fake.device("0000:01:00.1")
        .physfn("0000:01:00.0")
        .vendor(0x8086)
        .create()
        .unwrap();
    fake.device("0000:01:00.2")
        .physfn("0000:01:00.0")
        .create()
        .unwrap();
    fake.device("0000:02:00.0").create().unwrap();

    let f = fake.capture();
    assert!(f.notes.is_empty(), "{:?}", f.notes);
    let d = "devices/pci0000:01/0000:01:00.0";
    assert_eq!(link(&f, "bus/pci/devices/0000:01:00.0"), format!("../../../{d}"));
    assert_eq!(file(&f, &format!("{d}/vendor")), b"0x8086\n");
    assert_eq!(file(&f, &format!("{d}/device")), b"0x0953\n");
    assert_eq!(file(&f, &format!("{d}/class")), b"0x010802\n");
    assert_eq!(file(&f, &format!("{d}/revision")), b"0x02\n");
    assert_eq!(file(&f, &format!("{d}/subsystem_device")), b"0x3702\n");
    assert_eq!(file(&f, &format!("{d}/numa_node")), b"1\n");
    assert_eq!(file(&f, &format!("{d}/name")), b"hello");
    assert_eq!(file(&f, &format!("{d}/sriov_totalvfs")), b"4\n");
    assert_eq!(file(&f, &format!("{d}/sriov_numvfs")), b"2\n");
    let resource = String::from_utf8(file(&f, &format!("{d}/resource"))).unwrap();
    assert_eq!(resource.lines().count(), 13);
    assert_eq!(
        resource.lines().next().unwrap(),
        "0x00000000fb410000 0x00000000fb413fff 0x0000000000140204"
    );
    let config = file(&f, &format!("{d}/config"));
    assert_eq!(config.len(), 256);
    assert_eq!(&config[0..4], &[0x86, 0x80, 0x53, 0x09]);
    assert_eq!(&config[8..12], &[0x02, 0x02, 0x08, 0x01]);
    assert_eq!(config[0x0e], 0);
    assert_eq!(&config[0x10..0x18], &[0x04, 0x00, 0x41, 0xfb, 0, 0, 0, 0]);
    assert_eq!(&config[0x2c..0x30], &[0x86, 0x80, 0x02, 0x37]);
    // Never read, but present.
    assert_eq!(file(&f, &format!("{d}/resource0")), b"");
    assert_eq!(file(&f, &format!("{d}/remove")), b"");
    assert_eq!(kind(&f, &format!("{d}/nvme/nvme0")), &EntryKind::Dir);
    assert_eq!(file(&f, &format!("{d}/power/control")), b"on\n");
    // Links, driver and group.
    assert_eq!(link(&f, &format!("{d}/driver")), "../../../bus/pci/drivers/nvme");
    assert_eq!(link(&f, &format!("{d}/subsystem")), "../../../bus/pci");
    assert_eq!(file(&f, "bus/pci/drivers/nvme/bind"), b"");
    assert_eq!(
        link(&f, &format!("{d}/iommu_group")),
        "../../../kernel/iommu_groups/12"
    );
    assert_eq!(file(&f, "kernel/iommu_groups/12/type"), b"DMA\n");
    assert_eq!(
        link(&f, "kernel/iommu_groups/12/devices/0000:01:00.0"),
        format!("../../../../{d}")
    );
    assert_eq!(link(&f, &format!("{d}/virtfn0")), "../0000:01:00.1");
    assert_eq!(link(&f, &format!("{d}/virtfn1")), "../0000:01:00.2");
    assert_eq!(
        link(&f, "devices/pci0000:01/0000:01:00.1/physfn"),
        "../0000:01:00.0"
    );
    // Defaults.
    let d2 = "devices/pci0000:02/0000:02:00.0";
    assert_eq!(file(&f, &format!("{d2}/vendor")), b"0x8086\n");
    assert_eq!(file(&f, &format!("{d2}/numa_node")), b"0\n");
    assert!(f.get(format!("{d2}/driver")).is_none());

    // And the capture materializes to a tree that captures the same.
    let again = FakeSysfs::new().unwrap();
    again.materialize(&f).unwrap();
    assert_eq!(normalized(again.capture()), normalized(f));
}

#[test]
fn builder_variants() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:03:00.0")
        .without("config")
        .without("power")
        .resource_text("garbage\n")
        .config(vec![1, 2, 3])
        .create()
        .unwrap();
    let d = fake.root().join("devices/pci0000:03/0000:03:00.0");
    assert!(!d.join("config").exists());
    assert!(!d.join("power").exists());
    assert_eq!(fs::read(d.join("resource")).unwrap(), b"garbage\n");
    fake.device("0000:04:00.0")
        .parent_dir("devices/pci0000:00/0000:00:1c.0")
        .create()
        .unwrap();
    assert_eq!(
        fs::read_link(fake.root().join("bus/pci/devices/0000:04:00.0")).unwrap(),
        Path::new("../../../devices/pci0000:00/0000:00:1c.0/0000:04:00.0")
    );
    // A second create of the same device fails; bad names are refused.
    assert!(fake.device("0000:03:00.0").create().is_err());
    assert!(fake.device("../x").create().is_err());
    assert!(fake.device("a/b").create().is_err());
    assert!(fake.device("0000:05:00.0").driver("../../x").create().is_err());
}

#[test]
fn capture_never_reads_a_fifo_and_records_it() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:01:00.0")
        .fifo("uevent")
        .fifo("sriov_numvfs")
        .create()
        .unwrap();
    let f = fake.capture();
    assert_eq!(
        kind(&f, "devices/pci0000:01/0000:01:00.0/uevent"),
        &EntryKind::Fifo
    );
    assert_eq!(
        kind(&f, "devices/pci0000:01/0000:01:00.0/sriov_numvfs"),
        &EntryKind::Fifo
    );
    let text = fixture::write(&f);
    assert!(text.contains("\nfifo devices/pci0000:01/0000:01:00.0/uevent\n"));
    let again = FakeSysfs::from_fixture(&text).unwrap();
    let meta = fs::symlink_metadata(again.root().join("devices/pci0000:01/0000:01:00.0/uevent")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
}

#[test]
fn locked_attributes_go_through_the_given_reader() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:01:00.0")
        .sriov_totalvfs(8)
        .attr("vpd", b"\x82\x05Hello".to_vec())
        .create()
        .unwrap();
    let options = CaptureOptions {
        locked_reader: Some(Box::new(|path: &Path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            Ok(format!("guarded {name}\n").into_bytes())
        })),
        ..CaptureOptions::default()
    };
    let f = snapshot::capture(fake.root(), &options).unwrap();
    let d = "devices/pci0000:01/0000:01:00.0";
    assert_eq!(file(&f, &format!("{d}/uevent")), b"guarded uevent\n");
    assert_eq!(file(&f, &format!("{d}/sriov_numvfs")), b"guarded sriov_numvfs\n");
    assert_eq!(
        file(&f, &format!("{d}/driver_override")),
        b"guarded driver_override\n"
    );
    // `config` and `vpd` wait while the function is being reset.
    assert_eq!(file(&f, &format!("{d}/config")), b"guarded config\n");
    assert_eq!(file(&f, &format!("{d}/vpd")), b"guarded vpd\n");
    assert_eq!(file(&f, &format!("{d}/vendor")), b"0x8086\n");
    // A reader error is recorded as an empty file and a note.
    let options = CaptureOptions {
        locked_reader: Some(Box::new(|_: &Path| {
            Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })),
        ..CaptureOptions::default()
    };
    let f = snapshot::capture(fake.root(), &options).unwrap();
    assert_eq!(file(&f, &format!("{d}/uevent")), b"");
    assert!(
        f.notes.iter().any(|n| n.contains("uevent: read error")),
        "{:?}",
        f.notes
    );
    assert!(fixture::write(&f).contains("\n# devices/pci0000:01/0000:01:00.0/uevent: read error"));
}

/// Opens `path` for reading in a thread; the receiver gets what it read.
fn reader(path: PathBuf) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = fs::File::open(path).and_then(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v).map(|_| v)
        });
        let _ = tx.send(result);
    });
    rx
}

#[test]
fn fifo_blocks_until_answered() {
    let fake = FakeSysfs::new().unwrap();
    let dir = fake.device("0000:01:00.0").fifo("uevent").create().unwrap();
    let rx = reader(dir.join("uevent"));
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the read should block"
    );
    // The reader may not have reached open() yet: answer until it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake
        .answer_fifo("devices/pci0000:01/0000:01:00.0/uevent", b"DRIVER=x\n")
        .unwrap()
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
        b"DRIVER=x\n"
    );
    // Nobody waiting: nothing to answer.
    assert_eq!(fake.answer_fifos(), 0);
    let rx = reader(dir.join("uevent"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.answer_fifos() == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(), b"");
}

#[test]
fn drop_releases_blocked_readers() {
    let fake = FakeSysfs::new().unwrap();
    let dir = fake
        .device("0000:01:00.0")
        .fifo("driver_override")
        .create()
        .unwrap();
    let rx = reader(dir.join("driver_override"));
    std::thread::sleep(Duration::from_millis(100));
    drop(fake);
    match rx
        .recv_timeout(Duration::from_secs(10))
        .expect("reader still blocked after drop")
    {
        Ok(data) => assert_eq!(data, b""),
        // It had not opened the FIFO yet when the tree went away.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
}

#[test]
fn removed_device_leaves_a_dangling_link() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:01:00.0")
        .driver("vfio-pci")
        .iommu_group(3)
        .create()
        .unwrap();
    fake.device("0000:01:00.1").create().unwrap();
    fake.remove_device("0000:01:00.0").unwrap();
    let link = fake.root().join("bus/pci/devices/0000:01:00.0");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(!link.exists());
    let f = fake.capture();
    assert!(f.notes.is_empty(), "{:?}", f.notes);
    assert!(f.get("devices/pci0000:01/0000:01:00.0/vendor").is_none());
    assert_eq!(
        link_of(&f, "bus/pci/devices/0000:01:00.0"),
        "../../../devices/pci0000:01/0000:01:00.0"
    );
    assert!(f.get("devices/pci0000:01/0000:01:00.1/vendor").is_some());
    assert!(fake.remove_device("0000:09:00.0").is_err());
}

fn link_of(f: &Fixture, path: &str) -> String {
    link(f, path)
}

#[test]
fn junk_in_the_device_list_is_captured_not_followed() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:01:00.0")
        .attr("huge", vec![b'x'; 1 << 20])
        .create()
        .unwrap();
    fake.junk_file("README", b"not a device\n").unwrap();
    fake.junk_link("escape", "../../../../../../../../etc").unwrap();
    fake.junk_link("absolute", "/etc").unwrap();
    fake.junk_link("self", "self").unwrap();
    fake.link_loop("loop").unwrap();
    fake.junk_link("dangling", "../../../devices/nowhere").unwrap();
    fake.mkdir("bus/pci/devices/0000:0g:00.0").unwrap();
    fake.mkfifo("bus/pci/devices/pipe").unwrap();
    fake.symlink("bus/pci/devices/weird name\n%", "x y").unwrap();

    let start = Instant::now();
    let f = fake.capture();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(file(&f, "bus/pci/devices/README"), b"not a device\n");
    assert_eq!(link(&f, "bus/pci/devices/escape"), "../../../../../../../../etc");
    assert_eq!(link(&f, "bus/pci/devices/absolute"), "/etc");
    assert_eq!(link(&f, "bus/pci/devices/loop"), "loop.loop");
    assert_eq!(link(&f, "bus/pci/devices/loop.loop"), "loop");
    assert_eq!(kind(&f, "bus/pci/devices/0000:0g:00.0"), &EntryKind::Dir);
    assert_eq!(kind(&f, "bus/pci/devices/pipe"), &EntryKind::Fifo);
    assert_eq!(link(&f, "bus/pci/devices/weird name\n%"), "x y");
    // Nothing outside the root.
    assert!(!f.entries.iter().any(|e| e.path.starts_with("etc")));
    // The huge attribute is capped.
    let huge = file(&f, "devices/pci0000:01/0000:01:00.0/huge");
    assert_eq!(huge.len(), snapshot::MAX_FILE_LEN);
    // The whole hostile tree goes through text and back.
    let text = fixture::write(&f);
    let again = FakeSysfs::from_fixture(&text).unwrap();
    assert_eq!(normalized(again.capture()), normalized(f));
}

#[test]
fn materializing_never_writes_outside_the_root() {
    let outside = tempfile::tempdir().unwrap();
    let fake = FakeSysfs::new().unwrap();
    fake.symlink("evil", outside.path()).unwrap();
    let f = Fixture {
        entries: vec![Entry::file("evil/x", "pwned")],
        notes: vec![],
    };
    assert!(fake.materialize(&f).is_err());
    assert!(fake.write("evil/sub/y", b"pwned").is_err());
    assert!(fake.mkdir("evil/d").is_err());
    assert!(fake.mkfifo("evil/p").is_err());
    // A final symlink is not written through either.
    fake.symlink("evil_file", outside.path().join("target")).unwrap();
    fs::write(outside.path().join("target"), b"keep").unwrap();
    assert!(fake.write("evil_file", b"pwned").is_err());
    assert_eq!(fs::read(outside.path().join("target")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
    // Within one fixture, an entry below a link is refused before anything is written.
    let text = format!(
        "pcibus-fixture 1\nlink a {}\nfile a/x\n> pwned\n",
        outside.path().display()
    );
    let e = FakeSysfs::from_fixture(&text).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    // Bad paths in a fixture built in code.
    for bad in ["../x", "/x", "a/../../x", "a//b"] {
        let f = Fixture {
            entries: vec![Entry::file(bad, "x")],
            notes: vec![],
        };
        assert!(fake.materialize(&f).is_err(), "{bad}");
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
}

#[test]
fn materialize_conflicts_are_errors() {
    let fake = FakeSysfs::new().unwrap();
    let f = fixture::parse("pcibus-fixture 1\nfile a\n> x\n").unwrap();
    fake.materialize(&f).unwrap();
    // The same file again replaces it; a directory or link over it does not.
    fake.materialize(&f).unwrap();
    assert!(
        fake.materialize(&fixture::parse("pcibus-fixture 1\ndir a\n").unwrap())
            .is_err()
    );
    assert!(
        fake.materialize(&fixture::parse("pcibus-fixture 1\nlink a b\n").unwrap())
            .is_err()
    );
    assert!(
        fake.materialize(&fixture::parse("pcibus-fixture 1\nfile a/b\n").unwrap())
            .is_err()
    );
    // The directories FakeSysfs::new made are fine to mention.
    fake.materialize(&fixture::parse("pcibus-fixture 1\ndir bus/pci/devices\n").unwrap())
        .unwrap();
}

#[test]
fn synthetic_trees_are_realistic_and_deterministic() {
    let synth = Synthetic::new(64);
    let a = FakeSysfs::new().unwrap();
    let addrs = synth.build(&a).unwrap();
    assert_eq!(addrs.len(), 64);
    assert_eq!(addrs, synth.addresses());
    let mut dedup = addrs.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), 64);
    assert_eq!(
        fs::read_dir(a.root().join("bus/pci/devices")).unwrap().count(),
        64
    );
    let fa = a.capture();
    assert!(fa.notes.is_empty(), "{:?}", fa.notes);
    let b = FakeSysfs::new().unwrap();
    synth.build(&b).unwrap();
    assert_eq!(fa, b.capture());

    // Domains, drivers, SR-IOV.
    assert!(addrs.iter().any(|a| a.domain() == 1));
    let links = |suffix: &str| {
        fa.entries
            .iter()
            .filter(|e| e.path.to_string_lossy().ends_with(suffix) && matches!(e.kind, EntryKind::Link(_)))
            .count()
    };
    assert_eq!(links("/physfn"), synth.pfs * synth.vfs_per_pf);
    assert_eq!(links("/iommu_group"), 64);
    assert!(links("/driver") > 8 && links("/driver") < 64);
    let pf = fa
        .entries
        .iter()
        .find(|e| e.path.ends_with("sriov_totalvfs"))
        .expect("a PF")
        .path
        .parent()
        .unwrap()
        .to_path_buf();
    let pf = pf.to_string_lossy();
    assert_eq!(file(&fa, &format!("{pf}/sriov_numvfs")), b"7\n");
    assert_eq!(file(&fa, &format!("{pf}/sriov_offset")), b"128\n");
    assert_eq!(file(&fa, &format!("{pf}/sriov_vf_device")), b"10ed\n");
    let vf0 = link(&fa, &format!("{pf}/virtfn0"));
    assert!(vf0.starts_with("../") && vf0.ends_with(":10.0"), "{vf0}");
    let vf_dir = Path::new(&*pf).parent().unwrap().join(&vf0[3..]);
    let vf_dir = vf_dir.to_string_lossy();
    let pf_name = Path::new(&*pf)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(link(&fa, &format!("{vf_dir}/physfn")), format!("../{pf_name}"));
    // Another seed gives another mix.
    let c = FakeSysfs::new().unwrap();
    Synthetic {
        seed: 7,
        ..synth.clone()
    }
    .build(&c)
    .unwrap();
    assert_ne!(fa, c.capture());
}

#[test]
fn synthetic_sizes() {
    for n in [1, 15, 100, 1024] {
        let synth = Synthetic::new(n);
        let addrs = synth.addresses();
        assert_eq!(addrs.len(), n, "{synth:?}");
        let mut d = addrs.clone();
        d.dedup();
        assert_eq!(d.len(), n, "{synth:?}");
    }
    let big = Synthetic {
        devices: 600,
        pfs: 2,
        vfs_per_pf: 250,
        seed: 1,
    };
    let addrs = big.addresses();
    let mut d = addrs.clone();
    d.dedup();
    assert_eq!(d.len(), 600);
    assert!(
        Synthetic::new(1024)
            .addresses()
            .iter()
            .any(|a| a.domain() == 0x10000)
    );
}

/// `cargo test --release -- --ignored synthetic_4096 --nocapture` prints the time.
#[test]
#[ignore = "timing; run in release"]
fn synthetic_4096_is_fast() {
    let fake = FakeSysfs::new().unwrap();
    let start = Instant::now();
    let addrs = Synthetic::new(4096).build(&fake).unwrap();
    let took = start.elapsed();
    println!("generated {} devices in {took:?}", addrs.len());
    assert_eq!(addrs.len(), 4096);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn tripwires_count_every_open_and_stop_on_drop() {
    use std::os::unix::fs::OpenOptionsExt;
    let fake = FakeSysfs::new().unwrap();
    let dir = fake
        .device("0000:01:00.0")
        .tripwire("uevent")
        .tripwire("config")
        .create()
        .unwrap();
    let (uevent, config) = (dir.join("uevent"), dir.join("config"));
    fake.settle_tripwires();
    assert_eq!(fake.tripped(), []);
    // A non-blocking open (how the fast path reads) that closes at once still counts.
    drop(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&uevent)
            .unwrap(),
    );
    assert!(fake.wait_for_opens(&uevent, 1, std::time::Duration::from_secs(5)));
    // A blocking read (how the pool reads) sees end of file.
    assert_eq!(std::fs::read(&config).unwrap(), b"");
    assert!(fake.wait_for_opens(&config, 1, std::time::Duration::from_secs(5)));
    fake.settle_tripwires();
    assert_eq!(fake.opens(&uevent), 1);
    assert_eq!(fake.opens(&config), 1);
    assert_eq!(fake.tripped().len(), 2);
    // Dropping stops the watchers, even of a device whose directory is gone.
    fake.remove_device("0000:01:00.0").unwrap();
    drop(fake);
}
