//! The bus's pure pieces, specified against a scanned fixture: id tables (with class masks)
//! and DPDK-style selections applied to QEMU's q35 machine with an SR-IOV NVMe (a PF at
//! 01:00.0 and its VFs at 01:00.1 and 01:00.2, an AHCI controller at 00:1f.2).

use std::path::Path;

use pcibus::bus::devargs::{DevArg, DevargsErrorKind, Selection};
use pcibus::bus::id::{CLASS_BASE, CLASS_EXACT, IdEntry, first_match};
use pcibus::testing::FakeSysfs;
use pcibus::{PciAddress, Scan, Scanner, SysfsRoot};

fn qemu_scan() -> Scan {
    let fake = FakeSysfs::from_fixture_file(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join("qemu-q35-sriov-nvme.pcifix"),
    )
    .unwrap();
    Scanner::new(SysfsRoot::new(fake.root())).scan().unwrap()
}

fn addrs<'a>(it: impl Iterator<Item = &'a PciAddress>) -> Vec<String> {
    it.map(|a| a.to_string()).collect()
}

#[test]
fn one_class_mask_entry_finds_every_nvme() {
    static NVME: &[IdEntry] = &[IdEntry::class(0x010802, CLASS_EXACT)];
    let scan = qemu_scan();
    let matched: Vec<&PciAddress> = scan
        .devices
        .iter()
        .filter(|d| first_match(NVME, d).is_some())
        .map(|d| &d.address)
        .collect();
    assert_eq!(
        addrs(matched.into_iter()),
        ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2"]
    );
}

#[test]
fn table_order_decides_between_entries() {
    // A driver for QEMU's NVMe by ids first, then any other mass-storage controller.
    static IDS: &[IdEntry] = &[
        IdEntry::vendor_device(0x1b36, 0x0010).subsystem(0x1af4, 0x1100),
        IdEntry::class(0x010000, CLASS_BASE),
    ];
    let scan = qemu_scan();
    let got: Vec<(String, String)> = scan
        .devices
        .iter()
        .filter_map(|d| first_match(IDS, d).map(|e| (d.address.to_string(), e.to_string())))
        .collect();
    let by_ids = "1b36:0010 sub 1af4:1100 class *".to_owned();
    assert_eq!(
        got,
        [
            (
                "0000:00:1f.2".to_owned(),
                "*:* sub *:* class 010000/ff0000".to_owned()
            ),
            ("0000:01:00.0".to_owned(), by_ids.clone()),
            ("0000:01:00.1".to_owned(), by_ids.clone()),
            ("0000:01:00.2".to_owned(), by_ids),
        ]
    );
}

#[test]
fn every_scanned_device_matches_its_own_entry_and_any() {
    for d in &qemu_scan().devices {
        assert!(IdEntry::for_record(d).matches(d), "{}", d.address);
        assert!(IdEntry::ANY.matches(d), "{}", d.address);
    }
}

#[test]
fn an_allow_list_selects_devices_and_carries_their_arguments() {
    static NVME: &[IdEntry] = &[IdEntry::class(0x010802, CLASS_EXACT)];
    let sel = Selection::from_args([("-a", "01:00.1,queues=4,poll"), ("-a", "pci:0000:01:00.2")]).unwrap();
    let scan = qemu_scan();
    let probed: Vec<(String, Option<String>)> = scan
        .devices
        .iter()
        .filter(|d| sel.admits(d.address) && first_match(NVME, d).is_some())
        .map(|d| {
            (
                d.address.to_string(),
                sel.devarg(d.address).map(DevArg::to_string),
            )
        })
        .collect();
    assert_eq!(
        probed,
        [
            (
                "0000:01:00.1".to_owned(),
                Some("0000:01:00.1,queues=4,poll".to_owned())
            ),
            ("0000:01:00.2".to_owned(), Some("0000:01:00.2".to_owned())),
        ]
    );
    // The driver knows `queues` but not `poll`, and says so.
    let e = sel.allowed()[0].reject_unknown(&["queues"]).unwrap_err();
    assert_eq!(
        e.kind,
        DevargsErrorKind::UnknownKey {
            key: "poll".into(),
            known: vec!["queues".into()]
        }
    );
}

#[test]
fn a_block_list_keeps_the_rest() {
    let sel = Selection::from_args([("-b", "0000:01:00.0"), ("-b", "00:1f.2")]).unwrap();
    let scan = qemu_scan();
    let admitted = addrs(
        scan.devices
            .iter()
            .map(|d| &d.address)
            .filter(|a| sel.admits(**a)),
    );
    assert_eq!(admitted.len(), scan.devices.len() - 2);
    assert!(!admitted.contains(&"0000:01:00.0".to_owned()));
    assert!(!admitted.contains(&"0000:00:1f.2".to_owned()));
    assert!(admitted.contains(&"0000:01:00.1".to_owned()));
}

#[test]
fn contradictory_selections_are_refused_by_name() {
    let e = Selection::from_args([("-a", "01:00.0,k=v"), ("-b", "0000:01:00.0")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "devargs \"0000:01:00.0\" at byte 0: 0000:01:00.0 is both allowed and blocked"
    );
    let e = Selection::from_args([("-b", "01:00.0,k=v")]).unwrap_err();
    assert_eq!(e.kind, DevargsErrorKind::ArgumentsOnBlock);
}
