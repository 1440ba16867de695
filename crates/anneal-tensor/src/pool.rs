//! A cache of freed f32 buffers, reused by later allocations of the same length.
//!
//! A training step allocates the same activation and gradient sizes every time. Fresh large
//! allocations come from the operating system as untouched pages, and faulting them in cost more
//! than the arithmetic of the elementwise ops that filled them (measured: an add over 2 MB spent
//! most of its time in page faults). Keeping freed buffers, keyed by exact length, turns those into
//! a reuse and a memset. Small buffers bypass the cache; the cache holds at most
//! [`MAX_CACHED_BYTES`] and [`empty_cache`] returns it to the system.
//!
//! Buffers are allocated with their capacity rounded up to a size class (eight classes per
//! power of two, so at most 12.5% more capacity, whose untouched pages the system does not
//! back), and cached by class: a Mixture-of-Experts layer's buffers change length every step
//! with the tokens each expert takes, and keyed by exact length they never met a buffer to
//! reuse (measured: 8% of a step in the kernel zeroing fresh pages, and the cache filling with
//! lengths never asked for again).
//!
//! Conversion scratch of elementwise work is not cached: the f32 copy `Tensor::with_f32` widens a
//! bf16/f16 tensor into, and the f32 values a half-precision result is narrowed from
//! (`Buffer::from_f32`). The operands `matmul` and attention widen are cached like any f32 tensor:
//! dropping those too saved another 6 MB but tripled page faults (+20% step time). A half-precision run's tensors are not f32, so
//! such buffers would only be reused by the next conversion of the same length and would otherwise
//! sit in the cache through the whole forward pass, when memory peaks. Handed back to the
//! allocator instead, their memory serves the bf16 activations (measured on the GPT benchmark
//! in bf16: peak RSS 194 → 179 MB, step time unchanged within noise).

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers smaller than this (in elements) are left to the allocator.
const MIN_LEN: usize = 1 << 14;
/// Upper bound on cached bytes.
pub const MAX_CACHED_BYTES: usize = 1 << 30;

struct Cache {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(|| Cache {
        free: HashMap::new(),
        bytes: 0,
    });
    f(cache)
}

/// A zero-filled f32 buffer of `len` elements, reusing a cached one when possible.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    if len < MIN_LEN {
        return vec![0.0; len];
    }
    let mut v = uninit(len);
    v.fill(0.0);
    v
}

/// The spacing of the size classes around `n`: an eighth of the power of two at or below it.
fn class_step(n: usize) -> usize {
    let power = 1usize << (usize::BITS - 1 - n.leading_zeros());
    (power / 8).max(1)
}

/// The smallest size class holding `len` elements.
fn class_above(len: usize) -> usize {
    len.div_ceil(class_step(len)) * class_step(len)
}

/// The largest size class a buffer of `capacity` elements can serve in full.
fn class_below(capacity: usize) -> usize {
    capacity / class_step(capacity) * class_step(capacity)
}

/// An f32 buffer of `len` elements whose contents are unspecified (stale values from an earlier
/// use, or zeros): for outputs that are written in full before being read.
pub(crate) fn uninit(len: usize) -> Vec<f32> {
    if len < MIN_LEN {
        return vec![0.0; len];
    }
    cached(len).unwrap_or_else(|| {
        // Zeroed pages from the system, the tail beyond `len` never touched.
        let mut v = vec![0.0; class_above(len)];
        v.truncate(len);
        v
    })
}

/// A cached buffer of `len` elements (stale contents) if the cache holds one of its class.
pub(crate) fn cached(len: usize) -> Option<Vec<f32>> {
    if len < MIN_LEN {
        return None;
    }
    let class = class_above(len);
    let mut v = with_cache(|c| {
        let v = c.free.get_mut(&class).and_then(|l| l.pop());
        if let Some(v) = &v {
            c.bytes -= v.capacity() * 4;
        }
        v
    })?;
    // Growing within the class zeroes only the part the previous use did not hold.
    v.resize(len, 0.0);
    Some(v)
}

/// Hands a buffer back for reuse.
pub(crate) fn recycle(v: Vec<f32>) {
    let capacity = v.capacity();
    if v.len() < MIN_LEN || capacity < MIN_LEN {
        return;
    }
    with_cache(|c| {
        if c.bytes + capacity * 4 <= MAX_CACHED_BYTES {
            c.bytes += capacity * 4;
            c.free.entry(class_below(capacity)).or_default().push(v);
        }
    });
}

/// Frees every cached buffer.
pub fn empty_cache() {
    with_cache(|c| {
        c.free.clear();
        c.bytes = 0;
    });
}

/// Bytes held in the cache now.
pub fn cached_bytes() -> usize {
    with_cache(|c| c.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_an_eighth_of_a_power_of_two_apart() {
        assert_eq!(class_above(1 << 14), 1 << 14);
        assert_eq!(class_above((1 << 14) + 1), (1 << 14) + (1 << 11));
        assert_eq!(class_above(3 << 14), 3 << 14);
        assert_eq!(class_below((1 << 15) - 1), (1 << 15) - (1 << 11));
        for len in [16384, 20000, 40001, 1 << 20, 3_000_017] {
            let c = class_above(len);
            assert!(c >= len && (c - len) * 8 <= len, "{len} -> {c}");
            assert_eq!(class_below(c), c, "{c} is a class");
        }
    }

    #[test]
    fn a_buffer_of_another_length_in_the_same_class_is_reused() {
        // A length no other test asks for, so no other test takes the buffer in between.
        let v = uninit(3_000_017);
        assert_eq!(v.len(), 3_000_017);
        let (ptr, capacity) = (v.as_ptr(), v.capacity());
        assert_eq!(capacity, class_above(3_000_017));
        recycle(v);
        let w = uninit(2_999_000);
        assert_eq!(w.len(), 2_999_000);
        assert_eq!(w.as_ptr(), ptr, "reused");
        recycle(w);
        let z = zeros(3_000_017);
        assert!(z.iter().all(|&x| x == 0.0));
    }
}
