//! Reference-counted element buffers, with a live/peak byte count of every buffer the engine holds.
//!
//! The byte counters make memory claims testable: activation checkpointing, freeing saved tensors
//! during backward and bf16 storage are all checked against [`memory_stats`]. Gradient storage
//! (a parameter store's gradient buffers, and gradients in flight to other ranks) is also
//! counted on its own, so a sharded strategy's gradient memory is measured, not inferred.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};

use crate::DType;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);
static GRAD_LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static GRAD_PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of tensor storage alive now, and the most alive at once since the last [`reset_peak_memory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live tensor buffers.
    pub live_bytes: usize,
    /// High-water mark of `live_bytes`.
    pub peak_bytes: usize,
    /// Bytes of gradient storage alive now (part of `live_bytes`, plus gradients handed to a
    /// communicator and not yet reduced, which are not tensor storage): see [`GradientBytes`].
    pub grad_live_bytes: usize,
    /// High-water mark of `grad_live_bytes`.
    pub grad_peak_bytes: usize,
}

/// Current and peak bytes held by tensor buffers in this process.
pub fn memory_stats() -> MemoryStats {
    MemoryStats {
        live_bytes: LIVE_BYTES.load(Ordering::Relaxed),
        peak_bytes: PEAK_BYTES.load(Ordering::Relaxed),
        grad_live_bytes: GRAD_LIVE_BYTES.load(Ordering::Relaxed),
        grad_peak_bytes: GRAD_PEAK_BYTES.load(Ordering::Relaxed),
    }
}

/// Restarts the peak counts from the bytes alive now.
pub fn reset_peak_memory() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
    GRAD_PEAK_BYTES.store(GRAD_LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn account_alloc(bytes: usize) {
    let live = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

fn account_grad(bytes: usize) {
    let live = GRAD_LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    GRAD_PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

/// Gradient bytes held outside tensor storage, counted in [`MemoryStats::grad_live_bytes`] until
/// dropped: a strategy takes a gradient bucket out of its storage
/// ([`Storage::take_f32`]) and hands it to a communicator, and the bytes are still the
/// gradient's until the reduction completes.
#[derive(Debug)]
pub struct GradientBytes(usize);

impl GradientBytes {
    /// Counts `bytes` of gradients until the returned value is dropped.
    pub fn hold(bytes: usize) -> GradientBytes {
        account_grad(bytes);
        GradientBytes(bytes)
    }
}

impl Drop for GradientBytes {
    fn drop(&mut self) {
        GRAD_LIVE_BYTES.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// Elements of one dtype, contiguous.
#[derive(Debug)]
pub enum Buffer {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
}

impl Buffer {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) => DType::F32,
            Buffer::BF16(_) => DType::BF16,
            Buffer::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::BF16(v) => v.len(),
            Buffer::F16(v) => v.len(),
        }
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A zero-filled buffer.
    pub fn zeros(dtype: DType, len: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(crate::pool::zeros(len)),
            DType::BF16 => Buffer::BF16(vec![bf16::ZERO; len]),
            DType::F16 => Buffer::F16(vec![f16::ZERO; len]),
        }
    }

    /// Converts f32 values into a buffer of `dtype` (round to nearest even for half types).
    pub fn from_f32(values: Vec<f32>, dtype: DType) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(values),
            // `values` is not recycled: see `pool`'s note on conversion scratch.
            DType::BF16 => Buffer::BF16(crate::kernels::map_to(&values, |x| x)),
            DType::F16 => {
                let mut out = vec![f16::ZERO; values.len()];
                crate::kernels::f32_to_f16(&values, &mut out);
                Buffer::F16(out)
            }
        }
    }

    /// Reads element `i` widened to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Buffer::F32(v) => v[i],
            Buffer::BF16(v) => v[i].to_f32(),
            Buffer::F16(v) => v[i].to_f32(),
        }
    }

    /// Writes element `i`, narrowing from f32.
    #[inline]
    pub fn set_f32(&mut self, i: usize, x: f32) {
        match self {
            Buffer::F32(v) => v[i] = x,
            Buffer::BF16(v) => v[i] = bf16::from_f32(x),
            Buffer::F16(v) => v[i] = f16::from_f32(x),
        }
    }

    /// Writes `values` from element `start`, narrowing from f32.
    pub fn write_range_f32(&mut self, start: usize, values: &[f32]) {
        let n = values.len();
        match self {
            Buffer::F32(v) => v[start..start + n].copy_from_slice(values),
            Buffer::BF16(v) => {
                for (d, &x) in v[start..start + n].iter_mut().zip(values) {
                    *d = bf16::from_f32(x);
                }
            }
            Buffer::F16(v) => crate::kernels::f32_to_f16(values, &mut v[start..start + n]),
        }
    }

    /// Copies elements `range` into `out` as f32.
    pub fn read_range_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Buffer::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Buffer::BF16(v) => crate::kernels::bf16_to_f32(&v[start..start + n], out),
            Buffer::F16(v) => crate::kernels::f16_to_f32(&v[start..start + n], out),
        }
    }
}

/// A tensor's backing buffer, shared by every view of it. The lock is uncontended in normal use:
/// kernels take read access, and only optimizers and gradient accumulation write.
///
/// A gradient storage counts its bytes as gradient memory too. A lazy one ([`Storage::lazy`])
/// holds no memory until first touched, when it becomes zeros, and can give its memory back
/// ([`Storage::release`], [`Storage::take_f32`]): ZeRO-2's gradient buckets live only from the
/// first gradient written into them until they are reduced.
#[derive(Debug)]
pub struct Storage {
    buffer: RwLock<Buffer>,
    /// Bytes when allocated.
    bytes: usize,
    gradient: bool,
    /// `Some(allocated)` for a lazy storage.
    lazy: Option<AtomicBool>,
    /// Whether the values were given back ([`Storage::release_values`]) and not restored yet.
    released: AtomicBool,
}

impl Storage {
    /// Where the buffer lives: host memory, for every buffer today.
    pub fn device(&self) -> crate::Device {
        crate::Device::Cpu
    }

    /// Wraps a buffer, counting its bytes.
    pub fn new(buffer: Buffer) -> Storage {
        let bytes = buffer.len() * buffer.dtype().size_in_bytes();
        account_alloc(bytes);
        Storage {
            buffer: RwLock::new(buffer),
            bytes,
            gradient: false,
            lazy: None,
            released: AtomicBool::new(false),
        }
    }

    /// Zeroed gradient storage of `len` elements of `dtype` (f32, or bf16 for a store that keeps
    /// 16-bit gradients), counted as gradient memory.
    pub fn gradient(dtype: DType, len: usize) -> Storage {
        let bytes = len * dtype.size_in_bytes();
        account_alloc(bytes);
        account_grad(bytes);
        // Zeroed by the allocator, not taken from the buffer cache: its pages are touched only
        // when backward first writes them, so a buffer laid out again before any backward (a
        // store switched to bf16 gradients) never costs resident memory.
        let buffer = match dtype {
            DType::F32 => Buffer::F32(vec![0.0; len]),
            other => Buffer::zeros(other, len),
        };
        Storage {
            buffer: RwLock::new(buffer),
            bytes,
            gradient: true,
            lazy: None,
            released: AtomicBool::new(false),
        }
    }

    /// f32 gradient storage of `len` elements that takes no memory until first read or written,
    /// when it is zeros.
    pub fn lazy(len: usize) -> Storage {
        Storage {
            buffer: RwLock::new(Buffer::F32(Vec::new())),
            bytes: len * 4,
            gradient: true,
            lazy: Some(AtomicBool::new(false)),
            released: AtomicBool::new(false),
        }
    }

    /// Allocates a lazy storage's zeros if it holds none.
    fn materialize(&self) {
        let Some(allocated) = &self.lazy else { return };
        if allocated.load(Ordering::Acquire) {
            return;
        }
        let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
        if !allocated.load(Ordering::Acquire) {
            *buf = Buffer::zeros(DType::F32, self.bytes / 4);
            account_alloc(self.bytes);
            account_grad(self.bytes);
            allocated.store(true, Ordering::Release);
        }
    }

    /// Takes a lazy storage's values out, leaving it empty (its memory is no longer counted;
    /// it reads as zeros again if touched). `None` when it held nothing, or is not lazy.
    pub fn take_f32(&self) -> Option<Vec<f32>> {
        let allocated = self.lazy.as_ref()?;
        let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
        if !allocated.swap(false, Ordering::AcqRel) {
            return None;
        }
        LIVE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
        GRAD_LIVE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
        match std::mem::replace(&mut *buf, Buffer::F32(Vec::new())) {
            Buffer::F32(v) => Some(v),
            _ => unreachable!("lazy storage is f32"),
        }
    }

    /// Gives a lazy storage's memory back (it reads as zeros if touched again).
    pub fn release(&self) {
        if let Some(v) = self.take_f32() {
            crate::pool::recycle(v);
        }
    }

    /// Whether the storage holds its memory now (always, unless lazy or released).
    pub fn is_allocated(&self) -> bool {
        self.lazy.as_ref().is_none_or(|a| a.load(Ordering::Acquire))
            && !self.released.load(Ordering::Acquire)
    }

    /// Gives the values' memory back while the storage lives on (a value the autograd graph
    /// keeps for backward, which can be computed again before it is needed: ZeRO-3 frees the
    /// parameters a layer gathered when the layer's forward ends). Reading it before
    /// [`Storage::restore_values`] panics. False when there was nothing to release (already
    /// released, or a lazy storage, which has [`Storage::release`]).
    pub fn release_values(&self) -> bool {
        if self.lazy.is_some() {
            return false;
        }
        let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
        if self.released.swap(true, Ordering::AcqRel) {
            return false;
        }
        let dtype = buf.dtype();
        // Freed, not kept in the engine's cache of buffers: the point is to give the memory back.
        *buf = Buffer::from_f32(Vec::new(), dtype);
        LIVE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
        true
    }

    /// Puts released values back ([`Storage::release_values`]), converted to the storage's
    /// dtype; fails unless the storage was released and `values` has its length.
    pub fn restore_values(&self, values: Vec<f32>) -> crate::Result<()> {
        let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
        let dtype = buf.dtype();
        let len = self.bytes / dtype.size_in_bytes();
        if !self.released.load(Ordering::Acquire) || values.len() != len {
            return Err(crate::Error::Invalid {
                op: "Storage::restore_values",
                reason: format!(
                    "{} values for a storage of {len} that {}",
                    values.len(),
                    if self.released.load(Ordering::Acquire) {
                        "was released"
                    } else {
                        "holds its values"
                    }
                ),
            });
        }
        *buf = Buffer::from_f32(values, dtype);
        account_alloc(self.bytes);
        self.released.store(false, Ordering::Release);
        Ok(())
    }

    /// Whether the values were released and not restored.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// The dtype of the elements (a lazy storage's, f32, without allocating it).
    pub fn dtype(&self) -> DType {
        match &self.lazy {
            Some(_) => DType::F32,
            None => self
                .buffer
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .dtype(),
        }
    }

    /// Shared access to the elements.
    pub fn read(&self) -> RwLockReadGuard<'_, Buffer> {
        assert!(
            !self.released.load(Ordering::Acquire),
            "a tensor's values were released (ZeRO-3 frees a layer's gathered parameters after \
             its forward) and read before they were restored"
        );
        self.materialize();
        self.buffer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive access to the elements (crate-internal: replacing the buffer would invalidate
    /// every view's bounds).
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Buffer> {
        self.materialize();
        self.buffer.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the elements of an f32 storage for writing (a strategy adds reduced
    /// gradients into a gradient shard this way); `None` for another dtype.
    pub fn with_f32_mut<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> Option<R> {
        match &mut *self.write() {
            Buffer::F32(v) => Some(f(v)),
            _ => None,
        }
    }

    /// Size in bytes (of a lazy storage: what it holds now).
    pub fn bytes(&self) -> usize {
        if self.is_allocated() {
            self.bytes
        } else {
            0
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let held = self.bytes();
        LIVE_BYTES.fetch_sub(held, Ordering::Relaxed);
        if self.gradient {
            GRAD_LIVE_BYTES.fetch_sub(held, Ordering::Relaxed);
        }
        let buffer = self.buffer.get_mut().unwrap_or_else(|e| e.into_inner());
        // A whole gradient buffer is dropped only when a store lays its gradients out anew
        // (freezing, sharding, another dtype): kept in the cache it would sit there, as large as
        // the model, for the rest of the run.
        if let Buffer::F32(v) = std::mem::replace(buffer, Buffer::F32(Vec::new())) {
            if !self.gradient {
                crate::pool::recycle(v);
            }
        }
    }
}
