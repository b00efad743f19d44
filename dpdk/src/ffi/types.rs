//! `#[repr(C)]` mirrors of the DPDK 22.11 structs that PMDs, EAL and applications reach
//! into. Their layout is checked at compile time against DPDK's own headers: build.rs runs
//! `src/layout_probe.c` and the assertions it prints are included at the end of this file
//! (a size, alignment or field offset that differs from the headers fails the build).

use core::ffi::{c_char, c_int, c_void};

/// `RTE_TAILQ_ENTRY(T)`: the links of an intrusive tail queue.
#[repr(C)]
#[derive(Debug)]
pub struct TailqEntry<T> {
    /// `tqe_next`: the next element, or null.
    pub tqe_next: *mut T,
    /// `tqe_prev`: the address of the previous element's `tqe_next`.
    pub tqe_prev: *mut *mut T,
}

/// `struct rte_pci_addr`: domain:bus:device.function.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtePciAddr {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number.
    pub devid: u8,
    /// Function number.
    pub function: u8,
}

/// `struct rte_pci_id`: the IDs a driver's table matches on (`RTE_PCI_ANY_ID` = 0xffff).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtePciId {
    /// Class code (24 bits) or `RTE_CLASS_ANY_ID`.
    pub class_id: u32,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem device ID.
    pub subsystem_device_id: u16,
}

/// `struct rte_mem_resource`: one BAR as the bus reports and maps it.
#[repr(C)]
#[derive(Debug)]
pub struct RteMemResource {
    /// Physical (bus) address of the BAR.
    pub phys_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Virtual address once mapped, else null.
    pub addr: *mut c_void,
}

/// `struct rte_driver`: the generic part of every driver.
#[repr(C)]
#[derive(Debug)]
pub struct RteDriver {
    /// List links (EAL's).
    pub next: TailqEntry<RteDriver>,
    /// Driver name.
    pub name: *const c_char,
    /// Driver alias.
    pub alias: *const c_char,
}

/// `struct rte_devargs`: one `-a`/`-b`/`--vdev` argument (or a hotplug request). EAL owns
/// it; the bus reads `policy` and `name`, and `devargs_parse` writes `name`.
#[repr(C)]
#[derive(Debug)]
pub struct RteDevargs {
    /// EAL's list links.
    pub next: TailqEntry<RteDevargs>,
    /// `enum rte_devtype` (deprecated).
    pub type_: c_int,
    /// `enum rte_dev_policy`: `RTE_DEV_ALLOWED` or `RTE_DEV_BLOCKED`.
    pub policy: c_int,
    /// The device name (for PCI the address as given, or canonical after `devargs_parse`).
    pub name: [c_char; RTE_DEV_NAME_MAX_LEN],
    /// `args` / `drv_str`: the driver part.
    pub args: *const c_char,
    /// The bus the name belongs to.
    pub bus: *mut RteBus,
    /// `struct rte_class *`.
    pub cls: *mut c_void,
    /// The bus part (`bus=pci,addr=...`).
    pub bus_str: *const c_char,
    /// The class part.
    pub cls_str: *const c_char,
    /// The whole string.
    pub data: *mut c_char,
}

/// `RTE_DEV_NAME_MAX_LEN` (asserted against the headers below).
pub const RTE_DEV_NAME_MAX_LEN: usize = 64;

/// `struct rte_intr_handle`: opaque since DPDK 21.11 (accessors in EAL).
#[repr(C)]
#[derive(Debug)]
pub struct RteIntrHandle {
    _opaque: [u8; 0],
}

/// `struct rte_device`: the generic part of every device.
#[repr(C)]
#[derive(Debug)]
pub struct RteDevice {
    /// List links.
    pub next: TailqEntry<RteDevice>,
    /// Device name (for PCI: the address, `0000:00:04.0`).
    pub name: *const c_char,
    /// Bus-specific information.
    pub bus_info: *const c_char,
    /// The driver bound after probing, or null.
    pub driver: *const RteDriver,
    /// The bus that found the device.
    pub bus: *const RteBus,
    /// NUMA node, or -1 (`SOCKET_ID_ANY`).
    pub numa_node: c_int,
    /// Arguments of the latest probe.
    pub devargs: *mut RteDevargs,
}

/// `enum rte_iova_mode`.
pub type RteIovaMode = c_int;
/// `enum rte_bus_scan_mode`.
pub type RteBusScanMode = c_int;

/// `struct rte_bus_conf`.
#[repr(C)]
#[derive(Debug)]
pub struct RteBusConf {
    /// Allow-list / block-list / undefined.
    pub scan_mode: RteBusScanMode,
}

/// `rte_dev_cmp_t`.
pub type RteDevCmp = Option<unsafe extern "C" fn(dev: *const RteDevice, data: *const c_void) -> c_int>;

/// `struct rte_bus`: a bus's name and operations, registered with `rte_bus_register`.
#[repr(C)]
#[derive(Debug)]
pub struct RteBus {
    /// List links (EAL's bus list).
    pub next: TailqEntry<RteBus>,
    /// Bus name ("pci").
    pub name: *const c_char,
    /// `rte_bus_scan_t`.
    pub scan: Option<unsafe extern "C" fn() -> c_int>,
    /// `rte_bus_probe_t`.
    pub probe: Option<unsafe extern "C" fn() -> c_int>,
    /// `rte_bus_find_device_t`.
    pub find_device: Option<
        unsafe extern "C" fn(start: *const RteDevice, cmp: RteDevCmp, data: *const c_void) -> *mut RteDevice,
    >,
    /// `rte_bus_plug_t`.
    pub plug: Option<unsafe extern "C" fn(dev: *mut RteDevice) -> c_int>,
    /// `rte_bus_unplug_t`.
    pub unplug: Option<unsafe extern "C" fn(dev: *mut RteDevice) -> c_int>,
    /// `rte_bus_parse_t`.
    pub parse: Option<unsafe extern "C" fn(name: *const c_char, addr: *mut c_void) -> c_int>,
    /// `rte_bus_devargs_parse_t`.
    pub devargs_parse: Option<unsafe extern "C" fn(da: *mut RteDevargs) -> c_int>,
    /// `rte_dev_dma_map_t`.
    pub dma_map:
        Option<unsafe extern "C" fn(dev: *mut RteDevice, addr: *mut c_void, iova: u64, len: usize) -> c_int>,
    /// `rte_dev_dma_unmap_t`.
    pub dma_unmap:
        Option<unsafe extern "C" fn(dev: *mut RteDevice, addr: *mut c_void, iova: u64, len: usize) -> c_int>,
    /// Bus configuration (scan mode).
    pub conf: RteBusConf,
    /// `rte_bus_get_iommu_class_t`.
    pub get_iommu_class: Option<unsafe extern "C" fn() -> RteIovaMode>,
    /// `rte_dev_iterate_t`.
    pub dev_iterate: Option<
        unsafe extern "C" fn(start: *const c_void, devstr: *const c_char, it: *const c_void) -> *mut c_void,
    >,
    /// `rte_bus_hot_unplug_handler_t`.
    pub hot_unplug_handler: Option<unsafe extern "C" fn(dev: *mut RteDevice) -> c_int>,
    /// `rte_bus_sigbus_handler_t`.
    pub sigbus_handler: Option<unsafe extern "C" fn(failure_addr: *const c_void) -> c_int>,
    /// `rte_bus_cleanup_t`.
    pub cleanup: Option<unsafe extern "C" fn() -> c_int>,
}

/// `enum rte_pci_kernel_driver` (`RTE_PCI_KDRV_*`).
pub type RtePciKernelDriver = c_int;

/// `struct rte_pci_device`. PMDs reach its fields directly (`RTE_DEV_TO_PCI`).
#[repr(C)]
#[derive(Debug)]
pub struct RtePciDevice {
    /// Links of the bus's device list.
    pub next: TailqEntry<RtePciDevice>,
    /// The generic device (`RTE_DEV_TO_PCI` is `container_of` on it).
    pub device: RteDevice,
    /// PCI address.
    pub addr: RtePciAddr,
    /// IDs from config space / sysfs.
    pub id: RtePciId,
    /// BARs.
    pub mem_resource: [RteMemResource; PCI_MAX_RESOURCE],
    /// Interrupt handle.
    pub intr_handle: *mut RteIntrHandle,
    /// The driver that probed the device, or null.
    pub driver: *mut RtePciDriver,
    /// Number of VFs (SR-IOV), 0 without.
    pub max_vfs: u16,
    /// Kernel driver the device is bound to.
    pub kdrv: RtePciKernelDriver,
    /// Address as text, NUL-terminated (`PCI_PRI_STR_SIZE + 1`).
    pub name: [c_char; PCI_PRI_STR_SIZE + 1],
    /// Bus-specific information.
    pub bus_info: *mut c_char,
    /// Interrupt handle of the VFIO request notifier.
    pub vfio_req_intr_handle: *mut RteIntrHandle,
}

/// `rte_pci_probe_t`.
pub type RtePciProbe = unsafe extern "C" fn(drv: *mut RtePciDriver, dev: *mut RtePciDevice) -> c_int;
/// `rte_pci_remove_t`.
pub type RtePciRemove = unsafe extern "C" fn(dev: *mut RtePciDevice) -> c_int;
/// `pci_dma_map_t` / `pci_dma_unmap_t`.
pub type PciDmaMap =
    unsafe extern "C" fn(dev: *mut RtePciDevice, addr: *mut c_void, iova: u64, len: usize) -> c_int;

/// `struct rte_pci_driver`, defined by each PMD and registered with `rte_pci_register`.
#[repr(C)]
#[derive(Debug)]
pub struct RtePciDriver {
    /// Links of the bus's driver list.
    pub next: TailqEntry<RtePciDriver>,
    /// The generic driver.
    pub driver: RteDriver,
    /// Probe function.
    pub probe: Option<RtePciProbe>,
    /// Remove function.
    pub remove: Option<RtePciRemove>,
    /// Device DMA map.
    pub dma_map: Option<PciDmaMap>,
    /// Device DMA unmap.
    pub dma_unmap: Option<PciDmaMap>,
    /// ID table, ended by an entry with `vendor_id == 0`.
    pub id_table: *const RtePciId,
    /// `RTE_PCI_DRV_*` flags.
    pub drv_flags: u32,
}

/// `struct rte_pci_ioport`: an I/O BAR mapped for port I/O.
#[repr(C)]
#[derive(Debug)]
pub struct RtePciIoport {
    /// The device.
    pub dev: *mut RtePciDevice,
    /// Port base (or mapped address).
    pub base: u64,
    /// Length, only for memory-mapped ports.
    pub len: u64,
}

/// `PCI_MAX_RESOURCE`: BARs per device (asserted against the headers below).
pub const PCI_MAX_RESOURCE: usize = 6;
/// `PCI_PRI_STR_SIZE`: `sizeof("XXXXXXXX:XX:XX.X")` (asserted against the headers below).
pub const PCI_PRI_STR_SIZE: usize = 17;

/// `struct vfio_device_info` of `<linux/vfio.h>` (what `rte_vfio_setup_device` fills).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VfioDeviceInfo {
    /// Size of the struct, set by the caller.
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Regions (BARs 0-5, ROM, config, VGA...): the highest index + 1.
    pub num_regions: u32,
    /// IRQ indexes: the highest + 1.
    pub num_irqs: u32,
    /// Offset of the first capability (unused here).
    pub cap_offset: u32,
}

/// `struct vfio_irq_info` of `<linux/vfio.h>` (`VFIO_DEVICE_GET_IRQ_INFO`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VfioIrqInfo {
    /// Size of the struct, set by the caller.
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// The IRQ index asked about.
    pub index: u32,
    /// Vectors of that index.
    pub count: u32,
}

/// `RTE_TAILQ_NAMESIZE` (asserted against the headers below).
pub const RTE_TAILQ_NAMESIZE: usize = 32;

/// `struct rte_tailq_entry_head`: the head of one of EAL's shared tail queues. Its element
/// type is whatever the owner of the queue puts there (`RTE_TAILQ_CAST`).
#[repr(C)]
#[derive(Debug)]
pub struct RteTailqEntryHead {
    /// `tqh_first`: the first element, or null.
    pub tqh_first: *mut c_void,
    /// `tqh_last`: the address of the last element's `tqe_next` (or of `tqh_first`).
    pub tqh_last: *mut *mut c_void,
}

/// `struct rte_tailq_head`: one slot of EAL's shared tail-queue table (in `rte_mem_config`,
/// mapped at the same address by every process).
#[repr(C)]
#[derive(Debug)]
pub struct RteTailqHead {
    /// The queue.
    pub tailq_head: RteTailqEntryHead,
    /// Its name.
    pub name: [c_char; RTE_TAILQ_NAMESIZE],
}

/// `struct rte_tailq_elem`: a process-local registration of a shared tail queue by name
/// (`rte_eal_tailq_register` keeps a pointer to it for the process's life).
#[repr(C)]
#[derive(Debug)]
pub struct RteTailqElem {
    /// The shared head, set by EAL when registered.
    pub head: *mut RteTailqHead,
    /// EAL's local list links.
    pub next: TailqEntry<RteTailqElem>,
    /// The queue's name.
    pub name: [c_char; RTE_TAILQ_NAMESIZE],
}

/// The first fields of `struct rte_memseg_list` (read through EAL's pointer, never
/// allocated here; the offsets of `base_va` and `len` are asserted against the headers).
#[repr(C)]
#[derive(Debug)]
pub struct RteMemsegList {
    /// Base virtual address of the list's area.
    pub base_va: *mut c_void,
    /// Page size of the list.
    pub page_sz: u64,
    /// NUMA socket.
    pub socket_id: c_int,
    /// Version for multi-process synchronisation.
    pub version: u32,
    /// Length of the area.
    pub len: usize,
}

/// What the headers say, as compile-time assertions and constants.
pub mod measured {
    #![allow(non_upper_case_globals, dead_code, missing_docs)]
    use super::*;
    use core::ffi::c_int;
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
    const _: () = assert!(super::PCI_MAX_RESOURCE == PCI_MAX_RESOURCE);
    const _: () = assert!(super::PCI_PRI_STR_SIZE == PCI_PRI_STR_SIZE);
    const _: () = assert!(super::RTE_DEV_NAME_MAX_LEN == RTE_DEV_NAME_MAX_LEN);
    const _: () = assert!(super::RTE_TAILQ_NAMESIZE == RTE_TAILQ_NAMESIZE);
}
