// The emulated NVMe controller as a device model: `NvmeModel`.

use std::fmt;
use std::sync::Arc;

use super::{EmuConfig, EmuError, EmuStats, Shared};
use crate::bus::bar::BarInfo;
use crate::testing::backing::FakeLayout;
use crate::testing::model::{DeviceModel, ModelConfig, ModelContext};

/// The BAR of the MSI-X table and pending bits (BAR 0 is the controller's registers).
const MSIX_BAR: u32 = 4;

/// The emulated NVMe controller as a [`DeviceModel`] (issue 16 §5: the NVMe emulator is
/// one model among others): put it in a [`FakeBacking`](crate::testing::backing::FakeBacking)
/// with [`FakeBacking::with_model`](crate::testing::backing::FakeBacking::with_model).
///
/// The controller is the one [`EmulatedNvme`](super::EmulatedNvme) runs, the same state
/// and the same command processing; only its edges differ. Its registers are the model's
/// BAR 0 ([`DeviceModel::read`], [`DeviceModel::write`]), its processing is
/// [`DeviceModel::step`] (driven by [`FakeBacking::step_model`] or a model thread,
/// [`FakeBacking::spawn_model_thread`]) instead of a thread of its own, and its DMA,
/// bus mastering and interrupts are the kit's ([`ModelContext`]): a transfer outside the
/// backing's live allocations is refused and counted in [`ModelStats::bad_dma`], one
/// while Bus Master Enable is off in [`ModelStats::dma_without_bus_master`], and
/// completions raise the MSI-X (or MSI, or INTx) vector of their queue through the
/// backing's interrupt model.
///
/// ```
/// use pcibus::nvme::{Controller, Options};
/// use pcibus::testing::backing::FakeBacking;
/// use pcibus::testing::nvme::{EmuConfig, NvmeModel};
///
/// let device = FakeBacking::with_model(NvmeModel::new(EmuConfig::default()).unwrap());
/// let _thread = device.spawn_model_thread().unwrap().unwrap();
/// let controller = Controller::init(device.clone(), &Options::default()).unwrap();
/// assert_eq!(controller.info().identify.model, "pcibus emulated NVMe");
/// device.assert_no_model_faults();
/// ```
///
/// What it does not have of [`EmulatedNvme`](super::EmulatedNvme): fault injection and
/// the other test hooks, the IOVA allocator (the backing's), late-DMA counting (the
/// backing's allocations carry no order), and SR-IOV's virtual functions (the model is
/// one function).
///
/// [`FakeBacking::step_model`]: crate::testing::backing::FakeBacking::step_model
/// [`FakeBacking::spawn_model_thread`]: crate::testing::backing::FakeBacking::spawn_model_thread
/// [`ModelStats::bad_dma`]: crate::testing::model::ModelStats::bad_dma
/// [`ModelStats::dma_without_bus_master`]: crate::testing::model::ModelStats::dma_without_bus_master
pub struct NvmeModel {
    shared: Arc<Shared>,
}

impl fmt::Debug for NvmeModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmeModel")
            .field("address", &self.shared.cfg.address)
            .finish_non_exhaustive()
    }
}

impl NvmeModel {
    /// A disabled controller (CC.EN = 0) as `config` describes it (its `address` is not
    /// used: the backing's is the device's).
    pub fn new(config: EmuConfig) -> Result<Self, EmuError> {
        config.check()?;
        Ok(NvmeModel {
            shared: Arc::new(Shared::new(config, true)),
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &EmuConfig {
        &self.shared.cfg
    }

    /// What the controller counted so far (commands, doorbells, completions, refused DMA).
    pub fn stats(&self) -> EmuStats {
        self.shared.counters.snapshot()
    }

    /// `len` bytes of namespace `nsid` from byte `offset`, as
    /// [`EmulatedNvme::namespace_read`](super::EmulatedNvme::namespace_read).
    pub fn namespace_read(&self, nsid: u32, offset: u64, len: usize) -> Option<Vec<u8>> {
        self.shared.namespace_read(nsid, offset, len)
    }

    /// Writes `data` into namespace `nsid` at byte `offset`, as
    /// [`EmulatedNvme::namespace_write`](super::EmulatedNvme::namespace_write).
    pub fn namespace_write(&self, nsid: u32, offset: u64, data: &[u8]) -> Option<()> {
        self.shared.namespace_write(nsid, offset, data)
    }

    // The controller acts through the kit's context from the first callback on.
    fn attach(&self, ctx: &ModelContext) {
        if let Some(port) = &self.shared.model {
            let _ = port.ctx.get_or_init(|| ctx.clone());
        }
    }

    fn msix_vectors(&self) -> u32 {
        u32::from(self.shared.cfg.msix_vectors).min(2048)
    }

    // Where the pending bits are in the MSI-X BAR (the table is at 0), and its size.
    fn msix_layout(&self) -> (u32, u64) {
        let n = self.msix_vectors();
        let pba = 16 * n;
        let size = (u64::from(pba) + u64::from(n.div_ceil(64)) * 8)
            .next_power_of_two()
            .max(0x1000);
        (pba, size)
    }
}

impl Drop for NvmeModel {
    fn drop(&mut self) {
        // The engine holds the controller: let go of it.
        if let Some(port) = &self.shared.model {
            drop(port.engine.lock().take());
        }
    }
}

impl DeviceModel for NvmeModel {
    fn layout(&self) -> FakeLayout {
        let layout = FakeLayout::empty().bar(BarInfo::memory64(0, self.shared.bar_len));
        if self.msix_vectors() == 0 {
            return layout;
        }
        layout.bar(BarInfo::memory64(MSIX_BAR, self.msix_layout().1))
    }

    fn config(&self) -> ModelConfig {
        let cfg = &self.shared.cfg;
        let config = ModelConfig::new(cfg.vendor_id, cfg.device_id)
            .revision(2)
            .class(0x01_08_02)
            .subsystem(cfg.vendor_id, cfg.device_id)
            .pci_express();
        match self.msix_vectors() {
            0 => config,
            n => {
                let (pba, _) = self.msix_layout();
                let bar = MSIX_BAR as u8;
                config.msix(n as u16, bar, 0, bar, pba)
            }
        }
    }

    fn read(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize) -> u64 {
        self.attach(ctx);
        if bar != 0 {
            // The MSI-X table: VFIO's, not the controller's.
            return 0;
        }
        let shared = &self.shared;
        match size {
            8 => shared.read64(offset),
            // Registers are dwords and qwords; a narrower read sees part of its dword.
            _ => u64::from(shared.read32(offset & !3) >> ((offset & 3) * 8)),
        }
    }

    fn write(&mut self, ctx: &ModelContext, bar: u32, offset: u64, size: usize, value: u64) {
        self.attach(ctx);
        if bar != 0 {
            return;
        }
        match size {
            8 => self.shared.write64(offset, value),
            4 => self.shared.write32(offset, value as u32),
            // Widening it would ring doorbells with made-up values.
            _ => ctx.guest_error(format_args!(
                "a {size}-byte write at {offset:#x} of the NVMe controller's registers (ignored)"
            )),
        }
    }

    fn step(&mut self, ctx: &ModelContext) -> bool {
        self.attach(ctx);
        let Some(port) = &self.shared.model else {
            return false;
        };
        port.engine.lock().as_mut().is_some_and(|engine| engine.step())
    }

    fn reset(&mut self, ctx: &ModelContext) {
        self.attach(ctx);
        self.shared.function_reset();
    }
}
