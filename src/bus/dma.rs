//! DMA for drivers beyond one buffer at a time: [`DmaConstraints`] (what a device needs of
//! its DMA memory, defined beside the VFIO allocator that honours them, re-exported here),
//! and [`DmaPool`], many small blocks (descriptor rings, command buffers) carved out of a
//! few page-sized allocations.
//!
//! Memory the caller allocated is lent to a device through
//! [`DeviceBacking::map_dma`] (see [`CallerMemory`](crate::vfio::CallerMemory) for why
//! the caller gives it away while it is mapped) and comes back from
//! [`DeviceBacking::unmap_dma`].
//!
//! # Blocks and the no-late-DMA rule
//!
//! A [`DmaBlock`] is just memory: dropping it hands it back to its pool, where the next
//! [`DmaPool::alloc`] may give it out again at once, still mapped at the same IOVA. No
//! IOMMU unmap happens, so the IOVA quarantine of a removal
//! ([`DeviceBacking::quarantine_dma`]) does not cover it. Whoever hands a block's IOVA to
//! a device must keep the block until the device is done with it (the command completed,
//! the queue deleted, the device disabled or closed); a device that writes a block after
//! it was dropped writes into whatever the block holds next. The pages themselves stay
//! mapped for as long as the pool or any block of it lives.

use std::fmt;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::backing::{BackingError, DeviceBacking, DmaMemory};
use crate::vfio::{DmaObj, Scalar, cpu_page_size};

pub use crate::vfio::DmaConstraints;

/// The smallest block alignment: one word, the unit of the atomic accessors.
const WORD: usize = 8;

/// How a [`DmaPool`] carves its blocks: block size and alignment, chunk size, how many
/// chunks at most, and the constraints of every chunk. Built by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaPoolOptions {
    block_size: usize,
    align: usize,
    chunk_size: usize,
    max_chunks: Option<usize>,
    constraints: DmaConstraints,
}

impl DmaPoolOptions {
    /// Blocks of `block_size` bytes (at least 1), 8-byte aligned, from one-page chunks,
    /// as many chunks as needed, without constraints.
    pub fn new(block_size: usize) -> Self {
        DmaPoolOptions {
            block_size: block_size.max(1),
            align: WORD,
            chunk_size: cpu_page_size(),
            max_chunks: None,
            constraints: DmaConstraints::new(),
        }
    }

    /// Each block's IOVA (and offset in its chunk) a multiple of `bytes`: a power of two
    /// (one that is not is rounded up to the next), at least 8. Blocks are spaced by the
    /// block size rounded up to it.
    pub fn align(mut self, bytes: usize) -> Self {
        self.align = bytes
            .checked_next_power_of_two()
            .unwrap_or(1 << (usize::BITS - 1))
            .max(WORD);
        self
    }

    /// Allocates chunks of `bytes` (rounded up to whole pages, and to at least one block).
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// Holds at most `chunks` chunks: once they are all given out as blocks,
    /// [`DmaPool::alloc`] fails with [`BackingError::DmaPoolExhausted`].
    pub fn max_chunks(mut self, chunks: usize) -> Self {
        self.max_chunks = Some(chunks);
        self
    }

    /// Allocates every chunk with `constraints` ([`DeviceBacking::alloc_dma_with`]): an
    /// address limit, a NUMA node, device read-only. Their alignment is raised to the
    /// block alignment if that is larger.
    pub fn constraints(mut self, constraints: DmaConstraints) -> Self {
        self.constraints = constraints;
        self
    }

    /// The distance between blocks: the block size rounded up to the alignment.
    fn stride(&self) -> usize {
        self.block_size.next_multiple_of(self.align)
    }

    /// The chunk length asked of the backing.
    fn chunk_len(&self) -> usize {
        self.chunk_size
            .max(self.stride())
            .next_multiple_of(cpu_page_size())
    }
}

/// Many small DMA blocks of one size, carved out of chunks allocated with
/// [`DeviceBacking::alloc_dma_with`]: the pool allocates a chunk when it has no free block,
/// and reuses a dropped block first (last dropped, first reused). Blocks come zeroed.
///
/// A handle: clones share the pool. The pool holds a clone of the backing, so a driver
/// drops its pools (with its other handles) in
/// [`Driver::remove`](super::driver::Driver::remove); blocks hold no backing, only their
/// chunk.
///
/// # Dropping
///
/// Dropping the last handle frees the chunks no block uses; a chunk with live blocks lives
/// on (mapped) until its last block is dropped, then is unmapped and freed as any
/// allocation of the backing. See "Blocks and the no-late-DMA rule" in the
/// [module docs](self).
pub struct DmaPool<B: DeviceBacking> {
    shared: Arc<Shared<B>>,
}

impl<B: DeviceBacking> Clone for DmaPool<B> {
    fn clone(&self) -> Self {
        DmaPool {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<B: DeviceBacking> {
    backing: B,
    options: DmaPoolOptions,
    state: Mutex<State<B::Dma>>,
}

struct State<D> {
    chunks: usize,
    // Free blocks: their chunk and offset in it; the last pushed is reused first.
    free: Vec<(Arc<D>, usize)>,
}

impl<B: DeviceBacking> fmt::Debug for DmaPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("DmaPool")
            .field("address", &self.shared.backing.address())
            .field("options", &self.shared.options)
            .field("chunks", &state.chunks)
            .field("free_blocks", &state.free.len())
            .finish()
    }
}

impl<B: DeviceBacking> DmaPool<B> {
    /// A pool of `backing`'s DMA memory, carved as `options` say. Allocates nothing yet.
    pub fn new(backing: B, options: DmaPoolOptions) -> Self {
        DmaPool {
            shared: Arc::new(Shared {
                backing,
                options,
                state: Mutex::new(State {
                    chunks: 0,
                    free: Vec::new(),
                }),
            }),
        }
    }

    /// The size of each block, as asked.
    pub fn block_size(&self) -> usize {
        self.shared.options.block_size
    }

    /// How many chunks the pool has allocated (and holds, or its blocks do).
    pub fn chunks(&self) -> usize {
        self.shared.state.lock().chunks
    }

    /// How many blocks are free in the pool.
    pub fn free_blocks(&self) -> usize {
        self.shared.state.lock().free.len()
    }

    /// A zeroed block: a free one if there is one, else one of a new chunk.
    /// [`BackingError::DmaPoolExhausted`] when the pool holds its
    /// [`max_chunks`](DmaPoolOptions::max_chunks) and all their blocks are out; the
    /// backing's error when a chunk cannot be allocated (for an address limit:
    /// [`BackingError::NoDmaAddress`]).
    pub fn alloc(&self) -> Result<DmaBlock<B>, BackingError> {
        let shared = &self.shared;
        let options = &shared.options;
        let mut state = shared.state.lock();
        if state.free.is_empty() {
            if options.max_chunks.is_some_and(|max| state.chunks >= max) {
                return Err(BackingError::DmaPoolExhausted {
                    address: shared.backing.address(),
                    block_size: options.block_size,
                    chunks: state.chunks,
                });
            }
            let align = options.constraints.alignment().max(options.align as u64);
            let constraints = options.constraints.align(align);
            // Allocated under the lock: two threads finding the pool empty make one chunk.
            let chunk = Arc::new(shared.backing.alloc_dma_with(options.chunk_len(), &constraints)?);
            state.chunks += 1;
            let stride = options.stride();
            let blocks = chunk.len() / stride;
            // Pushed highest first, so the chunk's blocks go out in address order.
            state
                .free
                .extend((0..blocks).rev().map(|i| (Arc::clone(&chunk), i * stride)));
        }
        let (chunk, offset) = state.free.pop().expect("a free block, just ensured");
        drop(state);
        let block = DmaBlock {
            chunk,
            offset,
            len: options.block_size,
            pool: Arc::downgrade(shared),
        };
        block.zero();
        Ok(block)
    }
}

/// A block of a [`DmaPool`]: `len` bytes at [`iova`](Self::iova), reached through the same
/// atomic accessors as a [`DmaBuffer`](crate::vfio::DmaBuffer) (offsets relative to the
/// block, checked against its length; never a reference into the memory). Dropping it
/// hands it back to its pool (see the [module docs](self) on late DMA), or, when the
/// pool is gone, lets its chunk go once no block of it is left.
pub struct DmaBlock<B: DeviceBacking> {
    chunk: Arc<B::Dma>,
    offset: usize,
    len: usize,
    pool: Weak<Shared<B>>,
}

impl<B: DeviceBacking> fmt::Debug for DmaBlock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBlock")
            .field("iova", &format_args!("{:#x}", self.iova()))
            .field("len", &self.len)
            .finish()
    }
}

impl<B: DeviceBacking> Drop for DmaBlock<B> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.state
                .lock()
                .free
                .push((Arc::clone(&self.chunk), self.offset));
        }
    }
}

impl<B: DeviceBacking> DmaBlock<B> {
    /// The address the device uses for the block's first byte.
    pub fn iova(&self) -> u64 {
        self.chunk.iova() + self.offset as u64
    }

    /// The block's length (the pool's block size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty; here for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk offset of `len` bytes at block offset `offset`, if they lie in the block.
    fn at(&self, offset: usize, len: usize) -> Option<usize> {
        (offset.checked_add(len)? <= self.len).then_some(self.offset + offset)
    }

    /// [`DmaBuffer::read`](crate::vfio::DmaBuffer::read) at block offset `offset`.
    pub fn read<T: Scalar>(&self, offset: usize) -> Option<T> {
        self.chunk.read(self.at(offset, size_of::<T>())?)
    }

    /// [`DmaBuffer::write`](crate::vfio::DmaBuffer::write) at block offset `offset`.
    pub fn write<T: Scalar>(&self, offset: usize, value: T) -> Option<()> {
        self.chunk.write(self.at(offset, size_of::<T>())?, value)
    }

    /// [`DmaBuffer::load_acquire`](crate::vfio::DmaBuffer::load_acquire) at block offset
    /// `offset`.
    pub fn load_acquire<T: Scalar>(&self, offset: usize) -> Option<T> {
        self.chunk.load_acquire(self.at(offset, size_of::<T>())?)
    }

    /// [`DmaBuffer::store_release`](crate::vfio::DmaBuffer::store_release) at block offset
    /// `offset`.
    pub fn store_release<T: Scalar>(&self, offset: usize, value: T) -> Option<()> {
        self.chunk.store_release(self.at(offset, size_of::<T>())?, value)
    }

    /// [`DmaBuffer::read_at`](crate::vfio::DmaBuffer::read_at) at block offset `offset`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        self.chunk.read_at(self.at(offset, dst.len())?, dst)
    }

    /// [`DmaBuffer::write_at`](crate::vfio::DmaBuffer::write_at) at block offset `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Option<()> {
        self.chunk.write_at(self.at(offset, src.len())?, src)
    }

    /// [`DmaBuffer::write_words`](crate::vfio::DmaBuffer::write_words) at block offset
    /// `offset`.
    pub fn write_words(&self, offset: usize, words: &[u64]) -> Option<()> {
        self.chunk
            .write_words(self.at(offset, words.len().checked_mul(WORD)?)?, words)
    }

    /// [`DmaBuffer::read_obj`](crate::vfio::DmaBuffer::read_obj) at block offset `offset`.
    pub fn read_obj<T: DmaObj>(&self, offset: usize) -> Option<T> {
        self.chunk.read_obj(self.at(offset, size_of::<T>())?)
    }

    /// [`DmaBuffer::write_obj`](crate::vfio::DmaBuffer::write_obj) at block offset
    /// `offset`.
    pub fn write_obj<T: DmaObj>(&self, offset: usize, value: &T) -> Option<()> {
        self.chunk.write_obj(self.at(offset, size_of::<T>())?, value)
    }

    /// Sets `len` bytes at block offset `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Option<()> {
        self.chunk.fill(self.at(offset, len)?, len, byte)
    }

    /// Zeroes the whole block.
    pub fn zero(&self) {
        // In bounds by construction: the block lies inside its chunk.
        let _ = self.fill(0, self.len, 0);
    }
}
