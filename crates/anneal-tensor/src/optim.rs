//! Optimizers over a [`ParamStore`]'s flat buffers: AdamW and SGD with momentum, each one fused
//! pass over the trainable parameters, split into blocks that run on all threads.
//!
//! An optimizer's state (moments, momentum, master copy) is laid out like the store's gradient
//! buffer: trainable parameters only, so a frozen parameter costs no optimizer memory. The step
//! takes the learning rate (as llm.c's update does), scaled per [`crate::ParamGroup`].
//!
//! Half-precision parameters get an f32 master copy inside the optimizer: the update is computed
//! and kept in f32 and only the result is rounded into the model's bf16/f16 buffer
//! (Micikevicius et al. 2018, "Mixed Precision Training").

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;

use crate::params::ParamStore;
use crate::storage::Buffer;
use crate::DType;

/// Elements per parallel block of an optimizer step.
const BLOCK: usize = 1 << 15;

/// A contiguous run of one parameter's elements: its place in the parameter buffer, in the
/// gradient buffer and optimizer state, and the settings of its group.
#[derive(Clone, Copy)]
struct Run {
    /// First element in the parameter buffer.
    data: usize,
    /// First element in the gradient buffer.
    grad: usize,
    /// First element in every state vector (the gradient offset less the shard's start).
    state: usize,
    len: usize,
    /// Learning rate for this run (the step's, times its group's scale).
    lr: f32,
    /// Decoupled weight decay for this run (0 where decay is off).
    weight_decay: f32,
}

/// The trainable runs of the store within `shard` (a range of the gradient buffer), cut into
/// blocks, with each group's learning rate and decay.
fn runs(store: &ParamStore, lr: f32, weight_decay: f32, shard: &Range<usize>) -> Vec<Run> {
    let mut out = Vec::new();
    for (p, data, grad) in store.trainable_ranges() {
        let (lo, hi) = (grad.start.max(shard.start), grad.end.min(shard.end));
        if lo >= hi {
            continue;
        }
        let group = &store.groups()[p.group];
        let decay = if p.weight_decay {
            group.weight_decay.unwrap_or(weight_decay)
        } else {
            0.0
        };
        let mut s = lo - grad.start;
        while s < hi - grad.start {
            // Blocks end at multiples of BLOCK in the state space, so whole 8-bit blocks of the
            // moments fall in one task (see `for_each_block`).
            let state = grad.start + s - shard.start;
            let len = (BLOCK - state % BLOCK).min(hi - grad.start - s);
            out.push(Run {
                data: data.start + s,
                grad: grad.start + s,
                state: grad.start + s - shard.start,
                len,
                lr: lr * group.lr_scale,
                weight_decay: decay,
            });
            s += len;
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    fn new(v: &mut [T]) -> Self {
        Ptr(v.as_mut_ptr())
    }

    /// Elements `start..start + len`.
    ///
    /// SAFETY: the caller hands out disjoint ranges of a buffer at least `start + len` long that
    /// outlives the slice.
    unsafe fn range<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

thread_local! {
    /// Each thread's f32 view of a bf16 block during an update (at most [`BLOCK`] elements).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's decoded 16- and 8-bit moments during an update (at most [`BLOCK`] each).
    static DECODED: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a block's f32 parameter values live during an update.
#[derive(Clone, Copy)]
enum Target {
    /// An f32 store, updated in place.
    F32(Ptr<f32>),
    /// A bf16 store and the low halves of its master copy, joined into f32 for the update.
    Split(Ptr<half::bf16>, Ptr<u16>),
    /// A bf16 store without a master copy: widened for the update, rounded back stochastically.
    Rounded(Ptr<half::bf16>),
    /// The f32 master copy of an f16 store, rounded into the store after the update.
    Master(Ptr<f32>, Ptr<half::f16>),
}

/// What seeds a step's stochastic rounding: the step and the shard's first element, so each
/// element's random bits depend on its place in the whole state and a sharded optimizer rounds
/// as the whole one does.
#[derive(Clone, Copy)]
struct Rounding {
    step: u64,
    offset: usize,
}

impl Rounding {
    /// 32 random bits for element `index` of the shard's state `salt`: a counter-based hash (the
    /// step and salt mixed into a key, then MurmurHash3's 32-bit finaliser of the element's place
    /// under it), so a resumed run draws the same bits, and in 32-bit arithmetic so the loops
    /// vectorise.
    #[inline(always)]
    fn bits(self, salt: u64, index: usize) -> u32 {
        let key = self.step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ salt.wrapping_mul(0xd1b5_4a32_d192_ed03);
        let i = (self.offset + index) as u64;
        let mut h = (i as u32)
            ^ ((i >> 32) as u32).wrapping_mul(0x85eb_ca6b)
            ^ (key as u32)
            ^ ((key >> 32) as u32).wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
}

/// `x` rounded to bf16 stochastically with 16 random bits `r`: up with probability equal to the
/// dropped fraction, so the rounding is unbiased and updates below bf16's resolution still move
/// a value on average (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision").
#[inline(always)]
fn round_stochastic(x: f32, r: u32) -> u16 {
    let bits = x.to_bits();
    // Finite values carry at most into the exponent (to infinity past bf16's largest); a NaN
    // keeps its top bits with the quiet bit set. A select, so the loop vectorises.
    let rounded = ((bits + (r & 0xffff)) >> 16) as u16;
    if x.is_nan() {
        (bits >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// A view of one state vector for the parallel blocks of a step.
#[derive(Clone, Copy)]
enum StatePtr {
    F32(Ptr<f32>),
    BF16(Ptr<u16>, u64),
    Int8(Ptr<u8>, Ptr<f32>, bool),
}

impl StatePtr {
    /// Decodes state elements `range` (whole 8-bit blocks) into `out`.
    ///
    /// SAFETY: as [`Ptr::range`]; `range` is this task's.
    unsafe fn decode(self, range: Range<usize>, out: &mut [f32]) {
        match self {
            StatePtr::F32(_) => unreachable!("f32 state is updated in place"),
            StatePtr::BF16(p, _) => {
                for (o, &b) in out.iter_mut().zip(p.range(range.start, range.len()).iter()) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            StatePtr::Int8(codes, scales, root) => {
                let (codes, scales) = int8_range(codes, scales, &range);
                int8_decode(codes, scales, root, out);
            }
        }
    }

    /// Encodes `values` into state elements `range`.
    ///
    /// SAFETY: as [`StatePtr::decode`].
    unsafe fn encode(self, range: Range<usize>, values: &[f32], rounding: Rounding) {
        match self {
            StatePtr::F32(_) => unreachable!("f32 state is updated in place"),
            StatePtr::BF16(p, salt) => {
                for (i, (b, &x)) in p
                    .range(range.start, range.len())
                    .iter_mut()
                    .zip(values)
                    .enumerate()
                {
                    *b = round_stochastic(x, rounding.bits(salt, range.start + i));
                }
            }
            StatePtr::Int8(codes, scales, root) => {
                let (codes, scales) = int8_range(codes, scales, &range);
                int8_encode(values, codes, scales, root);
            }
        }
    }
}

/// The codes of state elements `range` (whole 8-bit blocks) and their blocks' scales.
///
/// SAFETY: as [`Ptr::range`].
unsafe fn int8_range<'a>(
    codes: Ptr<u8>,
    scales: Ptr<f32>,
    range: &Range<usize>,
) -> (&'a mut [u8], &'a mut [f32]) {
    let b = crate::quant8::BLOCK;
    (
        codes.range(range.start, range.len()),
        scales.range(range.start / b, range.len().div_ceil(b)),
    )
}

/// The values of 8-bit moments: each block's codes at its scale, squared where the moment is
/// stored as its square root (`root`, [`Moments::Int8`]).
fn int8_decode(codes: &[u8], scales: &[f32], root: bool, out: &mut [f32]) {
    let (q, b) = (crate::quant8::quantizer(), crate::quant8::BLOCK);
    for ((c, &s), o) in codes.chunks(b).zip(scales).zip(out.chunks_mut(b)) {
        q.decode(c, s, o);
    }
    if root {
        out.iter_mut().for_each(|x| *x *= *x);
    }
}

/// [`int8_decode`]'s inverse: `values` quantised block by block (their square roots with `root`,
/// never to zero where not zero).
fn int8_encode(values: &[f32], codes: &mut [u8], scales: &mut [f32], root: bool) {
    let (q, b) = (crate::quant8::quantizer(), crate::quant8::BLOCK);
    let mut roots = [0.0f32; crate::quant8::BLOCK];
    for ((v, c), s) in values.chunks(b).zip(codes.chunks_mut(b)).zip(scales) {
        let v = if root {
            let r = &mut roots[..v.len()];
            r.iter_mut().zip(v).for_each(|(r, x)| *r = x.sqrt());
            &*r
        } else {
            v
        };
        *s = q.encode(v, c, root);
    }
}

/// Runs `update(run, params, grads, states...)` on every block in parallel with the f32 view of
/// the parameters (the master copy for half-precision stores) and of the states (decoded from
/// 16 or 8 bits), then rounds back into the store and re-encodes the states.
fn for_each_block(
    store: &ParamStore,
    master: &mut Master,
    states: &mut [&mut Moments],
    runs: &[Run],
    n: usize,
    rounding: Rounding,
    update: impl Fn(Run, &mut [f32], &[f32], &mut [&mut [f32]]) + Sync,
) {
    assert!(
        states.iter().all(|s| s.len() == n) && master.len_matches(n),
        "optimizer state was built for a store of another size: create the optimizer from the \
         store it steps, after freezing"
    );
    // Values written into the store since the master copy was taken (a checkpoint load) win.
    if master.version != store.version() {
        *master = master.retaken(store);
    }
    let held = store.held_grads();
    assert!(
        runs.iter()
            .all(|r| held.start <= r.grad && r.grad + r.len <= held.end),
        "the optimizer steps gradients this store does not hold (it holds {held:?}): shard the \
         optimizer as the gradients are sharded"
    );
    let grads = store.grads().read();
    let grads = &*grads;
    let mut data = store.data().write();
    let target = match (&mut *data, &mut master.values) {
        (Buffer::F32(v), _) => Target::F32(Ptr::new(v)),
        (Buffer::BF16(v), MasterValues::Low(lo)) => Target::Split(Ptr::new(v), Ptr::new(lo)),
        (Buffer::BF16(v), MasterValues::Rounded) => Target::Rounded(Ptr::new(v)),
        (Buffer::F16(v), MasterValues::Full(m)) => Target::Master(Ptr::new(m), Ptr::new(v)),
        _ => unreachable!("half-precision stores have a master copy or round stochastically"),
    };
    let state_ptrs: Vec<StatePtr> = states
        .iter_mut()
        .enumerate()
        .map(|(i, s)| s.ptr(i as u64 + 1))
        .collect();
    // One task per BLOCK of the state space: its runs (one per parameter it touches) share the
    // decoded states, and its 8-bit blocks lie wholly inside it.
    let tasks: Vec<&[Run]> = runs
        .chunk_by(|a, b| a.state / BLOCK == b.state / BLOCK)
        .collect();
    tasks.par_iter().for_each(|task| {
        let s0 = task[0].state;
        let last = task[task.len() - 1];
        let span = s0..last.state + last.len;
        DECODED.with(|decoded| {
            let mut decoded = decoded.borrow_mut();
            decoded.resize_with(state_ptrs.len(), Vec::new);
            // SAFETY: tasks are disjoint ranges of the state space (which every state vector,
            // the master copy and the gradient buffer share) and their runs disjoint ranges of
            // the parameter buffer.
            // A run's bf16 gradients, widened (allocated only for a bf16 gradient buffer).
            let mut wide = Vec::new();
            let mut views: Vec<&mut [f32]> = state_ptrs
                .iter()
                .zip(decoded.iter_mut())
                .map(|(p, buf)| match *p {
                    StatePtr::F32(p) => unsafe { p.range(span.start, span.len()) },
                    other => {
                        buf.resize(span.len(), 0.0);
                        crate::kernels::vectorized(|| unsafe { other.decode(span.clone(), buf) });
                        &mut buf[..]
                    }
                })
                .collect();
            for &r in task.iter() {
                let mut st: Vec<&mut [f32]> = views
                    .iter_mut()
                    .map(|v| &mut v[r.state - s0..r.state - s0 + r.len])
                    .collect();
                let at = r.grad - held.start..r.grad - held.start + r.len;
                let g: &[f32] = match grads {
                    Buffer::F32(g) => &g[at],
                    Buffer::BF16(g) => {
                        wide.resize(r.len, 0.0);
                        crate::kernels::bf16_to_f32(&g[at], &mut wide);
                        &wide
                    }
                    Buffer::F16(_) => unreachable!("gradients are f32 or bf16"),
                };
                crate::kernels::vectorized(|| match target {
                    Target::F32(p) => update(r, unsafe { p.range(r.data, r.len) }, g, &mut st),
                    Target::Master(m, store) => {
                        let m = unsafe { m.range(r.state, r.len) };
                        update(r, m, g, &mut st);
                        use half::slice::HalfFloatSliceExt;
                        unsafe { store.range(r.data, r.len) }.convert_from_f32_slice(m);
                    }
                    Target::Split(hi, lo) => {
                        let (hi, lo) =
                            unsafe { (hi.range(r.data, r.len), lo.range(r.state, r.len)) };
                        SCRATCH.with(|x| {
                            let mut x = x.borrow_mut();
                            x.resize(r.len, 0.0);
                            crate::kernels::join_bf16(hi, lo, &mut x);
                            update(r, &mut x, g, &mut st);
                            crate::kernels::split_bf16(&x, hi, lo);
                        });
                    }
                    Target::Rounded(hi) => {
                        let hi = unsafe { hi.range(r.data, r.len) };
                        SCRATCH.with(|x| {
                            let mut x = x.borrow_mut();
                            x.clear();
                            x.extend(hi.iter().map(|h| h.to_f32()));
                            update(r, &mut x, g, &mut st);
                            for (i, (h, &v)) in hi.iter_mut().zip(x.iter()).enumerate() {
                                let bits = rounding.bits(0, r.state + i);
                                *h = half::bf16::from_bits(round_stochastic(v, bits));
                            }
                        });
                    }
                });
            }
            for (p, view) in state_ptrs.iter().zip(views) {
                if !matches!(p, StatePtr::F32(_)) {
                    crate::kernels::vectorized(|| unsafe {
                        p.encode(span.clone(), view, rounding)
                    });
                }
            }
        });
    });
}

/// How AdamW keeps its two moments (`optimizer.moments` in a run's configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MomentDType {
    /// 4 bytes per moment.
    #[default]
    F32,
    /// bf16 with stochastic rounding: 2 bytes per moment, unbiased.
    BF16,
    /// Block-wise dynamic 8-bit quantisation ([`crate::quant8::Quantizer`], Dettmers et al.
    /// 2022): 1 byte per moment and 4 per block of 2,048.
    Int8,
}

impl MomentDType {
    /// Every kind, by its configuration name.
    pub const NAMES: [(&'static str, MomentDType); 3] = [
        ("f32", MomentDType::F32),
        ("bf16", MomentDType::BF16),
        ("8bit", MomentDType::Int8),
    ];

    /// The kind named `name` (one of [`MomentDType::NAMES`]).
    pub fn parse(name: &str) -> Option<MomentDType> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, k)| k)
    }

    /// Bytes per moment element (the 8-bit scales spread over their blocks).
    pub fn bytes_per_element(self) -> f64 {
        match self {
            MomentDType::F32 => 4.0,
            MomentDType::BF16 => 2.0,
            MomentDType::Int8 => 1.0 + 4.0 / crate::quant8::BLOCK as f64,
        }
    }
}

/// One optimizer state vector in its kind's storage.
enum Moments {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    BF16(Vec<u16>),
    /// Codes and one scale per block of [`crate::quant8::BLOCK`]. A second moment (`root`) is
    /// stored as its square root, which spans half the orders of magnitude (a block's gradients
    /// may differ a thousandfold, their squares a millionfold, the dynamic map's whole range),
    /// and never as zero where it is not ([`crate::quant8::Quantizer::encode`]'s `root`).
    Int8 {
        codes: Vec<u8>,
        scales: Vec<f32>,
        root: bool,
    },
}

impl Moments {
    fn zeros(kind: MomentDType, n: usize, root: bool) -> Moments {
        match kind {
            MomentDType::F32 => Moments::F32(vec![0.0; n]),
            MomentDType::BF16 => Moments::BF16(vec![0; n]),
            MomentDType::Int8 => Moments::from_values(kind, vec![0.0; n], root),
        }
    }

    /// The state in `kind` from f32 `values`: exact for values this kind wrote
    /// ([`Moments::values`]); rounded to nearest (bf16) or quantised (8-bit) otherwise.
    fn from_values(kind: MomentDType, values: Vec<f32>, root: bool) -> Moments {
        match kind {
            MomentDType::F32 => Moments::F32(values),
            MomentDType::BF16 => Moments::BF16(
                values
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect(),
            ),
            MomentDType::Int8 => {
                let b = crate::quant8::BLOCK;
                let mut codes = vec![0u8; values.len()];
                let mut scales = vec![0.0; values.len().div_ceil(b)];
                codes
                    .par_chunks_mut(b)
                    .zip(scales.par_iter_mut())
                    .zip(values.par_chunks(b))
                    .for_each(|((c, s), v)| int8_encode(v, c, std::slice::from_mut(s), root));
                Moments::Int8 {
                    codes,
                    scales,
                    root,
                }
            }
        }
    }

    /// Values `from..from + out.len()` in f32, from which [`Moments::from_values`] rebuilds
    /// this very state; `from` is a multiple of [`crate::quant8::BLOCK`].
    fn read(&self, from: usize, out: &mut [f32]) {
        let to = from + out.len();
        match self {
            Moments::F32(v) => out.copy_from_slice(&v[from..to]),
            Moments::BF16(v) => out
                .iter_mut()
                .zip(&v[from..to])
                .for_each(|(o, &b)| *o = f32::from_bits((b as u32) << 16)),
            Moments::Int8 {
                codes,
                scales,
                root,
            } => {
                // √(r²) is r again in f32 (above squares that underflow, below 1e-19).
                let b = crate::quant8::BLOCK;
                debug_assert!(from.is_multiple_of(b));
                int8_decode(&codes[from..to], &scales[from / b..], *root, out);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Moments::F32(v) => v.len(),
            Moments::BF16(v) => v.len(),
            Moments::Int8 { codes, .. } => codes.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Moments::F32(v) => 4 * v.len(),
            Moments::BF16(v) => 2 * v.len(),
            Moments::Int8 { codes, scales, .. } => codes.len() + 4 * scales.len(),
        }
    }

    /// A view for the parallel blocks; `salt` tells this vector's random bits from another's.
    fn ptr(&mut self, salt: u64) -> StatePtr {
        match self {
            Moments::F32(v) => StatePtr::F32(Ptr::new(v)),
            Moments::BF16(v) => StatePtr::BF16(Ptr::new(v), salt),
            Moments::Int8 {
                codes,
                scales,
                root,
            } => StatePtr::Int8(Ptr::new(codes), Ptr::new(scales), *root),
        }
    }
}

/// The f32 master copy of a half-precision store, over its trainable parameters.
enum MasterValues {
    /// f32 stores are their own master.
    None,
    /// bf16 stores: the 16 low bits each parameter's f32 master value drops
    /// ([`crate::kernels::split_bf16`]), so the master copy costs 2 bytes per parameter.
    Low(Vec<u16>),
    /// f16 stores: a full f32 copy (f16 is not a truncation of f32).
    Full(Vec<f32>),
    /// bf16 stores trained without a master copy: each update is rounded into the store
    /// stochastically.
    Rounded,
}

/// The master copy and the store version it reflects.
struct Master {
    values: MasterValues,
    version: u64,
}

impl Master {
    /// Bytes held beyond the store itself.
    fn bytes(&self) -> usize {
        match &self.values {
            MasterValues::None | MasterValues::Rounded => 0,
            MasterValues::Low(v) => 2 * v.len(),
            MasterValues::Full(v) => 4 * v.len(),
        }
    }

    fn len_matches(&self, n: usize) -> bool {
        match &self.values {
            MasterValues::None | MasterValues::Rounded => true,
            MasterValues::Low(v) => v.len() == n,
            MasterValues::Full(v) => v.len() == n,
        }
    }

    /// A master copy of the same kind taken afresh from the store.
    fn retaken(&self, store: &ParamStore) -> Master {
        master_copy(store, !matches!(self.values, MasterValues::Rounded))
    }
}

/// The master copy of `store` (none for f32); a bf16 store without `keep` rounds stochastically
/// instead (an f16 store always keeps one).
fn master_copy(store: &ParamStore, keep: bool) -> Master {
    let values = match store.dtype() {
        DType::F32 => MasterValues::None,
        DType::BF16 if !keep => MasterValues::Rounded,
        DType::BF16 => MasterValues::Low(vec![0; store.trainable_numel()]),
        DType::F16 => MasterValues::Full(store.trainable_values(0..store.trainable_numel())),
    };
    Master {
        values,
        version: store.version(),
    }
}

/// Whether a checkpoint saves a master copy: a half-precision store's that keeps one.
fn has_master(master: &Master) -> bool {
    matches!(master.values, MasterValues::Low(_) | MasterValues::Full(_))
}

/// Elements `from..from + out.len()` (of state order) of the master copy of a half-precision
/// store that keeps one, in f32 (for checkpoints).
fn read_master(master: &Master, store: &ParamStore, from: usize, out: &mut [f32]) {
    let range = from..from + out.len();
    match &master.values {
        MasterValues::None | MasterValues::Rounded => {
            unreachable!("no master copy to read")
        }
        // Values written since the last step win, as the next step will take them.
        _ if master.version != store.version() => {
            out.copy_from_slice(&store.trainable_values(range))
        }
        MasterValues::Full(m) => out.copy_from_slice(&m[range]),
        MasterValues::Low(lo) => {
            let data = store.data().read();
            let Buffer::BF16(hi) = &*data else {
                unreachable!("low halves belong to a bf16 store")
            };
            for (_, d, s) in store.trainable_ranges() {
                let (a, b) = (s.start.max(range.start), s.end.min(range.end));
                if a < b {
                    let at = d.start + (a - s.start);
                    crate::kernels::join_bf16(
                        &hi[at..at + (b - a)],
                        &lo[a..b],
                        &mut out[a - from..b - from],
                    );
                }
            }
        }
    }
}

/// A master copy from a checkpoint's f32 values: a bf16 store takes their bf16 part, so the pair
/// is exact again.
///
/// A checkpoint and a run may differ in keeping a master copy: a saved copy is rounded into a
/// store that keeps none, and a store that keeps one without a saved copy takes its own values.
fn master_from(
    store: &ParamStore,
    shard: Range<usize>,
    keep: bool,
    values: Option<Vec<f32>>,
) -> crate::Result<Master> {
    let n = store.trainable_numel();
    let values = match (values, store.dtype()) {
        (None, DType::F32) => MasterValues::None,
        (None, DType::BF16 | DType::F16) => return Ok(master_copy(store, keep)),
        (Some(x), DType::BF16) if x.len() == n && !keep => {
            if let Buffer::BF16(hi) = &mut *store.data().write() {
                for (_, d, s) in store.trainable_ranges() {
                    crate::kernels::f32_to_bf16(&x[s], &mut hi[d]);
                }
            }
            MasterValues::Rounded
        }
        (Some(x), DType::BF16) if x.len() == n => {
            let mut lo = vec![0u16; n];
            if let Buffer::BF16(hi) = &mut *store.data().write() {
                for (_, d, s) in store.trainable_ranges() {
                    crate::kernels::split_bf16(&x[s.clone()], &mut hi[d], &mut lo[s]);
                }
            }
            MasterValues::Low(lo)
        }
        (Some(x), DType::F16) if x.len() == n => MasterValues::Full(x),
        // A half-precision run's master copy resumed in f32: the exact values, not the rounded
        // parameters (of the shard a sharded optimizer keeps).
        (Some(x), DType::F32) if x.len() == shard.len() => {
            store.set_trainable_values(shard.start, &x);
            MasterValues::None
        }
        (x, d) => {
            return Err(crate::error::invalid(
                "optimizer master copy",
                format!(
                    "a master copy of {} elements does not fit a {d:?} store of {n} trainable \
                     elements (f32 stores have none)",
                    x.map_or(0, |x| x.len())
                ),
            ))
        }
    };
    Ok(Master {
        values,
        version: store.version(),
    })
}

/// What the training loop needs of an optimizer: a step at a given learning rate, and its state
/// as named flat vectors for checkpoints.
pub trait Optimizer: Send {
    /// One update from the gradients in `store` at learning rate `lr` (scaled per group).
    fn step(&mut self, store: &ParamStore, lr: f32);

    /// Steps taken.
    fn steps(&self) -> u64;

    /// Bytes of optimizer state.
    fn state_bytes(&self) -> usize;

    /// The names and lengths of the state's flat f32 vectors, in the order [`Optimizer::state`]
    /// returns them.
    fn state_layout(&self) -> Vec<(String, usize)>;

    /// Elements `from..from + out.len()` of state vector `index` ([`Optimizer::state_layout`]'s
    /// order) in f32, `from` a multiple of [`STATE_CHUNK`]: a checkpoint streams the state
    /// through this a chunk at a time instead of holding an f32 copy of it.
    fn read_state(&self, store: &ParamStore, index: usize, from: usize, out: &mut [f32]);

    /// The state as named flat f32 vectors in the store's state order (what a checkpoint saves).
    fn state(&self, store: &ParamStore) -> Vec<(String, Vec<f32>)> {
        self.state_layout()
            .into_iter()
            .enumerate()
            .map(|(i, (name, n))| {
                let mut v = vec![0.0; n];
                for (c, out) in v.chunks_mut(STATE_CHUNK).enumerate() {
                    self.read_state(store, i, c * STATE_CHUNK, out);
                }
                (name, v)
            })
            .collect()
    }

    /// Restores [`Optimizer::state`] after the parameters have been loaded into `store`, so a
    /// master copy is not re-read from the rounded parameters. Fails naming a missing or
    /// mis-sized vector.
    fn load_state(
        &mut self,
        store: &ParamStore,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> crate::Result<()>;
}

/// Elements per piece of [`Optimizer::read_state`] (whole 8-bit blocks).
pub const STATE_CHUNK: usize = 64 * crate::quant8::BLOCK;

/// Takes the state vector `name` of `n` elements out of `state`.
fn state_vector(
    state: &HashMap<String, Vec<f32>>,
    name: &str,
    n: usize,
) -> crate::Result<Vec<f32>> {
    match state.get(name) {
        Some(v) if v.len() == n => Ok(v.clone()),
        Some(v) => Err(crate::error::invalid(
            "Optimizer::load_state",
            format!(
                "{name} holds {} elements; the store has {n} trainable elements",
                v.len()
            ),
        )),
        None => Err(crate::error::invalid(
            "Optimizer::load_state",
            format!("the saved state has no {name}"),
        )),
    }
}

/// AdamW hyper-parameters (Loshchilov & Hutter 2019). These defaults are anneal's one set of
/// optimizer defaults, which every command's configuration takes: β₁ 0.9, β₂ 0.99, ε 1e-8,
/// weight decay 0.1, as GPT pretraining recipes use (nanoGPT; PyTorch's own defaults are
/// β₂ 0.999 and weight decay 0.01, for which set them explicitly).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay β₁.
    pub beta1: f32,
    /// Second-moment decay β₂.
    pub beta2: f32,
    /// Added to √v̂.
    pub eps: f32,
    /// Decoupled weight decay λ: p ← p − lr·λ·p for parameters with decay on.
    pub weight_decay: f32,
    /// How the two moments are stored.
    pub moments: MomentDType,
    /// Whether a half-precision store keeps an f32 master copy; without one a bf16 store's
    /// updates are rounded into it stochastically (f16 stores always keep one).
    pub master_weights: bool,
}

impl AdamWConfig {
    /// Whether a store of `dtype` gets an f32 master copy: f16 always, bf16 unless
    /// `master_weights` is off, f32 never (it is its own).
    pub fn keeps_master(&self, dtype: DType) -> bool {
        match dtype {
            DType::F32 => false,
            DType::BF16 => self.master_weights,
            DType::F16 => true,
        }
    }

    /// Bytes of optimizer state per trainable parameter of a store of `dtype`: the two moments
    /// and the master copy (2 bytes for bf16, which keeps only the 16 bits it drops; 4 for f16).
    pub fn state_bytes_per_param(&self, dtype: DType) -> f64 {
        let master = match (self.keeps_master(dtype), dtype) {
            (false, _) => 0.0,
            (true, DType::BF16) => 2.0,
            (true, _) => 4.0,
        };
        2.0 * self.moments.bytes_per_element() + master
    }

    /// The defaults, usable in constants.
    pub const DEFAULT: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
        moments: MomentDType::F32,
        master_weights: true,
    };
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig::DEFAULT
    }
}

/// AdamW with decoupled weight decay, fused over the flat buffer.
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    m: Moments,
    v: Moments,
    master: Master,
    step: u64,
    /// The range of the gradient buffer this optimizer updates (all of it, or one rank's shard
    /// under ZeRO).
    shard: Range<usize>,
    /// Trainable elements of the store it was built for.
    total: usize,
}

impl AdamW {
    /// Zeroed moments for every trainable element of `store`.
    pub fn new(store: &ParamStore, config: AdamWConfig) -> AdamW {
        let n = store.trainable_numel();
        AdamW {
            config,
            m: Moments::zeros(config.moments, n, false),
            v: Moments::zeros(config.moments, n, true),
            master: master_copy(store, config.master_weights),
            step: 0,
            shard: 0..n,
            total: n,
        }
    }

    /// An optimizer for one shard of the trainable parameters (`shard`, a range of the gradient
    /// buffer), holding moments for that shard alone: ZeRO stage 1 (Rajbhandari et al. 2020)
    /// gives each rank one. Each element's update is the one [`AdamW::new`]'s would make, bit for
    /// bit. The shard's parameters are updated in the store; the rest are left as they are.
    /// f32 stores only, for now (a half-precision store's master copy is not sharded).
    pub fn shard(
        store: &ParamStore,
        config: AdamWConfig,
        shard: Range<usize>,
    ) -> crate::Result<AdamW> {
        let n = store.trainable_numel();
        if shard.start > shard.end || shard.end > n {
            return Err(crate::error::invalid(
                "AdamW::shard",
                format!("{shard:?} is not within the {n} trainable elements"),
            ));
        }
        if store.dtype() != DType::F32 {
            return Err(crate::error::invalid(
                "AdamW::shard",
                format!(
                    "a sharded optimizer needs f32 parameters, not {:?}",
                    store.dtype()
                ),
            ));
        }
        Ok(AdamW {
            config,
            m: Moments::zeros(config.moments, shard.len(), false),
            v: Moments::zeros(config.moments, shard.len(), true),
            master: master_copy(store, config.master_weights),
            step: 0,
            shard,
            total: n,
        })
    }

    /// The range of the gradient buffer this optimizer updates.
    pub fn shard_range(&self) -> Range<usize> {
        self.shard.clone()
    }

    /// The f32 master copy of a half-precision store's trainable parameters (for checkpoints);
    /// `None` for f32 stores. For a bf16 store it is rebuilt from the store and the low halves
    /// the optimizer keeps.
    pub fn master(&self, store: &ParamStore) -> Option<Vec<f32>> {
        has_master(&self.master).then(|| {
            let mut out = vec![0.0; self.m.len()];
            read_master(&self.master, store, 0, &mut out);
            out
        })
    }
}

impl Optimizer for AdamW {
    /// One update matching `torch.optim.AdamW`: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
    /// p ← p(1 − lr·λ) − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε).
    fn step(&mut self, store: &ParamStore, lr: f32) {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - (c.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (c.beta2 as f64).powi(self.step as i32);
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        assert!(
            store.trainable_numel() == self.total,
            "optimizer state was built for a store of another size: create the optimizer from the \
             store it steps, after freezing"
        );
        let runs = runs(store, lr, c.weight_decay, &self.shard);
        let n = self.shard.len();
        let rounding = Rounding {
            step: self.step,
            offset: self.shard.start,
        };
        let AdamW { m, v, master, .. } = self;
        for_each_block(
            store,
            master,
            &mut [m, v],
            &runs,
            n,
            rounding,
            |run, p, g, st| {
                let (ms, vs) = st.split_at_mut(1);
                let (m, v) = (&mut *ms[0], &mut *vs[0]);
                let decay = 1.0 - run.lr * run.weight_decay;
                let step_size = (run.lr as f64 / bc1) as f32;
                for i in 0..p.len() {
                    let gi = g[i];
                    m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                    v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
                    let denom = v[i].sqrt() * inv_sqrt_bc2 + c.eps;
                    p[i] = p[i] * decay - step_size * m[i] / denom;
                }
            },
        );
    }

    fn steps(&self) -> u64 {
        self.step
    }

    /// Both moments and, for a half-precision store, its master copy.
    fn state_bytes(&self) -> usize {
        self.m.bytes() + self.v.bytes() + self.master.bytes()
    }

    /// The moments and a master copy: 16- and 8-bit moments are read exactly as f32 (loading
    /// them into the same kind rebuilds the same bits; into another kind converts).
    fn state_layout(&self) -> Vec<(String, usize)> {
        let n = self.m.len();
        let mut out = vec![("adam.m".to_string(), n), ("adam.v".to_string(), n)];
        if has_master(&self.master) {
            out.push(("adam.master".to_string(), n));
        }
        out
    }

    fn read_state(&self, store: &ParamStore, index: usize, from: usize, out: &mut [f32]) {
        match index {
            0 => self.m.read(from, out),
            1 => self.v.read(from, out),
            _ => read_master(&self.master, store, from, out),
        }
    }

    fn load_state(
        &mut self,
        store: &ParamStore,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> crate::Result<()> {
        let n = self.shard.len();
        let m = state_vector(state, "adam.m", n)?;
        let v = state_vector(state, "adam.v", n)?;
        let keep = !matches!(self.master.values, MasterValues::Rounded);
        let master = master_from(
            store,
            self.shard.clone(),
            keep,
            state.get("adam.master").cloned(),
        )?;
        self.step = steps;
        self.m = Moments::from_values(self.config.moments, m, false);
        self.v = Moments::from_values(self.config.moments, v, true);
        self.master = master;
        Ok(())
    }
}

/// SGD with momentum and (coupled, L2) weight decay, matching `torch.optim.SGD`:
/// g ← g + λp, b ← μb + g, p ← p − lr·b; with Nesterov momentum p ← p − lr·(g + μb).
pub struct Sgd {
    /// Momentum μ (0 for plain SGD).
    pub momentum: f32,
    /// Nesterov momentum (Sutskever et al. 2013, in PyTorch's form).
    pub nesterov: bool,
    /// L2 penalty λ for parameters with decay on.
    pub weight_decay: f32,
    buf: Moments,
    master: Master,
    step: u64,
}

impl Sgd {
    /// A new optimizer for the trainable parameters of `store`.
    pub fn new(store: &ParamStore, momentum: f32, weight_decay: f32) -> Sgd {
        Sgd {
            momentum,
            nesterov: false,
            weight_decay,
            buf: Moments::F32(vec![0.0; store.trainable_numel()]),
            master: master_copy(store, true),
            step: 0,
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, store: &ParamStore, lr: f32) {
        let (mu, first, nesterov) = (self.momentum, self.step == 0, self.nesterov);
        self.step += 1;
        let n = store.trainable_numel();
        let runs = runs(store, lr, self.weight_decay, &(0..n));
        let rounding = Rounding {
            step: self.step,
            offset: 0,
        };
        let Sgd { buf, master, .. } = self;
        for_each_block(
            store,
            master,
            &mut [buf],
            &runs,
            n,
            rounding,
            |run, p, g, st| {
                let b = &mut *st[0];
                for i in 0..p.len() {
                    let gi = g[i] + run.weight_decay * p[i];
                    // PyTorch initialises the momentum buffer with the first gradient.
                    b[i] = if first { gi } else { mu * b[i] + gi };
                    p[i] -= run.lr
                        * if mu == 0.0 {
                            gi
                        } else if nesterov {
                            gi + mu * b[i]
                        } else {
                            b[i]
                        };
                }
            },
        );
    }

    fn steps(&self) -> u64 {
        self.step
    }

    /// The momentum buffer and, for a half-precision store, its master copy.
    fn state_bytes(&self) -> usize {
        self.buf.bytes() + self.master.bytes()
    }

    fn state_layout(&self) -> Vec<(String, usize)> {
        let n = self.buf.len();
        let mut out = vec![("sgd.momentum".to_string(), n)];
        if has_master(&self.master) {
            out.push(("sgd.master".to_string(), n));
        }
        out
    }

    fn read_state(&self, store: &ParamStore, index: usize, from: usize, out: &mut [f32]) {
        match index {
            0 => self.buf.read(from, out),
            _ => read_master(&self.master, store, from, out),
        }
    }

    fn load_state(
        &mut self,
        store: &ParamStore,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> crate::Result<()> {
        let buf = state_vector(state, "sgd.momentum", store.trainable_numel())?;
        self.master = master_from(
            store,
            0..store.trainable_numel(),
            true,
            state.get("sgd.master").cloned(),
        )?;
        self.buf = Moments::F32(buf);
        self.step = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParamStoreBuilder, Tensor};

    fn store(dtype: DType) -> ParamStore {
        let mut b = ParamStoreBuilder::new();
        b.add("w", &Tensor::from_f32(vec![1.0, -2.0], &[2]).unwrap(), true)
            .unwrap();
        b.add("bias", &Tensor::from_f32(vec![0.5], &[1]).unwrap(), false)
            .unwrap();
        b.build(dtype)
    }

    fn set_grads(s: &ParamStore, g: &[f32]) {
        let mut buf = s.grads().write();
        for (i, &v) in g.iter().enumerate() {
            buf.set_f32(i, v);
        }
    }

    #[test]
    fn the_norm_in_chunks_of_a_shard_adds_up_to_the_whole() {
        let mut b = ParamStoreBuilder::new();
        b.add("w", &Tensor::zeros(&[2500], DType::F32), true)
            .unwrap();
        let s = b.build(DType::F32);
        let g: Vec<f32> = (0..2500).map(|i| (i % 7) as f32 - 3.0).collect();
        set_grads(&s, &g);
        let chunk = crate::params::NORM_CHUNK;
        let mut parts = s.grad_norm_partials(0..chunk);
        parts.extend(s.grad_norm_partials(chunk..2500));
        assert_eq!(parts.iter().sum::<f64>().sqrt() as f32, s.grad_norm());
        // An empty shard at the end (its start need not be a chunk boundary) has no partials.
        assert!(s.grad_norm_partials(2500..2500).is_empty());
    }

    #[test]
    fn shards_update_their_elements_as_the_whole_optimizer_does() {
        let grads = [0.3, -1.5, 2.0];
        let whole = store(DType::F32);
        let mut opt = AdamW::new(&whole, AdamWConfig::DEFAULT);
        set_grads(&whole, &grads);
        opt.step(&whole, 0.1);
        let want = whole.trainable_values(0..3);
        // Shards 0..2 (inside "w") and 2..3 ("bias"), each on its own copy of the store.
        let mut got = [0.0f32; 3];
        for shard in [0..2, 2..3] {
            let s = store(DType::F32);
            let mut opt = AdamW::shard(&s, AdamWConfig::DEFAULT, shard.clone()).unwrap();
            assert_eq!(opt.state_bytes(), 8 * shard.len());
            set_grads(&s, &grads);
            opt.step(&s, 0.1);
            let after = s.trainable_values(0..3);
            got[shard.clone()].copy_from_slice(&after[shard.clone()]);
            let untouched = store(DType::F32).trainable_values(0..3);
            for i in (0..3).filter(|i| !shard.contains(i)) {
                assert_eq!(after[i], untouched[i], "outside the shard");
            }
        }
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let s = store(DType::F32);
        let e = AdamW::shard(&s, AdamWConfig::DEFAULT, 2..5).err().unwrap();
        assert!(
            e.to_string()
                .contains("not within the 3 trainable elements"),
            "{e}"
        );
        let e = AdamW::shard(&store(DType::BF16), AdamWConfig::DEFAULT, 0..1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("f32 parameters"), "{e}");
    }

    #[test]
    fn sgd_momentum_and_decay_match_the_update_rule() {
        let s = store(DType::F32);
        let mut opt = Sgd::new(&s, 0.9, 0.01);
        set_grads(&s, &[1.0, 1.0, 1.0]);
        opt.step(&s, 0.1);
        // w: g = 1 + 0.01·w; b = g; w -= 0.1·b.  bias: no decay.
        let w0 = [1.0f32, -2.0];
        let g0: Vec<f32> = w0.iter().map(|w| 1.0 + 0.01 * w).collect();
        let w1: Vec<f32> = w0.iter().zip(&g0).map(|(w, g)| w - 0.1 * g).collect();
        assert_eq!(s.by_name("w").unwrap().to_vec_f32(), w1);
        assert_eq!(s.by_name("bias").unwrap().to_vec_f32(), vec![0.5 - 0.1]);
        opt.step(&s, 0.1);
        let g1: Vec<f32> = w1.iter().map(|w| 1.0 + 0.01 * w).collect();
        let w2: Vec<f32> = w1
            .iter()
            .zip(g0.iter().zip(&g1))
            .map(|(w, (a, b))| w - 0.1 * (0.9 * a + b))
            .collect();
        let got = s.by_name("w").unwrap().to_vec_f32();
        assert!(
            got.iter().zip(&w2).all(|(a, b)| (a - b).abs() < 1e-6),
            "{got:?} vs {w2:?}"
        );
    }

    #[test]
    fn sgd_nesterov_steps_by_the_gradient_plus_momentum_times_the_buffer() {
        let s = store(DType::F32);
        let mut opt = Sgd::new(&s, 0.9, 0.0);
        opt.nesterov = true;
        // Step 1: b = g = 1, update g + 0.9·b = 1.9. Step 2 with g = 2: b = 0.9 + 2 = 2.9,
        // update 2 + 0.9·2.9 = 4.61 (torch.optim.SGD(nesterov=True) gives the same).
        set_grads(&s, &[1.0, 1.0, 1.0]);
        opt.step(&s, 0.1);
        assert_eq!(s.by_name("bias").unwrap().to_vec_f32(), vec![0.5 - 0.19]);
        set_grads(&s, &[2.0, 2.0, 2.0]);
        opt.step(&s, 0.1);
        let got = s.by_name("bias").unwrap().to_vec_f32()[0];
        assert!((got - (0.5 - 0.19 - 0.461)).abs() < 1e-6, "{got}");
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_and_skips_decay_where_excluded() {
        let s = store(DType::F32);
        let mut opt = AdamW::new(
            &s,
            AdamWConfig {
                weight_decay: 0.5,
                ..Default::default()
            },
        );
        set_grads(&s, &[2.0, -3.0, 0.0]);
        opt.step(&s, 0.1);
        // First step: m̂ = g, v̂ = g², update = lr·g/(|g| + eps) ≈ ±lr; decay (1 − lr·λ) on w only.
        let w = s.by_name("w").unwrap().to_vec_f32();
        assert!(
            (w[0] - (1.0 * 0.95 - 0.1)).abs() < 1e-6 && (w[1] - (-2.0 * 0.95 + 0.1)).abs() < 1e-6,
            "{w:?}"
        );
        assert_eq!(s.by_name("bias").unwrap().to_vec_f32(), vec![0.5]);
    }

    #[test]
    fn frozen_parameters_get_no_gradient_and_no_update() {
        let mut s = store(DType::F32);
        let id = s.id("w").unwrap();
        s.set_requires_grad(id, false);
        let x = Tensor::from_f32(vec![3.0, 4.0], &[2]).unwrap();
        let loss = s
            .get(id)
            .mul(&x)
            .unwrap()
            .add(&s.by_name("bias").unwrap().clone())
            .unwrap()
            .sum_all()
            .unwrap();
        loss.backward().unwrap();
        assert!(!s.get(id).requires_grad());
        let mut opt = AdamW::new(&s, AdamWConfig::default());
        assert_eq!(opt.state_bytes(), 4 * 2, "moments for the bias alone");
        opt.step(&s, 0.1);
        assert_eq!(s.by_name("w").unwrap().to_vec_f32(), vec![1.0, -2.0]);
        assert_ne!(s.by_name("bias").unwrap().to_vec_f32(), vec![0.5]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let s = store(DType::F32);
        set_grads(&s, &[3.0, 4.0, 0.0]);
        assert!((s.clip_grad_norm(1.0) - 5.0).abs() < 1e-6);
        assert!((s.grad_norm() - 1.0).abs() < 1e-5);
        assert!(
            (s.clip_grad_norm(10.0) - 1.0).abs() < 1e-5,
            "no change under the limit"
        );
    }

    #[test]
    fn half_parameters_accumulate_small_updates_in_the_master_copy() {
        // 1e-4 steps vanish when rounded to the stored type one at a time (spacing near 1 is 2⁻¹⁰
        // in f16, 2⁻⁷ in bf16), but the f32 master copy keeps them and they add up.
        for (dtype, tolerance) in [(DType::F16, 0.002), (DType::BF16, 0.005)] {
            let mut b = ParamStoreBuilder::new();
            b.add("w", &Tensor::from_f32(vec![1.0], &[1]).unwrap(), false)
                .unwrap();
            let s = b.build(dtype);
            let mut opt = Sgd::new(&s, 0.0, 0.0);
            for _ in 0..200 {
                set_grads(&s, &[-1.0]);
                opt.step(&s, 1e-4);
            }
            let w = s.by_name("w").unwrap().to_vec_f32()[0];
            assert!((w - 1.02).abs() < tolerance, "{dtype:?}: {w}");
        }
    }

    #[test]
    fn state_bytes_count_moments_and_master_copy() {
        let store = |dtype| {
            let mut b = ParamStoreBuilder::new();
            b.add("w", &Tensor::zeros(&[10, 3], DType::F32), true)
                .unwrap();
            b.build(dtype)
        };
        let adam = |dtype| AdamW::new(&store(dtype), AdamWConfig::default()).state_bytes();
        let sgd = |dtype| Sgd::new(&store(dtype), 0.9, 0.0).state_bytes();
        // f32: the moments only; bf16 adds the 2 low bytes per value, f16 a full f32 copy.
        assert_eq!(
            [adam(DType::F32), adam(DType::BF16), adam(DType::F16)],
            [240, 300, 360]
        );
        assert_eq!(
            [sgd(DType::F32), sgd(DType::BF16), sgd(DType::F16)],
            [120, 180, 240]
        );
    }

    #[test]
    fn bf16_master_copy_follows_f32_training_bit_for_bit() {
        // The same gradients on an f32 store and a bf16 store: the bf16 optimizer's master copy
        // (bf16 part + kept low halves) must be exactly the f32 store after every step.
        let values: Vec<f32> = (0..70_000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let build = |dtype| {
            let mut b = ParamStoreBuilder::new();
            b.add(
                "w",
                &Tensor::from_f32(values.clone(), &[values.len()]).unwrap(),
                true,
            )
            .unwrap();
            b.build(dtype)
        };
        // Start both from the bf16-rounded values, which the bf16 store holds exactly.
        let full = build(DType::F32);
        let half = build(DType::BF16);
        full.set(full.id("w").unwrap(), half.by_name("w").unwrap())
            .unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let (mut a, mut b) = (AdamW::new(&full, cfg), AdamW::new(&half, cfg));
        for step in 0..5 {
            let g: Vec<f32> = (0..values.len())
                .map(|i| ((i * 7 + step * 13) as f32 * 0.11).cos() * 1e-2)
                .collect();
            set_grads(&full, &g);
            set_grads(&half, &g);
            a.step(&full, 1e-3);
            b.step(&half, 1e-3);
            let want = full.by_name("w").unwrap().to_vec_f32();
            let master = b.master(&half).unwrap();
            assert!(want
                .iter()
                .zip(&master)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
            let shown = half.by_name("w").unwrap().to_vec_f32();
            assert!(want
                .iter()
                .zip(&shown)
                .all(|(x, y)| (x - y).abs() <= x.abs() * (1.0 / 256.0)));
        }
        // A checkpoint's master copy restores the same pair.
        let saved = b.master(&half).unwrap();
        let mut c = AdamW::new(&half, cfg);
        c.load_state(&half, b.steps(), &b.state(&half).into_iter().collect())
            .unwrap();
        assert_eq!(c.master(&half).unwrap(), saved);
        // Values written into the store after a step are the master copy from then on.
        let n = values.len();
        half.set(
            half.id("w").unwrap(),
            &Tensor::from_f32(vec![0.375; n], &[n]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.master(&half).unwrap(), vec![0.375; n]);
    }

    #[test]
    fn values_set_after_building_the_optimizer_reach_the_master_copy() {
        let s = store(DType::BF16);
        let mut opt = Sgd::new(&s, 0.0, 0.0);
        s.set(
            s.id("w").unwrap(),
            &Tensor::from_f32(vec![4.0, 8.0], &[2]).unwrap(),
        )
        .unwrap();
        opt.step(&s, 0.0);
        assert_eq!(s.by_name("w").unwrap().to_vec_f32(), vec![4.0, 8.0]);
    }

    #[test]
    #[should_panic(expected = "another size")]
    fn stepping_a_different_store_is_refused() {
        let small = store(DType::F32);
        let mut b = ParamStoreBuilder::new();
        b.add("big", &Tensor::zeros(&[100], DType::F32), true)
            .unwrap();
        let big = b.build(DType::F32);
        AdamW::new(&small, AdamWConfig::default()).step(&big, 1e-3);
    }

    #[test]
    fn groups_scale_the_learning_rate_and_set_their_own_decay() {
        let mut s = store(DType::F32);
        let head = s.add_group(crate::ParamGroup {
            name: "head".into(),
            lr_scale: 10.0,
            weight_decay: Some(0.0),
        });
        s.set_group(s.id("w").unwrap(), head).unwrap();
        assert!(s.set_group(s.id("w").unwrap(), 7).is_err());
        let mut opt = Sgd::new(&s, 0.0, 0.5);
        set_grads(&s, &[1.0, 1.0, 1.0]);
        opt.step(&s, 0.01);
        // w: lr 0.1, no decay; bias: lr 0.01 (decay is off for it anyway).
        let close = |got: Vec<f32>, want: &[f32]| {
            assert!(
                got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
                "{got:?} vs {want:?}"
            )
        };
        close(s.by_name("w").unwrap().to_vec_f32(), &[0.9, -2.1]);
        close(s.by_name("bias").unwrap().to_vec_f32(), &[0.49]);
    }

    #[test]
    fn state_survives_a_round_trip_and_refuses_another_size() {
        let mut s = store(DType::BF16);
        let mut opt = AdamW::new(&s, AdamWConfig::default());
        set_grads(&s, &[0.5, -0.25, 1.0]);
        opt.step(&s, 1e-2);
        let saved: HashMap<_, _> = opt.state(&s).into_iter().collect();
        assert_eq!(saved["adam.m"].len(), 3);
        let mut again = AdamW::new(&s, AdamWConfig::default());
        again.load_state(&s, 1, &saved).unwrap();
        assert_eq!(again.state(&s), opt.state(&s));
        s.set_requires_grad(s.id("bias").unwrap(), false);
        let err = AdamW::new(&s, AdamWConfig::default())
            .load_state(&s, 1, &saved)
            .unwrap_err()
            .to_string();
        assert!(err.contains("adam.m holds 3 elements"), "{err}");
    }

    /// A store of two parameters (70,000 elements, so 8-bit blocks and parallel blocks cross
    /// parameter edges) in `dtype`, and a gradient for step `t`.
    fn big_store(dtype: DType) -> ParamStore {
        let mut b = ParamStoreBuilder::new();
        let w: Vec<f32> = (0..50_000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let u: Vec<f32> = (0..20_000)
            .map(|i| ((i as f32) * 0.11).cos() * 0.1)
            .collect();
        b.add("w", &Tensor::from_f32(w, &[50_000]).unwrap(), true)
            .unwrap();
        b.add("u", &Tensor::from_f32(u, &[20_000]).unwrap(), true)
            .unwrap();
        b.build(dtype)
    }

    fn big_grads(t: usize) -> Vec<f32> {
        (0..70_000)
            .map(|i| ((i * 7 + t * 13) as f32 * 0.013).sin() * 10f32.powi(-((i % 4) as i32)))
            .collect()
    }

    fn config(moments: MomentDType, master_weights: bool) -> AdamWConfig {
        AdamWConfig {
            moments,
            master_weights,
            ..AdamWConfig::DEFAULT
        }
    }

    fn bits(s: &ParamStore) -> Vec<u32> {
        s.trainable_values(0..s.trainable_numel())
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn bf16_gradients_round_as_they_accumulate_and_step_as_their_f32_values() {
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        let mut lean = big_store(DType::BF16);
        lean.set_grad_dtype(DType::BF16).unwrap();
        assert_eq!(lean.grads().bytes(), 2 * 70_000);
        assert!(lean.shard_gradients(0..2048, 1024).is_err());
        // Backward twice into the bf16 buffer: each sum is rounded to nearest even.
        let mut f32_weights = big_store(DType::F32);
        f32_weights.set_grad_dtype(DType::BF16).unwrap();
        let w = f32_weights.by_name("w").unwrap().clone();
        let (g1, g2) = (big_grads(1), big_grads(2));
        for g in [&g1, &g2] {
            let g = Tensor::from_f32(g[..50_000].to_vec(), &[50_000]).unwrap();
            w.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        }
        let got = w.grad().unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want: Vec<f32> = (0..50_000).map(|i| round(round(g1[i]) + g2[i])).collect();
        assert_eq!(got.to_vec_f32(), want);
        // Clipping scales and rounds; the norm is the bf16 values' own.
        let g: Vec<f32> = big_grads(3).into_iter().map(round).collect();
        set_grads(&lean, &g);
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt() as f32;
        assert_eq!(lean.clip_grad_norm(norm / 2.0), norm);
        let clipped: Vec<f32> = g.iter().map(|&x| round(x * 0.5)).collect();
        assert_eq!(lean.grads_to_vec(), clipped);
        lean.zero_grad();
        assert!(lean.grads_to_vec().iter().all(|&x| x == 0.0));
        // AdamW on bf16 gradients moves the weights exactly as on the same values in f32.
        let wide = big_store(DType::BF16);
        let (mut a, mut b) = (
            AdamW::new(&lean, config(MomentDType::Int8, false)),
            AdamW::new(&wide, config(MomentDType::Int8, false)),
        );
        for t in 0..5 {
            let g: Vec<f32> = big_grads(t).into_iter().map(round).collect();
            set_grads(&lean, &g);
            set_grads(&wide, &g);
            a.step(&lean, 1e-3);
            b.step(&wide, 1e-3);
        }
        assert_eq!(bits(&lean), bits(&wide));
    }

    #[test]
    fn sixteen_and_eight_bit_moments_train_as_f32_moments_do() {
        let train = |moments| {
            let s = big_store(DType::F32);
            let mut opt = AdamW::new(&s, config(moments, true));
            for t in 0..30 {
                set_grads(&s, &big_grads(t));
                opt.step(&s, 1e-3);
            }
            (s.trainable_values(0..70_000), opt.state_bytes())
        };
        let (reference, f32_bytes) = train(MomentDType::F32);
        let start = big_store(DType::F32).trainable_values(0..70_000);
        // Gradients within a block span 4 decades. Quantising the second moment itself instead
        // of its square root (and letting it fall to zero) puts the 8-bit path 36× the f32
        // path's movement away, not 6%.
        for (moments, bytes, tolerance) in [
            (MomentDType::BF16, 2 * 70_000 * 2, 0.01),
            (MomentDType::Int8, 2 * (70_000 + 4 * 35), 0.08),
        ] {
            let (got, state_bytes) = train(moments);
            assert_eq!(state_bytes, bytes, "{moments:?}");
            assert_eq!(f32_bytes, 8 * 70_000);
            // Each weight moved by up to 30 steps of 1e-3; the low-precision moments' paths stay
            // within a few percent of the f32 path's movement.
            let (mut err, mut moved) = (0.0f64, 0.0f64);
            for ((g, r), s0) in got.iter().zip(&reference).zip(&start) {
                err += ((g - r) as f64).powi(2);
                moved += ((r - s0) as f64).powi(2);
            }
            let rel = (err / moved).sqrt();
            assert!(rel < tolerance, "{moments:?}: {rel}");
        }
    }

    #[test]
    fn resuming_low_precision_moments_and_rounded_weights_is_bitwise() {
        for (dtype, moments, master) in [
            (DType::F32, MomentDType::BF16, true),
            (DType::F32, MomentDType::Int8, true),
            (DType::BF16, MomentDType::Int8, true),
            (DType::BF16, MomentDType::BF16, false),
        ] {
            let cfg = config(moments, master);
            let s = big_store(dtype);
            let mut opt = AdamW::new(&s, cfg);
            for t in 0..6 {
                set_grads(&s, &big_grads(t));
                opt.step(&s, 1e-3);
            }
            let want = (bits(&s), opt.state(&s));
            // Stop after 3 steps, save the parameters and the state, resume in a new optimizer.
            let s = big_store(dtype);
            let mut opt = AdamW::new(&s, cfg);
            for t in 0..3 {
                set_grads(&s, &big_grads(t));
                opt.step(&s, 1e-3);
            }
            let saved: HashMap<_, _> = opt.state(&s).into_iter().collect();
            let params = s.named();
            let r = big_store(dtype);
            for (name, t) in &params {
                r.set(r.id(name).unwrap(), t).unwrap();
            }
            let mut resumed = AdamW::new(&r, cfg);
            resumed.load_state(&r, 3, &saved).unwrap();
            assert_eq!(resumed.state(&r), opt.state(&s), "{dtype:?} {moments:?}");
            for t in 3..6 {
                set_grads(&r, &big_grads(t));
                resumed.step(&r, 1e-3);
            }
            assert!(bits(&r) == want.0, "{dtype:?} {moments:?} {master}");
            assert!(
                resumed.state(&r) == want.1,
                "{dtype:?} {moments:?} {master}"
            );
        }
    }

    #[test]
    fn eight_bit_shards_on_block_edges_update_as_the_whole_optimizer_does() {
        let cfg = config(MomentDType::Int8, true);
        let whole = big_store(DType::F32);
        let mut opt = AdamW::new(&whole, cfg);
        for t in 0..3 {
            set_grads(&whole, &big_grads(t));
            opt.step(&whole, 1e-3);
        }
        let want = bits(&whole);
        let mut got = vec![0u32; 70_000];
        // Shards start on multiples of the 8-bit block (as ZeRO's are aligned), one mid-"w".
        for shard in [0..2048 * 11, 2048 * 11..2048 * 30, 2048 * 30..70_000] {
            let s = big_store(DType::F32);
            let mut opt = AdamW::shard(&s, cfg, shard.clone()).unwrap();
            for t in 0..3 {
                set_grads(&s, &big_grads(t));
                opt.step(&s, 1e-3);
            }
            got[shard.clone()].copy_from_slice(&bits(&s)[shard]);
        }
        assert!(got == want);
    }

    #[test]
    fn master_weights_take_updates_below_sixteen_bit_resolution() {
        // 100 AdamW steps at lr 6e-4 with a steady gradient move each weight by about 0.06 (the
        // step is lr·m̂/√v̂ ≈ lr). Near 1.0, bf16's spacing is 2⁻⁷ and f16's 2⁻¹⁰: weights rounded
        // to 16 bits after every step never move, as each step is under half a spacing for bf16;
        // the master copy keeps them, and stochastic rounding moves bf16 weights on average.
        let n = 4096;
        for (dtype, master) in [
            (DType::BF16, true),
            (DType::F16, true),
            (DType::BF16, false),
        ] {
            let mut b = ParamStoreBuilder::new();
            b.add("w", &Tensor::from_f32(vec![1.0; n], &[n]).unwrap(), true)
                .unwrap();
            let s = b.build(dtype);
            let cfg = AdamWConfig {
                weight_decay: 0.0,
                ..config(MomentDType::F32, master)
            };
            let mut opt = AdamW::new(&s, cfg);
            let mut pure = 1.0f32;
            for t in 0..100 {
                set_grads(&s, &vec![-1.0; n]);
                opt.step(&s, 6e-4);
                // The update of a weight held in 16 bits alone (the first steps' bias-corrected
                // moments give exactly lr).
                let _ = t;
                pure = match dtype {
                    DType::BF16 => half::bf16::from_f32(pure + 6e-4).to_f32(),
                    _ => half::f16::from_f32(pure + 6e-4).to_f32(),
                };
            }
            if dtype == DType::BF16 {
                assert_eq!(pure, 1.0, "a pure bf16 weight stays put");
            }
            let w = s.by_name("w").unwrap().to_vec_f32();
            let mean = w.iter().sum::<f32>() / n as f32;
            assert!(
                (mean - 1.06).abs() < 0.003,
                "{dtype:?} master {master}: {mean}"
            );
            if master {
                let exact = opt.master(&s).unwrap();
                assert!(exact.iter().all(|&x| (x - 1.06).abs() < 1e-3), "{dtype:?}");
            }
        }
    }

    #[test]
    fn grad_hooks_fire_on_flat_parameters() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let s = store(DType::F32);
        let fired = Arc::new(AtomicUsize::new(0));
        let f2 = fired.clone();
        s.by_name("w")
            .unwrap()
            .register_grad_hook(move |g| {
                assert_eq!(g.to_vec_f32(), vec![3.0, 3.0]);
                f2.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        s.by_name("w")
            .unwrap()
            .scale(3.0)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }
}
