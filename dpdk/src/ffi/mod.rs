//! The C side: DPDK's struct layouts (`types`) and the DPDK functions this library calls
//! (`eal`, `kvargs`, `pci`, and `errno` from the C shim). Everything here is declarations;
//! the unsafe calls live in `crate::exports`, `crate::busops` and `crate::log`.

pub mod types;

/// Functions of librte_eal.so.23 (all under its `DPDK_23`, `EXPERIMENTAL` or `INTERNAL`
/// version nodes; the stock bus imports the same ones).
pub mod eal {
    use core::ffi::{c_char, c_int, c_uint};

    use super::types::{RteBus, RteDevargs, RteDevice, RteIntrHandle};

    /// `RTE_LOG_ERR`.
    pub const RTE_LOG_ERR: u32 = 4;
    /// `RTE_LOG_WARNING`.
    pub const RTE_LOG_WARNING: u32 = 5;
    /// `RTE_LOG_INFO`.
    pub const RTE_LOG_INFO: u32 = 7;
    /// `RTE_LOG_DEBUG`.
    pub const RTE_LOG_DEBUG: u32 = 8;
    /// `RTE_LOGTYPE_EAL`: the log type DPDK's own PCI bus logs under.
    pub const RTE_LOGTYPE_EAL: u32 = 0;
    /// `RTE_INTR_INSTANCE_F_PRIVATE`.
    pub const RTE_INTR_INSTANCE_F_PRIVATE: u32 = 0;
    /// `RTE_VFIO_DEFAULT_CONTAINER_FD`.
    pub const RTE_VFIO_DEFAULT_CONTAINER_FD: c_int = -1;

    unsafe extern "C" {
        /// `int rte_log(uint32_t level, uint32_t logtype, const char *format, ...)`.
        pub fn rte_log(level: u32, logtype: u32, format: *const c_char, ...) -> c_int;
        /// `void rte_bus_register(struct rte_bus *bus)` (INTERNAL).
        pub fn rte_bus_register(bus: *mut RteBus);
        /// `void rte_bus_unregister(struct rte_bus *bus)` (INTERNAL).
        pub fn rte_bus_unregister(bus: *mut RteBus);
        /// `struct rte_bus *rte_bus_find(const struct rte_bus *start, rte_bus_cmp_t cmp,
        /// const void *data)`: the first bus after `start` for which `cmp` returns 0.
        pub fn rte_bus_find(
            start: *const RteBus,
            cmp: unsafe extern "C" fn(bus: *const RteBus, data: *const core::ffi::c_void) -> c_int,
            data: *const core::ffi::c_void,
        ) -> *mut RteBus;
        /// `struct rte_devargs *rte_devargs_next(const char *busname, const struct
        /// rte_devargs *start)`.
        pub fn rte_devargs_next(busname: *const c_char, start: *const RteDevargs) -> *mut RteDevargs;
        /// `int rte_devargs_remove(struct rte_devargs *devargs)`.
        pub fn rte_devargs_remove(devargs: *mut RteDevargs) -> c_int;
        /// `int rte_dev_is_probed(const struct rte_device *dev)`.
        pub fn rte_dev_is_probed(dev: *const RteDevice) -> c_int;
        /// `int rte_eal_has_pci(void)`: 0 under `--no-pci`.
        pub fn rte_eal_has_pci() -> c_int;
        /// `enum rte_iova_mode rte_eal_iova_mode(void)`.
        pub fn rte_eal_iova_mode() -> c_int;
        /// `unsigned int rte_socket_count(void)`.
        pub fn rte_socket_count() -> c_uint;
        /// `struct rte_intr_handle *rte_intr_instance_alloc(uint32_t flags)` (EXPERIMENTAL).
        pub fn rte_intr_instance_alloc(flags: u32) -> *mut RteIntrHandle;
        /// `void rte_intr_instance_free(struct rte_intr_handle *intr_handle)` (EXPERIMENTAL).
        pub fn rte_intr_instance_free(handle: *mut RteIntrHandle);
        /// `int rte_vfio_noiommu_is_enabled(void)`.
        pub fn rte_vfio_noiommu_is_enabled() -> c_int;
        /// `int rte_vfio_container_dma_map(int container_fd, uint64_t vaddr, uint64_t iova,
        /// uint64_t len)`.
        pub fn rte_vfio_container_dma_map(container_fd: c_int, vaddr: u64, iova: u64, len: u64) -> c_int;
        /// `int rte_vfio_container_dma_unmap(int container_fd, uint64_t vaddr, uint64_t
        /// iova, uint64_t len)`.
        pub fn rte_vfio_container_dma_unmap(container_fd: c_int, vaddr: u64, iova: u64, len: u64) -> c_int;
        /// `void rte_dev_event_callback_process(const char *device_name, enum
        /// rte_dev_event_type event)` (EXPERIMENTAL).
        pub fn rte_dev_event_callback_process(device_name: *const c_char, event: c_int);
        /// `int rte_mem_set_dma_mask(uint8_t maskbits)`.
        pub fn rte_mem_set_dma_mask(maskbits: u8) -> c_int;
    }
}

/// Functions of librte_kvargs.so.23: `key=value,...` lists as EAL and the stock bus parse
/// them.
pub mod kvargs {
    use core::ffi::{c_char, c_int, c_void};

    /// `struct rte_kvargs`: opaque here (only its functions are used).
    #[repr(C)]
    #[derive(Debug)]
    pub struct RteKvargs {
        _opaque: [u8; 0],
    }

    /// `arg_handler_t`.
    pub type ArgHandler =
        unsafe extern "C" fn(key: *const c_char, value: *const c_char, opaque: *mut c_void) -> c_int;

    unsafe extern "C" {
        /// `struct rte_kvargs *rte_kvargs_parse(const char *args, const char *const
        /// valid_keys[])`: null on a syntax error or a key not in `valid_keys`.
        pub fn rte_kvargs_parse(args: *const c_char, valid_keys: *const *const c_char) -> *mut RteKvargs;
        /// `void rte_kvargs_free(struct rte_kvargs *kvlist)`.
        pub fn rte_kvargs_free(kvlist: *mut RteKvargs);
        /// `const char *rte_kvargs_get(const struct rte_kvargs *kvlist, const char *key)`.
        pub fn rte_kvargs_get(kvlist: *const RteKvargs, key: *const c_char) -> *const c_char;
        /// `int rte_kvargs_process(const struct rte_kvargs *kvlist, const char *key_match,
        /// arg_handler_t handler, void *opaque_arg)`.
        pub fn rte_kvargs_process(
            kvlist: *const RteKvargs,
            key_match: *const c_char,
            handler: ArgHandler,
            opaque: *mut c_void,
        ) -> c_int;
    }
}

/// Functions of librte_pci.so.23 (DPDK's PCI address library, which the stock bus links).
pub mod pci {
    use core::ffi::{c_char, c_int};

    use super::types::RtePciAddr;

    unsafe extern "C" {
        /// `int rte_pci_addr_parse(const char *str, struct rte_pci_addr *addr)`: `BB:DD.F`
        /// or `DDDD:BB:DD.F` (hex); 0 or -1.
        pub fn rte_pci_addr_parse(s: *const c_char, addr: *mut RtePciAddr) -> c_int;
    }
}

/// `rte_errno` (a thread-local C variable Rust cannot name on stable), through
/// `src/errno_shim.c`.
pub mod errno {
    use core::ffi::c_int;

    unsafe extern "C" {
        /// Sets `rte_errno`.
        pub fn pcibus_dpdk_set_rte_errno(value: c_int);
    }
}

/// EAL's VFIO and interrupt-handle functions the mapping uses (`src/vfio_pci`), with the
/// version nodes the stock bus imports them from.
pub mod eal_vfio {
    use core::ffi::{c_char, c_int, c_void};

    use super::types::{RteIntrHandle, VfioDeviceInfo};

    /// `rte_intr_callback_fn`.
    pub type IntrCallback = unsafe extern "C" fn(cb_arg: *mut c_void);

    unsafe extern "C" {
        /// `int rte_vfio_setup_device(const char *sysfs_base, const char *dev_addr, int
        /// *vfio_dev_fd, struct vfio_device_info *device_info)`: the device's fd, its group
        /// in EAL's default container (with EAL's DMA mappings); 0, 1 (not managed by VFIO:
        /// no IOMMU group), <0 on errors.
        pub fn rte_vfio_setup_device(
            sysfs_base: *const c_char,
            dev_addr: *const c_char,
            vfio_dev_fd: *mut c_int,
            device_info: *mut VfioDeviceInfo,
        ) -> c_int;
        /// `int rte_vfio_release_device(const char *sysfs_base, const char *dev_addr, int
        /// fd)`: closes the fd, and the group when it was its last device.
        pub fn rte_vfio_release_device(
            sysfs_base: *const c_char,
            dev_addr: *const c_char,
            fd: c_int,
        ) -> c_int;
        /// `int rte_vfio_is_enabled(const char *modname)`.
        pub fn rte_vfio_is_enabled(modname: *const c_char) -> c_int;
        /// `enum rte_intr_mode rte_eal_vfio_intr_mode(void)`.
        pub fn rte_eal_vfio_intr_mode() -> c_int;
        /// `enum rte_proc_type_t rte_eal_process_type(void)`.
        pub fn rte_eal_process_type() -> c_int;
        /// `int rte_intr_fd_set(struct rte_intr_handle *intr_handle, int fd)` (EXPERIMENTAL).
        pub fn rte_intr_fd_set(h: *mut RteIntrHandle, fd: c_int) -> c_int;
        /// `int rte_intr_fd_get(const struct rte_intr_handle *intr_handle)` (EXPERIMENTAL).
        pub fn rte_intr_fd_get(h: *const RteIntrHandle) -> c_int;
        /// `int rte_intr_dev_fd_set(struct rte_intr_handle *intr_handle, int fd)` (INTERNAL).
        pub fn rte_intr_dev_fd_set(h: *mut RteIntrHandle, fd: c_int) -> c_int;
        /// `int rte_intr_type_set(struct rte_intr_handle *intr_handle, enum
        /// rte_intr_handle_type type)` (EXPERIMENTAL).
        pub fn rte_intr_type_set(h: *mut RteIntrHandle, ty: c_int) -> c_int;
        /// `int rte_intr_nb_intr_get(const struct rte_intr_handle *intr_handle)` (INTERNAL).
        pub fn rte_intr_nb_intr_get(h: *const RteIntrHandle) -> c_int;
        /// `int rte_intr_event_list_update(struct rte_intr_handle *intr_handle, int size)`
        /// (INTERNAL): grows the efds/elist arrays to `size` vectors.
        pub fn rte_intr_event_list_update(h: *mut RteIntrHandle, size: c_int) -> c_int;
        /// `int rte_intr_callback_register(const struct rte_intr_handle *intr_handle,
        /// rte_intr_callback_fn cb, void *cb_arg)`.
        pub fn rte_intr_callback_register(
            h: *const RteIntrHandle,
            cb: IntrCallback,
            arg: *mut c_void,
        ) -> c_int;
        /// `int rte_intr_callback_unregister(const struct rte_intr_handle *intr_handle,
        /// rte_intr_callback_fn cb, void *cb_arg)`: the count removed, or <0.
        pub fn rte_intr_callback_unregister(
            h: *const RteIntrHandle,
            cb: IntrCallback,
            arg: *mut c_void,
        ) -> c_int;
        /// `int rte_intr_callback_unregister_sync(...)` (EXPERIMENTAL): as
        /// `rte_intr_callback_unregister`, waiting while the callback runs.
        pub fn rte_intr_callback_unregister_sync(
            h: *const RteIntrHandle,
            cb: IntrCallback,
            arg: *mut c_void,
        ) -> c_int;
        /// `int rte_intr_enable(const struct rte_intr_handle *intr_handle)`.
        pub fn rte_intr_enable(h: *const RteIntrHandle) -> c_int;
        /// `int rte_intr_disable(const struct rte_intr_handle *intr_handle)`.
        pub fn rte_intr_disable(h: *const RteIntrHandle) -> c_int;
    }
}

/// EAL's functions the UIO mapping uses (`src/uio_pci`), with the version nodes the stock
/// bus imports them from.
pub mod eal_uio {
    use core::ffi::c_int;

    use super::types::RteIntrHandle;

    unsafe extern "C" {
        /// `int rte_eal_iopl_init(void)` (DPDK_23): `iopl(3)` on x86, so that port I/O
        /// instructions work; 0 or -1.
        pub fn rte_eal_iopl_init() -> c_int;
        /// `int rte_eal_create_uio_dev(void)` (DPDK_23): non-zero when EAL was started
        /// with `--create-uio-dev` (make a missing `/dev/uioN` node).
        pub fn rte_eal_create_uio_dev() -> c_int;
        /// `int rte_intr_dev_fd_get(const struct rte_intr_handle *intr_handle)` (INTERNAL).
        pub fn rte_intr_dev_fd_get(h: *const RteIntrHandle) -> c_int;
        /// `enum rte_intr_handle_type rte_intr_type_get(const struct rte_intr_handle
        /// *intr_handle)` (EXPERIMENTAL).
        pub fn rte_intr_type_get(h: *const RteIntrHandle) -> c_int;
    }
}

/// EAL's functions for sharing mappings with secondary processes (`src/mp`), all under
/// librte_eal's `DPDK_23` node.
pub mod eal_mp {
    use core::ffi::{c_char, c_int, c_uint, c_void};

    use super::types::{RteMemsegList, RteTailqElem, RteTailqHead};

    /// `rte_memseg_list_walk_t`.
    pub type MemsegListWalk = unsafe extern "C" fn(msl: *const RteMemsegList, arg: *mut c_void) -> c_int;

    unsafe extern "C" {
        /// `enum rte_proc_type_t rte_eal_process_type(void)`.
        pub fn rte_eal_process_type() -> c_int;
        /// `int rte_eal_tailq_register(struct rte_tailq_elem *t)`: after `rte_eal_init`, a
        /// primary creates the named queue in shared memory (`t->head`); 0 or -1 (the name
        /// registered already in this process, or the table full).
        pub fn rte_eal_tailq_register(t: *mut RteTailqElem) -> c_int;
        /// `struct rte_tailq_head *rte_eal_tailq_lookup(const char *name)`: the shared
        /// queue of that name, or null.
        pub fn rte_eal_tailq_lookup(name: *const c_char) -> *mut RteTailqHead;
        /// `void rte_mcfg_tailq_read_lock(void)`.
        pub fn rte_mcfg_tailq_read_lock();
        /// `void rte_mcfg_tailq_read_unlock(void)`.
        pub fn rte_mcfg_tailq_read_unlock();
        /// `void rte_mcfg_tailq_write_lock(void)`.
        pub fn rte_mcfg_tailq_write_lock();
        /// `void rte_mcfg_tailq_write_unlock(void)`.
        pub fn rte_mcfg_tailq_write_unlock();
        /// `void *rte_zmalloc(const char *type, size_t size, unsigned align)`: zeroed memory
        /// from EAL's shared heap, or null.
        pub fn rte_zmalloc(ty: *const c_char, size: usize, align: c_uint) -> *mut c_void;
        /// `void rte_free(void *ptr)`.
        pub fn rte_free(ptr: *mut c_void);
        /// `int rte_memseg_list_walk(rte_memseg_list_walk_t func, void *arg)`.
        pub fn rte_memseg_list_walk(func: MemsegListWalk, arg: *mut c_void) -> c_int;
    }
}
