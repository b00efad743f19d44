//! The mapping end to end on files of a fake sysfs tree: `/dev/uioN`, `config` and
//! `resourceN` are regular files (a regular file mmaps like a BAR), the interrupt handle a
//! real EAL instance (`rte_intr_instance_alloc` needs no `rte_eal_init`). Device names are
//! not PCI addresses, so no claim is taken on the host (claims are vfio_pci's, tested
//! there).

use super::*;
use crate::ffi::eal::{RTE_INTR_INSTANCE_F_PRIVATE, rte_intr_instance_alloc, rte_intr_instance_free};
use crate::ffi::types::measured::{RTE_PCI_KDRV_IGB_UIO, RTE_PCI_KDRV_UIO_GENERIC};
use core::ffi::c_char;
use pcibus::testing::FakeSysfs;

struct Fixture {
    fake: FakeSysfs,
    devdir: PathBuf,
}

impl Fixture {
    /// What `/sys/bus/pci/devices` is.
    fn sysfs(&self) -> PathBuf {
        self.fake.root().join("bus/pci/devices")
    }
}

const BAR0: u64 = 0xfe00_0000;

/// A device `name` bound to `driver` with uio instance `uio` (None: no instance), memory
/// BAR 0 (4 KiB of 0xab), I/O BAR 1, Command = 0x0003.
fn fixture(name: &str, driver: &str, uio: Option<u32>) -> Fixture {
    let fake = FakeSysfs::new().unwrap();
    let mut config = vec![0u8; 64];
    config[4] = 0x03;
    fake.device(name)
        .driver(driver)
        .config(config)
        .resources(&[(BAR0, BAR0 + 0xfff, 0x40200), (0xc000, 0xc03f, 0x40101)])
        .create()
        .unwrap();
    let rel = fake.device_dir(name).unwrap();
    fake.write(rel.join("resource0"), &[0xab; 4096]).unwrap();
    let devdir = fake.root().join("dev-nodes");
    std::fs::create_dir_all(&devdir).unwrap();
    if let Some(n) = uio {
        fake.mkdir(rel.join(format!("uio/uio{n}"))).unwrap();
        std::fs::write(devdir.join(format!("uio{n}")), b"").unwrap();
    }
    Fixture { fake, devdir }
}

struct Dev(RtePciDevice);

impl Dev {
    fn new(name: &str, kdrv: c_int) -> Dev {
        // SAFETY: an all-zero rte_pci_device is valid (null pointers, zero numbers).
        let mut d: RtePciDevice = unsafe { core::mem::zeroed() };
        for (x, s) in d.name.iter_mut().zip(name.as_bytes()) {
            *x = *s as c_char;
        }
        d.kdrv = kdrv;
        d.mem_resource[0].phys_addr = BAR0;
        d.mem_resource[0].len = 0x1000;
        // SAFETY: a private instance; freed in drop.
        d.intr_handle = unsafe { rte_intr_instance_alloc(RTE_INTR_INSTANCE_F_PRIVATE) };
        assert!(!d.intr_handle.is_null());
        Dev(d)
    }
    fn fds(&self) -> (c_int, c_int, c_int) {
        // SAFETY: the instance is live.
        unsafe {
            (
                eal::rte_intr_fd_get(self.0.intr_handle),
                eal_uio::rte_intr_dev_fd_get(self.0.intr_handle),
                eal_uio::rte_intr_type_get(self.0.intr_handle),
            )
        }
    }
    fn byte(&self, bar: usize, at: usize) -> u8 {
        let mut b = 0u8;
        // SAFETY: the BAR is mapped (asserted by the callers) and 4 KiB long.
        unsafe { sys::mmio_read(self.0.mem_resource[bar].addr.cast::<u8>().add(at), &mut b, 1) };
        b
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: allocated in new, not used after.
        unsafe { rte_intr_instance_free(self.0.intr_handle) };
    }
}

fn command(f: &Fixture, name: &str) -> u8 {
    std::fs::read(
        f.fake
            .root()
            .join(f.fake.device_dir(name).unwrap())
            .join("config"),
    )
    .unwrap()[4]
}

#[test]
fn uio_pci_generic_maps_bars_sets_intx_handle_and_bus_master_and_unmaps() {
    let name = "uio-test-generic";
    let f = fixture(name, "uio_pci_generic", Some(4));
    let mut d = Dev::new(name, RTE_PCI_KDRV_UIO_GENERIC);
    // SAFETY: d is a live device.
    let ret = unsafe { map_in(&mut d.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(ret, 0);
    assert!(is_held(name));
    assert!(!d.0.mem_resource[0].addr.is_null(), "memory BAR mapped");
    assert_eq!(d.0.mem_resource[0].len, 0x1000);
    assert!(d.0.mem_resource[1].addr.is_null(), "I/O BAR not mapped");
    assert_eq!(d.byte(0, 0x10), 0xab, "the mapping is the resource0 file");
    let (fd, dev_fd, ty) = d.fds();
    assert!(fd >= 0 && dev_fd >= 0 && fd != dev_fd);
    assert_eq!(ty, RTE_INTR_HANDLE_UIO_INTX);
    assert_eq!(command(&f, name), 0x07, "Bus Master set, the rest kept");
    // SAFETY: as above.
    let got = unsafe { map_in(&mut d.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(got, 0, "held: 0");

    // A memory BAR as an I/O port: p->base is its mapping; accesses bounded by the BAR.
    // SAFETY: as above.
    let base = unsafe { ioport_map_in(&mut d.0, name, 0, &f.sysfs()) }.unwrap();
    assert_eq!(base, d.0.mem_resource[0].addr as u64);
    let mut data = [0u8; 4];
    // SAFETY: data is 4 bytes.
    unsafe {
        assert_eq!(
            ioport_access(name, base, 0x20, data.as_mut_ptr(), 4, false),
            Some(Ok(()))
        );
        assert_eq!(data, [0xab; 4]);
        assert!(
            ioport_access(name, base, 0xffe, data.as_mut_ptr(), 4, false)
                .unwrap()
                .is_err(),
            "beyond the BAR"
        );
        assert_eq!(
            ioport_access(name, base + 1, 0, data.as_mut_ptr(), 4, false),
            None,
            "not a port we gave out"
        );
        data = [1, 2, 3, 4];
        assert_eq!(
            ioport_access(name, base, 0x40, data.as_mut_ptr(), 4, true),
            Some(Ok(()))
        );
    }
    assert_eq!(d.byte(0, 0x42), 3);
    // SAFETY: as above.
    let got = unsafe { ioport_map_in(&mut d.0, name, 2, &f.sysfs()) };
    assert!(got.is_err(), "an empty BAR");

    // SAFETY: as above.
    assert_eq!(unsafe { unmap(&mut d.0, name) }, 0);
    assert!(!is_held(name));
    assert!(d.0.mem_resource.iter().all(|r| r.addr.is_null()));
    assert_eq!(d.fds(), (-1, -1, RTE_INTR_HANDLE_UNKNOWN));
    // SAFETY: data is 4 bytes.
    let got = unsafe { ioport_access(name, base, 0, data.as_mut_ptr(), 4, false) };
    assert_eq!(got, None, "gone with the mapping");
    // SAFETY: as above.
    assert_eq!(unsafe { unmap(&mut d.0, name) }, -1, "not held");
}

#[test]
fn igb_uio_gets_the_uio_handle_type_and_no_bus_master_write() {
    let name = "uio-test-igb";
    let f = fixture(name, "igb_uio", Some(9));
    let mut d = Dev::new(name, RTE_PCI_KDRV_IGB_UIO);
    // SAFETY: d is a live device.
    let got = unsafe { map_in(&mut d.0, name, UioDriver::IgbUio, &f.sysfs(), &f.devdir) };
    assert_eq!(got, 0);
    assert_eq!(d.fds().2, RTE_INTR_HANDLE_UIO);
    assert_eq!(command(&f, name), 0x03, "igb_uio sets Bus Master itself");
    // SAFETY: as above.
    assert_eq!(unsafe { unmap(&mut d.0, name) }, 0);
}

#[test]
fn hot_unplug_remaps_bars_onto_anonymous_memory() {
    let name = "uio-test-unplug";
    let f = fixture(name, "uio_pci_generic", Some(5));
    let mut d = Dev::new(name, RTE_PCI_KDRV_UIO_GENERIC);
    // SAFETY: d is a live device.
    let got = unsafe { map_in(&mut d.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(got, 0);
    let addr = d.0.mem_resource[0].addr;
    // SAFETY: d is live, its BARs this module's mappings.
    assert_eq!(unsafe { remap_for_unplug(&mut d.0) }, 0);
    assert_eq!(d.0.mem_resource[0].addr, addr, "same address");
    assert_eq!(d.byte(0, 0x10), 0, "anonymous memory now, not the device's");
    // SAFETY: as above.
    assert_eq!(unsafe { unmap(&mut d.0, name) }, 0);
}

#[test]
fn no_uio_instance_is_skipped_with_1() {
    let name = "uio-test-none";
    let f = fixture(name, "uio_pci_generic", None);
    let mut d = Dev::new(name, RTE_PCI_KDRV_UIO_GENERIC);
    // SAFETY: d is a live device.
    let got = unsafe { map_in(&mut d.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(got, 1);
    assert!(!is_held(name));
}

#[test]
fn failures_leave_nothing_behind() {
    // No /dev/uioN node.
    let name = "uio-test-nodev";
    let f = fixture(name, "uio_pci_generic", Some(6));
    std::fs::remove_file(f.devdir.join("uio6")).unwrap();
    let mut d = Dev::new(name, RTE_PCI_KDRV_UIO_GENERIC);
    // SAFETY: d is a live device.
    let got = unsafe { map_in(&mut d.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(got, -1);
    assert!(!is_held(name));
    assert_eq!(d.fds(), (-1, -1, RTE_INTR_HANDLE_UNKNOWN));

    // No resource0 file: the handle set up before is undone.
    let name = "uio-test-nores";
    let f = fixture(name, "uio_pci_generic", Some(7));
    std::fs::remove_file(
        f.fake
            .root()
            .join(f.fake.device_dir(name).unwrap())
            .join("resource0"),
    )
    .unwrap();
    let mut d = Dev::new(name, RTE_PCI_KDRV_UIO_GENERIC);
    // SAFETY: d is a live device.
    let got = unsafe { map_in(&mut d.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(got, -1);
    assert!(!is_held(name));
    assert!(d.0.mem_resource.iter().all(|r| r.addr.is_null()));
    assert_eq!(d.fds(), (-1, -1, RTE_INTR_HANDLE_UNKNOWN));

    // No interrupt instance.
    let mut bare = Dev::new(name, RTE_PCI_KDRV_UIO_GENERIC);
    let keep = bare.0.intr_handle;
    bare.0.intr_handle = ptr::null_mut();
    // SAFETY: bare is a live device.
    let got = unsafe { map_in(&mut bare.0, name, UioDriver::Generic, &f.sysfs(), &f.devdir) };
    assert_eq!(got, -1);
    bare.0.intr_handle = keep;
}

// EAL's --create-uio-dev: a missing /dev/uioN is made from the instance's sysfs `dev`
// (major:minor), an existing node is left alone, a `dev` file that is not major:minor is
// refused naming the file and its text.
#[test]
fn create_uio_dev_makes_a_missing_node_from_sysfs() {
    let f = fixture("0000:00:05.0", "uio_pci_generic", Some(3));
    let dev_dir = f.sysfs().join("0000:00:05.0");
    // The fixture made a plain file as /dev/uio3: an existing node is not touched.
    assert_eq!(ensure_uio_node(&dev_dir, 3, &f.devdir), Ok(false));
    std::fs::remove_file(f.devdir.join("uio3")).unwrap();
    // No `dev` file in sysfs: refused, naming where it looked.
    let err = ensure_uio_node(&dev_dir, 3, &f.devdir).unwrap_err();
    assert!(err.contains("no dev file of uio3"), "{err}");
    let rel = f.fake.device_dir("0000:00:05.0").unwrap();
    f.fake.write(rel.join("uio/uio3/dev"), b"243:x\n").unwrap();
    let err = ensure_uio_node(&dev_dir, 3, &f.devdir).unwrap_err();
    assert!(err.contains("uio3/dev") && err.contains("243:x"), "{err}");
    f.fake.write(rel.join("uio/uio3/dev"), b"243:7\n").unwrap();
    // SAFETY: geteuid takes no arguments and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED the mknod half of create_uio_dev_makes_a_missing_node_from_sysfs: needs root");
        return;
    }
    assert_eq!(ensure_uio_node(&dev_dir, 3, &f.devdir), Ok(true));
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(f.devdir.join("uio3")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), libc::makedev(243, 7));
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(ensure_uio_node(&dev_dir, 3, &f.devdir), Ok(false), "made once");
}
