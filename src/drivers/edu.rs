//! A driver for QEMU's `edu` device (`-device edu`, PCI id 1234:11e8), the crate's worked
//! example of a driver: registers, interrupts (MSI, else INTx) and DMA under an address
//! limit, through [`DeviceBacking`] alone, so the same code drives the device on
//! vfio-pci and a model of it in unit tests.
//!
//! # The device
//!
//! `edu` is QEMU's teaching device (`hw/misc/edu.c`, documented in QEMU's
//! `docs/specs/edu.rst`). Everything is in BAR 0 (1 MiB of MMIO; 4-byte accesses below
//! 0x80, 4- or 8-byte ones from 0x80):
//!
//! | Offset | [`Register`] | |
//! |---|---|---|
//! | 0x00 | identification | `0x010000ed`: version 1.0, low byte `0xed` |
//! | 0x04 | liveness | reads back the complement of what was written |
//! | 0x08 | factorial | write `n`: computes `n!` (modulo 2³²) in the background |
//! | 0x20 | status | bit 0 computing; bit 7 set: interrupt `0x1` when the factorial is done |
//! | 0x24 | interrupt status | the raised interrupt bits |
//! | 0x60 | interrupt raise | ORs the value into the status, and interrupts |
//! | 0x64 | interrupt acknowledge | clears these bits of the status |
//! | 0x80, 0x88, 0x90 | DMA source, destination, count | |
//! | 0x98 | DMA command | bit 0 start (reads 1 while running), bit 1 direction (0: memory to the device's buffer, 1: back), bit 2 interrupt `0x100` when done |
//!
//! The device's DMA buffer is 4 KiB at device address 0x40000; its DMA reaches only the
//! low 28 bits of the address space (the `dma_mask` property), so the driver allocates
//! with [`DmaConstraints::address_bits`]`(28)`. It has one MSI vector and INTx, no MSI-X.
//! While the interrupt status is not zero, INTx stays asserted (level); each raise sends
//! an MSI.
//!
//! # The driver
//!
//! [`EduDriver`] is the [`Driver`]: it binds 1234:11e8, and its per-device state
//! ([`Driver::Device`]) is one [`Edu`], which the bus keeps and the application reaches
//! through [`Bus::device_state_mut`](crate::bus::Bus::device_state_mut).
//! [`Edu::open`] (the probe) checks the identification and liveness registers, waits for
//! work a previous user left running, acknowledges a stale interrupt, enables the best
//! interrupt kind (MSI, else INTx; [`EduOptions::interrupts`] can insist on one) and
//! allocates two DMA buffers the device can reach. Each operation waits for its
//! interrupt with a timeout ([`EduOptions::timeout`]), acknowledges it in the device and,
//! for INTx (which VFIO masks after each interrupt), unmasks it after acknowledging.
//! [`Driver::remove`] drops the device's [`Edu`], and with it every handle: the mapped
//! BAR, the interrupt and the DMA memory.
//!
//! A register that reads all-ones where the device never puts it is a device that is gone
//! (surprise-removed, or closed under the driver by the bus): [`EduError::Gone`] names the
//! register. Every error names the device, and the register and value when the device
//! misbehaves.
//!
//! ```no_run
//! use pcibus::bus::map::DeviceMap;
//! use pcibus::bus::{BindPolicy, Bus, VfioAttach, VfioBacking};
//! use pcibus::drivers::edu::EduDriver;
//! use pcibus::{Scanner, SysfsRoot};
//!
//! let root = SysfsRoot::new("/sys");
//! let policy = BindPolicy { bind: true, force: false, restore: true };
//! let mut bus = Bus::new(DeviceMap::new(Scanner::new(root.clone()))?, VfioAttach::new(root, policy));
//! bus.register(Box::new(EduDriver::<VfioBacking>::new()));
//! for report in bus.probe_all() {
//!     println!("{}: {:?}", report.address, report.result.map_err(|e| e.to_string()));
//! }
//! let held: Vec<_> = bus.device_states::<EduDriver<VfioBacking>>().map(|(a, _)| a).collect();
//! for address in held {
//!     let device = bus.device_state_mut::<EduDriver<VfioBacking>>(address).expect("bound");
//!     println!("{address}: 10! = {}", device.factorial(10)?);
//!     device.dma_roundtrip(b"through the device and back")?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/edu.rs` runs it in an event loop that answers removal requests and probes the
//! device again when it comes back.
//!
//! # Testing it
//!
//! With feature `testing`, `testing::models::EduModel` is a model of the device behind a
//! `testing::backing::FakeBacking`, which runs the same driver code in unit tests
//! (`tests/edu.rs`: the INTx path, all-ones devices, lost interrupts, removal through a
//! bus over `FakeAttach::with_models`):
//!
//! ```
//! # #[cfg(feature = "testing")] {
//! use pcibus::bus::DeviceBacking;
//! use pcibus::drivers::edu::{Edu, EduOptions};
//! use pcibus::testing::backing::FakeBacking;
//! use pcibus::testing::models::EduModel;
//!
//! let device = FakeBacking::with_model(EduModel::new());
//! device.set_bus_master(true)?; // as the bus does when it opens a device
//! let _work = device.spawn_model_thread().expect("a model")?; // the device's background work
//! let mut edu = Edu::open(&device, &EduOptions::new())?;
//! assert_eq!(edu.factorial(5)?, 120);
//! edu.dma_roundtrip(b"through the model and back")?;
//! device.assert_no_model_faults();
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use crate::addr::PciAddress;
use crate::bus::id::IdEntry;
use crate::bus::{
    BackingError, DeviceBacking, DmaConstraints, DmaMemory, Driver, Interrupt, InterruptKind, ProbeDevice,
    ProbeOutcome, RegisterIo, Removal,
};

/// QEMU's PCI vendor id.
pub const VENDOR_ID: u16 = 0x1234;
/// edu's device id.
pub const DEVICE_ID: u16 = 0x11e8;

/// The identification register's low byte.
pub const ID_MAGIC: u32 = 0xed;
/// The device address of edu's DMA buffer.
pub const DMA_BUFFER: u64 = 0x4_0000;
/// The size of edu's DMA buffer.
pub const DMA_BUFFER_LEN: usize = 4096;
/// The longest transfer [`Edu::dma_roundtrip`] makes: one byte short of the buffer,
/// because QEMU before 8.0 (7.2 among them) checks a transfer's end with an off-by-one
/// and stops the whole machine (`hw_error`) on one that reaches the buffer's last byte.
pub const MAX_DMA_LEN: usize = DMA_BUFFER_LEN - 1;
/// The address lines edu's DMA drives (its default `dma_mask`).
pub const DMA_ADDRESS_BITS: u32 = 28;

/// The interrupt status bit of a finished factorial.
pub const FACTORIAL_IRQ: u32 = 0x1;
/// The interrupt status bit of a finished DMA transfer.
pub const DMA_IRQ: u32 = 0x100;
/// The bit [`Edu::test_interrupt`] raises (one the device itself never raises).
pub const TEST_IRQ: u32 = 0x1000_0000;

// Status register bits.
const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQ_FACTORIAL: u32 = 0x80;
// DMA command bits.
const DMA_RUN: u32 = 0x1;
const DMA_TO_MEMORY: u32 = 0x2;
const DMA_INTERRUPT: u32 = 0x4;

/// How long to sleep between two looks at a busy register.
const IDLE_POLL: Duration = Duration::from_millis(1);

/// One of edu's registers, for errors that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Register {
    /// 0x00: `0x010000ed`.
    Identification,
    /// 0x04: reads the complement of what was written.
    Liveness,
    /// 0x08: write `n`, read `n!` once computed.
    Factorial,
    /// 0x20: bit 0 computing, bit 7 interrupt at the end of a factorial.
    Status,
    /// 0x24: the raised interrupt bits.
    InterruptStatus,
    /// 0x60: raises the bits written.
    InterruptRaise,
    /// 0x64: clears the bits written.
    InterruptAcknowledge,
    /// 0x80: where a transfer reads.
    DmaSource,
    /// 0x88: where a transfer writes.
    DmaDestination,
    /// 0x90: how many bytes it moves.
    DmaCount,
    /// 0x98: start, direction, interrupt.
    DmaCommand,
}

impl Register {
    /// Its offset in BAR 0.
    pub const fn offset(self) -> u64 {
        match self {
            Register::Identification => 0x00,
            Register::Liveness => 0x04,
            Register::Factorial => 0x08,
            Register::Status => 0x20,
            Register::InterruptStatus => 0x24,
            Register::InterruptRaise => 0x60,
            Register::InterruptAcknowledge => 0x64,
            Register::DmaSource => 0x80,
            Register::DmaDestination => 0x88,
            Register::DmaCount => 0x90,
            Register::DmaCommand => 0x98,
        }
    }

    /// Its name, in lower case.
    pub const fn name(self) -> &'static str {
        match self {
            Register::Identification => "identification",
            Register::Liveness => "liveness",
            Register::Factorial => "factorial",
            Register::Status => "status",
            Register::InterruptStatus => "interrupt status",
            Register::InterruptRaise => "interrupt raise",
            Register::InterruptAcknowledge => "interrupt acknowledge",
            Register::DmaSource => "DMA source",
            Register::DmaDestination => "DMA destination",
            Register::DmaCount => "DMA count",
            Register::DmaCommand => "DMA command",
        }
    }
}

impl fmt::Display for Register {
    /// `interrupt status (0x24)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#04x})", self.name(), self.offset())
    }
}

/// What went wrong with an edu device. Each names the device; those about the device's
/// behaviour name the register and what it read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EduError {
    /// The backing refused an operation (mapping, a register access, enabling
    /// interrupts, allocating DMA memory). The backing's error is part of the message.
    #[error("{address}: edu: {operation}: {error}")]
    Backing {
        /// The device.
        address: PciAddress,
        /// What the driver was doing.
        operation: String,
        /// The backing's error.
        error: BackingError,
    },
    /// A register read all-ones, which the device never puts there: it is gone
    /// (surprise-removed, or closed under the driver).
    #[error("{address}: edu register {register} reads {value:#010x}: the device is gone")]
    Gone {
        /// The device.
        address: PciAddress,
        /// The register.
        register: Register,
        /// What it read (all-ones).
        value: u32,
    },
    /// The identification register does not hold edu's magic byte.
    #[error(
        "{address}: edu register {} reads {id:#010x}, not edu's (low byte {ID_MAGIC:#04x}): not an edu device",
        Register::Identification
    )]
    NotEdu {
        /// The device.
        address: PciAddress,
        /// What the register read.
        id: u32,
    },
    /// The liveness register did not read back the complement of what was written.
    #[error(
        "{address}: edu register {} read {read:#010x} after {wrote:#010x} was written, not its complement {:#010x}",
        Register::Liveness,
        !wrote
    )]
    NotAlive {
        /// The device.
        address: PciAddress,
        /// What was written.
        wrote: u32,
        /// What was read.
        read: u32,
    },
    /// A register still said "busy" (a factorial computing, a transfer running) after the
    /// timeout.
    #[error("{address}: edu register {register} still reads {value:#x} (busy) after {waited:?}")]
    Busy {
        /// The device.
        address: PciAddress,
        /// The register.
        register: Register,
        /// What it read last.
        value: u32,
        /// How long the driver waited.
        waited: Duration,
    },
    /// No interrupt came within the timeout, and the device did not raise the
    /// operation's bit: it did not finish.
    #[error(
        "{address}: edu {operation}: no {kind} interrupt within {waited:?}, and register {} reads {status:#x}, without bit {bit:#x}: the device did not finish",
        Register::InterruptStatus
    )]
    NoInterrupt {
        /// The device.
        address: PciAddress,
        /// The operation.
        operation: &'static str,
        /// The interrupt kind in use.
        kind: InterruptKind,
        /// The bit the operation raises.
        bit: u32,
        /// The interrupt status read after the timeout.
        status: u32,
        /// How long the driver waited.
        waited: Duration,
    },
    /// The device raised the operation's bit, but no interrupt reached the driver within
    /// the timeout (for INTx: masked and never unmasked; for MSI: bus mastering off). The
    /// bit is acknowledged.
    #[error(
        "{address}: edu {operation}: register {} reads {status:#x}, bit {bit:#x} raised, but no {kind} interrupt arrived within {waited:?}",
        Register::InterruptStatus
    )]
    InterruptLost {
        /// The device.
        address: PciAddress,
        /// The operation.
        operation: &'static str,
        /// The interrupt kind in use.
        kind: InterruptKind,
        /// The bit the operation raises.
        bit: u32,
        /// The interrupt status read after the timeout.
        status: u32,
        /// How long the driver waited.
        waited: Duration,
    },
    /// Waiting on the interrupt's eventfd failed.
    #[error("{address}: edu: waiting for the {kind} interrupt failed: {error}")]
    Wait {
        /// The device.
        address: PciAddress,
        /// The interrupt kind in use.
        kind: InterruptKind,
        /// The kernel's error.
        error: io::Error,
    },
    /// A transfer of a length edu cannot make.
    #[error("{address}: edu: a DMA transfer of {len} bytes: it moves 1 to {MAX_DMA_LEN} bytes")]
    DmaLength {
        /// The device.
        address: PciAddress,
        /// The length asked for.
        len: usize,
    },
    /// The backing placed a DMA buffer beyond what edu's 28 address lines reach (it
    /// ignored the constraint).
    #[error(
        "{address}: edu: DMA buffer at IOVA {iova:#x} (+{len:#x}) is beyond the device's {DMA_ADDRESS_BITS}-bit reach"
    )]
    DmaAddress {
        /// The device.
        address: PciAddress,
        /// The buffer's IOVA.
        iova: u64,
        /// Its length.
        len: usize,
    },
    /// The data that came back from the device differs from what went out.
    #[error(
        "{address}: edu: DMA round trip of {len} bytes came back different at byte {offset}: {got:#04x}, sent {sent:#04x}"
    )]
    DmaMismatch {
        /// The device.
        address: PciAddress,
        /// Bytes moved.
        len: usize,
        /// The first byte that differs.
        offset: usize,
        /// What went out.
        sent: u8,
        /// What came back.
        got: u8,
    },
    /// The device computed something else than it should have (the self-test).
    #[error("{address}: edu {operation}: expected {expected:#x}, the device said {got:#x}")]
    WrongResult {
        /// The device.
        address: PciAddress,
        /// The operation (`"12!"`).
        operation: String,
        /// The right answer.
        expected: u64,
        /// The device's.
        got: u64,
    },
}

impl EduError {
    /// Whether the device is gone (a register read all-ones, or the backing says so):
    /// nothing more can be done with it.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            EduError::Gone { .. }
                | EduError::Backing {
                    error: BackingError::Gone(_),
                    ..
                }
        )
    }
}

/// How [`Edu::open`] sets a device up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EduOptions {
    /// How long an operation waits for its interrupt, and the probe for work a previous
    /// user left running. Default 5 s (a transfer takes QEMU 100 ms of virtual time).
    pub timeout: Duration,
    /// The interrupt kind to use; `None` (the default): the best the device has
    /// ([`DeviceBacking::enable_best_interrupts`]: MSI, else INTx).
    pub interrupts: Option<InterruptKind>,
}

impl Default for EduOptions {
    fn default() -> Self {
        EduOptions {
            timeout: Duration::from_secs(5),
            interrupts: None,
        }
    }
}

impl EduOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`interrupts`](Self::interrupts): this kind only.
    pub fn interrupts(mut self, kind: InterruptKind) -> Self {
        self.interrupts = Some(kind);
        self
    }
}

/// One edu device, set up: its registers, its interrupt and two DMA buffers. Operations
/// take `&mut self`: one at a time, since they share the interrupt. Dropping it drops
/// every handle of the device it holds. See the [module docs](self).
#[derive(Debug)]
pub struct Edu<B: DeviceBacking> {
    address: PciAddress,
    regs: B::Registers,
    irq: Interrupt,
    version: u32,
    timeout: Duration,
    // Memory to the device, and back from it.
    outgoing: B::Dma,
    incoming: B::Dma,
    // The next value written to the liveness register (never 0, whose complement is
    // all-ones).
    liveness: u32,
}

/// The outcome of [`Edu::self_test`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SelfTest {
    /// The interrupt kind in use.
    pub kind: InterruptKind,
    /// The device's version (major, minor).
    pub version: (u8, u8),
    /// The factorial computed: `n` and `n!`.
    pub factorial: (u32, u32),
    /// Bytes sent to the device and back by DMA.
    pub dma_bytes: usize,
}

impl fmt::Display for SelfTest {
    /// `edu 1.0, MSI: alive, interrupt, 12! = 479001600, DMA 4095 bytes out and back`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "edu {}.{}, {}: alive, interrupt, {}! = {}, DMA {} bytes out and back",
            self.version.0, self.version.1, self.kind, self.factorial.0, self.factorial.1, self.dma_bytes
        )
    }
}

/// `n!` modulo 2³², as edu computes it.
pub fn wrapping_factorial(n: u32) -> u32 {
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

impl<B: DeviceBacking> Edu<B> {
    /// Sets up the edu device behind `backing` (the probe): maps BAR 0, checks the
    /// identification and liveness registers, waits (up to the timeout) for a factorial or
    /// transfer a previous user left running, acknowledges interrupts left raised,
    /// enables interrupts ([`EduOptions::interrupts`]), turns on the factorial's
    /// interrupt and allocates two DMA buffers below edu's 28-bit limit. Holds no handle
    /// of the device when it fails.
    pub fn open(backing: &B, options: &EduOptions) -> Result<Edu<B>, EduError> {
        let address = backing.address();
        let failed = |operation: &str| {
            let operation = operation.to_owned();
            move |error| EduError::Backing {
                address,
                operation,
                error,
            }
        };
        let regs = backing.map_bar(0).map_err(failed("mapping BAR 0"))?;
        let id = read_checked(address, &regs, Register::Identification)?;
        if id & 0xff != ID_MAGIC {
            return Err(EduError::NotEdu { address, id });
        }
        let mut liveness = 0x5eed_0001;
        check_alive(address, &regs, &mut liveness)?;
        wait_idle(
            address,
            &regs,
            Register::Status,
            STATUS_COMPUTING,
            options.timeout,
        )?;
        wait_idle(address, &regs, Register::DmaCommand, DMA_RUN, options.timeout)?;
        // A previous user's interrupt left raised would assert INTx at once, or be taken
        // for this user's: clear it before enabling interrupts.
        let stale = read_checked(address, &regs, Register::InterruptStatus)?;
        if stale != 0 {
            log::debug!("{address}: edu: acknowledging interrupt bits {stale:#x} left raised");
            write(address, &regs, Register::InterruptAcknowledge, stale)?;
        }
        let (kind, interrupts) = match options.interrupts {
            None => backing.enable_best_interrupts(1),
            Some(kind) => backing.enable_interrupts(kind, 1).map(|v| (kind, v)),
        }
        .map_err(failed("enabling interrupts"))?;
        let irq = interrupts.into_iter().next().ok_or_else(|| EduError::Backing {
            address,
            operation: format!("enabling {kind}"),
            error: BackingError::Other {
                address,
                message: "no vector came back".to_owned(),
            },
        })?;
        // Nothing the device did before is news.
        let _ = irq.take();
        write(address, &regs, Register::Status, STATUS_IRQ_FACTORIAL)?;
        let outgoing = alloc_below_limit(backing)?;
        let incoming = alloc_below_limit(backing)?;
        log::debug!("{address}: edu {id:#010x} set up with {kind}");
        Ok(Edu {
            address,
            regs,
            irq,
            version: id >> 16,
            timeout: options.timeout,
            outgoing,
            incoming,
            liveness,
        })
    }

    /// The device's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The interrupt kind in use.
    pub fn interrupt_kind(&self) -> InterruptKind {
        self.irq.kind()
    }

    /// The device's version, from the identification register: (major, minor).
    pub fn version(&self) -> (u8, u8) {
        ((self.version >> 8) as u8, self.version as u8)
    }

    /// The timeout of each operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Writes a value to the liveness register and checks that it reads back inverted.
    pub fn check_alive(&mut self) -> Result<(), EduError> {
        check_alive(self.address, &self.regs, &mut self.liveness)
    }

    /// Computes `n!` (modulo 2³², as the device does: see [`wrapping_factorial`]) on the
    /// device: waits for a factorial still computing, starts this one, waits for its
    /// interrupt and reads the result.
    pub fn factorial(&mut self, n: u32) -> Result<u32, EduError> {
        self.wait_idle(Register::Status, STATUS_COMPUTING)?;
        // Set again each time: cheap, and a reset device forgets it.
        self.write(Register::Status, STATUS_IRQ_FACTORIAL)?;
        self.write(Register::Factorial, n)?;
        self.wait_for(FACTORIAL_IRQ, "factorial")?;
        self.read_checked(Register::Factorial)
    }

    /// Raises [`TEST_IRQ`] through the interrupt raise register and waits for the
    /// interrupt: the interrupt path alone.
    pub fn test_interrupt(&mut self) -> Result<(), EduError> {
        self.write(Register::InterruptRaise, TEST_IRQ)?;
        self.wait_for(TEST_IRQ, "raised interrupt").map(drop)
    }

    /// Sends `data` (1 to [`MAX_DMA_LEN`] bytes) to the device's buffer by DMA and back
    /// into another DMA buffer, each transfer interrupt-driven, and checks that the same
    /// bytes came back ([`EduError::DmaMismatch`] names the first that did not).
    pub fn dma_roundtrip(&mut self, data: &[u8]) -> Result<(), EduError> {
        let len = data.len();
        if len == 0 || len > MAX_DMA_LEN {
            return Err(EduError::DmaLength {
                address: self.address,
                len,
            });
        }
        let address = self.address;
        let out_of_range = || EduError::DmaLength { address, len };
        self.outgoing.write_at(0, data).ok_or_else(out_of_range)?;
        // What comes back must overwrite every byte: start from the complement.
        let poison: Vec<u8> = data.iter().map(|b| !b).collect();
        self.incoming.write_at(0, &poison).ok_or_else(out_of_range)?;
        let (outgoing, incoming) = (self.outgoing.iova(), self.incoming.iova());
        self.transfer(outgoing, DMA_BUFFER, len, 0, "DMA to the device")?;
        self.transfer(DMA_BUFFER, incoming, len, DMA_TO_MEMORY, "DMA from the device")?;
        // The interrupt said the device wrote; read what it wrote, not an earlier view.
        crate::barrier::dma_rmb();
        let mut back = vec![0u8; len];
        self.incoming.read_at(0, &mut back).ok_or_else(out_of_range)?;
        match data.iter().zip(&back).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(offset) => Err(EduError::DmaMismatch {
                address: self.address,
                len,
                offset,
                sent: data[offset],
                got: back[offset],
            }),
        }
    }

    /// Liveness, an interrupt, `12!` and a round trip of [`MAX_DMA_LEN`] bytes of a
    /// pattern, each checked.
    pub fn self_test(&mut self) -> Result<SelfTest, EduError> {
        const N: u32 = 12;
        self.check_alive()?;
        self.test_interrupt()?;
        let got = self.factorial(N)?;
        let expected = wrapping_factorial(N);
        if got != expected {
            return Err(EduError::WrongResult {
                address: self.address,
                operation: format!("{N}!"),
                expected: expected.into(),
                got: got.into(),
            });
        }
        let seed = self.liveness;
        let data: Vec<u8> = (0..MAX_DMA_LEN)
            .map(|i| (i as u32).wrapping_mul(131).wrapping_add(seed) as u8)
            .collect();
        self.dma_roundtrip(&data)?;
        Ok(SelfTest {
            kind: self.interrupt_kind(),
            version: self.version(),
            factorial: (N, got),
            dma_bytes: data.len(),
        })
    }

    // One transfer: waits for a running one, programs source, destination and count,
    // starts it (after the stores to DMA memory, for the device to see them), and waits
    // for its interrupt.
    fn transfer(
        &mut self,
        source: u64,
        destination: u64,
        len: usize,
        direction: u32,
        operation: &'static str,
    ) -> Result<(), EduError> {
        self.wait_idle(Register::DmaCommand, DMA_RUN)?;
        self.write64(Register::DmaSource, source)?;
        self.write64(Register::DmaDestination, destination)?;
        self.write64(Register::DmaCount, len as u64)?;
        let command = DMA_RUN | direction | DMA_INTERRUPT;
        self.regs
            .write32_after_dma(Register::DmaCommand.offset(), command)
            .map_err(|error| self.backing_error(format!("writing {}", Register::DmaCommand), error))?;
        self.wait_for(DMA_IRQ, operation).map(drop)
    }

    // Waits for the interrupt that raises `bit`, acknowledging (and, for INTx,
    // unmasking) every interrupt on the way. Returns the interrupt status that had it.
    fn wait_for(&mut self, bit: u32, operation: &'static str) -> Result<u32, EduError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let kind = self.irq.kind();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let fired = self.irq.wait(Some(left)).map_err(|error| EduError::Wait {
                address: self.address,
                kind,
                error,
            })?;
            let status = self.read_checked(Register::InterruptStatus)?;
            if status != 0 {
                self.write(Register::InterruptAcknowledge, status)?;
            }
            if fired {
                // VFIO masked INTx when it fired; the cause is cleared now, so re-arm it.
                // (Nothing to do for MSI: `unmask` does nothing there.)
                self.irq
                    .unmask()
                    .map_err(|error| self.backing_error(format!("unmasking {kind}"), error))?;
            }
            if status & bit != 0 && fired {
                return Ok(status);
            }
            if !fired {
                let waited = start.elapsed();
                let address = self.address;
                return Err(if status & bit != 0 {
                    EduError::InterruptLost {
                        address,
                        operation,
                        kind,
                        bit,
                        status,
                        waited,
                    }
                } else {
                    EduError::NoInterrupt {
                        address,
                        operation,
                        kind,
                        bit,
                        status,
                        waited,
                    }
                });
            }
            // An interrupt for something else (a bit left from before): wait on.
            log::debug!(
                "{}: edu {operation}: interrupt with status {status:#x}, waiting for bit {bit:#x}",
                self.address
            );
        }
    }

    fn wait_idle(&self, register: Register, busy: u32) -> Result<(), EduError> {
        wait_idle(self.address, &self.regs, register, busy, self.timeout)
    }

    fn read_checked(&self, register: Register) -> Result<u32, EduError> {
        read_checked(self.address, &self.regs, register)
    }

    fn write(&self, register: Register, value: u32) -> Result<(), EduError> {
        write(self.address, &self.regs, register, value)
    }

    fn write64(&self, register: Register, value: u64) -> Result<(), EduError> {
        self.regs
            .write64(register.offset(), value)
            .map_err(|error| self.backing_error(format!("writing {register}"), error))
    }

    fn backing_error(&self, operation: String, error: BackingError) -> EduError {
        EduError::Backing {
            address: self.address,
            operation,
            error,
        }
    }
}

// A DMA buffer the device can reach: the constraint asks for it, and the driver checks
// that the backing honoured it (a buffer beyond would be clamped by the device, which
// would then read and write someone else's memory).
fn alloc_below_limit<B: DeviceBacking>(backing: &B) -> Result<B::Dma, EduError> {
    let address = backing.address();
    let constraints = DmaConstraints::new().address_bits(DMA_ADDRESS_BITS);
    let dma = backing
        .alloc_dma_with(DMA_BUFFER_LEN, &constraints)
        .map_err(|error| EduError::Backing {
            address,
            operation: format!("allocating {DMA_BUFFER_LEN} bytes of DMA memory below 2^{DMA_ADDRESS_BITS}"),
            error,
        })?;
    if dma.iova().saturating_add(DMA_BUFFER_LEN as u64) > 1 << DMA_ADDRESS_BITS {
        return Err(EduError::DmaAddress {
            address,
            iova: dma.iova(),
            len: DMA_BUFFER_LEN,
        });
    }
    Ok(dma)
}

// A register that never reads all-ones on a live device: all-ones is the device gone.
fn read_checked<R: RegisterIo>(address: PciAddress, regs: &R, register: Register) -> Result<u32, EduError> {
    let value = regs
        .read32(register.offset())
        .map_err(|error| EduError::Backing {
            address,
            operation: format!("reading {register}"),
            error,
        })?;
    if value == u32::MAX {
        return Err(EduError::Gone {
            address,
            register,
            value,
        });
    }
    Ok(value)
}

fn write<R: RegisterIo>(
    address: PciAddress,
    regs: &R,
    register: Register,
    value: u32,
) -> Result<(), EduError> {
    regs.write32(register.offset(), value)
        .map_err(|error| EduError::Backing {
            address,
            operation: format!("writing {value:#x} to {register}"),
            error,
        })
}

// Writes `next` (then moves it on, skipping 0, whose complement is all-ones) and checks
// that the complement reads back.
fn check_alive<R: RegisterIo>(address: PciAddress, regs: &R, next: &mut u32) -> Result<(), EduError> {
    let wrote = *next;
    *next = next.wrapping_add(0x0101_0101).max(1);
    write(address, regs, Register::Liveness, wrote)?;
    let read = read_checked(address, regs, Register::Liveness)?;
    if read != !wrote {
        return Err(EduError::NotAlive { address, wrote, read });
    }
    Ok(())
}

// Polls `register` until its `busy` bits are clear, up to `timeout`.
fn wait_idle<R: RegisterIo>(
    address: PciAddress,
    regs: &R,
    register: Register,
    busy: u32,
    timeout: Duration,
) -> Result<(), EduError> {
    let start = Instant::now();
    loop {
        let value = read_checked(address, regs, register)?;
        if value & busy == 0 {
            return Ok(());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(EduError::Busy {
                address,
                register,
                value,
                waited,
            });
        }
        std::thread::sleep(IDLE_POLL);
    }
}

/// The [`Driver`] of edu devices: binds 1234:11e8 with [`Edu::open`]; the bus keeps each
/// [`Edu`] as the device's state until the device is taken back (reach it with
/// [`Bus::device_state_mut::<EduDriver<B>>`](crate::bus::Bus::device_state_mut)). See the
/// [module docs](self).
#[derive(Debug)]
pub struct EduDriver<B: DeviceBacking> {
    table: [IdEntry; 1],
    options: EduOptions,
    removed: Vec<Removal>,
    _backing: std::marker::PhantomData<fn() -> B>,
}

impl<B: DeviceBacking> Default for EduDriver<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: DeviceBacking> EduDriver<B> {
    /// The driver, with [`EduOptions::default`].
    pub fn new() -> Self {
        Self::with_options(EduOptions::default())
    }

    /// The driver, setting devices up with `options`.
    pub fn with_options(options: EduOptions) -> Self {
        EduDriver {
            table: [IdEntry::vendor_device(VENDOR_ID, DEVICE_ID)],
            options,
            removed: Vec::new(),
            _backing: std::marker::PhantomData,
        }
    }

    /// The devices taken back since the last call, oldest first (what
    /// [`Driver::remove`] received).
    pub fn take_removed(&mut self) -> Vec<Removal> {
        std::mem::take(&mut self.removed)
    }
}

impl<B: DeviceBacking> Driver<B> for EduDriver<B> {
    type Device = Edu<B>;

    fn name(&self) -> &str {
        "edu"
    }

    fn id_table(&self) -> &[IdEntry] {
        &self.table
    }

    fn probe(&mut self, device: ProbeDevice<'_, B>) -> ProbeOutcome<Edu<B>> {
        match Edu::open(device.backing, &self.options) {
            Ok(edu) => ProbeOutcome::Bound(edu),
            Err(e) => ProbeOutcome::Failed(Box::new(e)),
        }
    }

    fn remove(&mut self, edu: Edu<B>, removal: &Removal) {
        // The registers, the interrupt and the DMA memory go with it: no handle is left.
        drop(edu);
        self.removed.push(removal.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorials_wrap_as_the_device_computes_them() {
        assert_eq!(wrapping_factorial(0), 1);
        assert_eq!(wrapping_factorial(1), 1);
        assert_eq!(wrapping_factorial(12), 479_001_600);
        // 13! = 6227020800 = 0x1_7328_cc00.
        assert_eq!(wrapping_factorial(13), 0x7328_cc00);
    }

    #[test]
    fn registers_print_with_their_offsets() {
        assert_eq!(Register::InterruptStatus.to_string(), "interrupt status (0x24)");
        assert_eq!(Register::DmaCommand.offset(), 0x98);
    }
}
