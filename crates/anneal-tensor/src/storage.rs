//! Reference-counted element buffers, with a live/peak byte count of every buffer the engine holds.
//!
//! The byte counters make memory claims testable: activation checkpointing, freeing saved tensors
//! during backward and bf16 storage are all checked against [`memory_stats`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};

use crate::DType;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of tensor storage alive now, and the most alive at once since the last [`reset_peak_memory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live tensor buffers.
    pub live_bytes: usize,
    /// High-water mark of `live_bytes`.
    pub peak_bytes: usize,
}

/// Current and peak bytes held by tensor buffers in this process.
pub fn memory_stats() -> MemoryStats {
    MemoryStats {
        live_bytes: LIVE_BYTES.load(Ordering::Relaxed),
        peak_bytes: PEAK_BYTES.load(Ordering::Relaxed),
    }
}

/// Restarts the peak count from the bytes alive now.
pub fn reset_peak_memory() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn account_alloc(bytes: usize) {
    let live = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
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
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; values.len()];
                crate::kernels::f32_to_bf16(&values, &mut out);
                // Not recycled: see `pool`'s note on conversion scratch.
                Buffer::BF16(out)
            }
            DType::F16 => {
                let out = values.iter().map(|&x| f16::from_f32(x)).collect();
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
            Buffer::F16(v) => {
                for (d, &x) in v[start..start + n].iter_mut().zip(values) {
                    *d = f16::from_f32(x);
                }
            }
        }
    }

    /// Copies elements `range` into `out` as f32.
    pub fn read_range_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Buffer::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Buffer::BF16(v) => crate::kernels::bf16_to_f32(&v[start..start + n], out),
            Buffer::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = x.to_f32();
                }
            }
        }
    }
}

/// A tensor's backing buffer, shared by every view of it. The lock is uncontended in normal use:
/// kernels take read access, and only optimizers and gradient accumulation write.
#[derive(Debug)]
pub struct Storage {
    buffer: RwLock<Buffer>,
    bytes: usize,
}

impl Storage {
    /// Wraps a buffer, counting its bytes.
    pub fn new(buffer: Buffer) -> Storage {
        let bytes = buffer.len() * buffer.dtype().size_in_bytes();
        account_alloc(bytes);
        Storage {
            buffer: RwLock::new(buffer),
            bytes,
        }
    }

    /// Shared access to the elements.
    pub fn read(&self) -> RwLockReadGuard<'_, Buffer> {
        self.buffer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive access to the elements (crate-internal: replacing the buffer would invalidate
    /// every view's bounds).
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Buffer> {
        self.buffer.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
        let buffer = self.buffer.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Buffer::F32(v) = std::mem::replace(buffer, Buffer::F32(Vec::new())) {
            crate::pool::recycle(v);
        }
    }
}
