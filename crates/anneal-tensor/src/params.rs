//! Named parameters held in one flat buffer per store, with one flat gradient buffer beside it
//! (llm.c's layout; f32, or bf16 for the leanest training mode): an optimizer step, a gradient all-reduce or a ZeRO shard is one loop over
//! contiguous memory, and each name maps one-to-one onto a checkpoint key.
//!
//! Only trainable parameters have a place in the gradient buffer (and so in an optimizer's
//! state, which is laid out like it): freezing all but one block of a model cuts gradient and
//! optimizer bytes in proportion. Trainable parameters belong to a [`ParamGroup`] that scales the
//! learning rate and may set its own weight decay.
//!
//! Under ZeRO-2 a store's gradients are sharded ([`ParamStore::shard_gradients`]): the store
//! holds one rank's shard of the gradient buffer, and backward accumulates into per-bucket
//! storages that take memory only from the first gradient written into them until the strategy
//! reduces them into the shards and releases them.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::error::{invalid, Error, Result};
use crate::storage::{Buffer, Storage};
use crate::tensor::contiguous_strides;
use crate::{autograd::Autograd, DType, Tensor};

/// Index of a parameter in its [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// One parameter's place in the flat buffers.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Checkpoint key, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// First element in the flat parameter buffer (unused for a parameter held in its own
    /// dtype, see [`ParamStore::freeze_as`]).
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Whether decoupled weight decay applies (off for biases, norms and embeddings by convention).
    pub weight_decay: bool,
    /// Whether the parameter is trained (false: frozen).
    pub requires_grad: bool,
    /// First element in the gradient buffer and in optimizer state (trainable parameters only).
    pub grad_offset: Option<usize>,
    /// Index of its [`ParamGroup`] in [`ParamStore::groups`].
    pub group: usize,
}

/// The factor global-norm clipping scales every gradient by when their norm is `norm`:
/// `max_norm / (norm + 1e-6)` when the norm exceeds `max_norm` (and is finite), else none.
pub fn clip_factor(norm: f32, max_norm: f32) -> Option<f32> {
    (norm > max_norm && norm.is_finite()).then(|| max_norm / (norm + 1e-6))
}

/// A bucket of gradients: consecutive trainable parameters whose gradients are reduced together.
#[derive(Clone, Debug)]
pub struct GradBucket {
    /// Its range of the gradient buffer's (state) order.
    pub range: Range<usize>,
    /// Its parameters.
    pub params: Vec<ParamId>,
    /// Where backward accumulates its gradients when the store's gradients are sharded (lazy:
    /// allocated by the first gradient written, given back when reduced); `None` otherwise.
    pub storage: Option<Arc<Storage>>,
}

/// Where a store keeps its gradients.
enum GradHome {
    /// One flat buffer over every trainable element.
    Flat,
    /// One rank's shard of the gradient buffer; backward accumulates into the buckets.
    Sharded {
        shard: Range<usize>,
        buckets: Vec<GradBucket>,
    },
}

/// Elements per chunk of the gradient norm's f64 partial sums ([`ParamStore::grad_norm`]).
pub const NORM_CHUNK: usize = 1 << 10;

/// Settings shared by a set of trainable parameters (PyTorch's parameter groups): fine-tuning
/// gives a new head a larger learning rate than the pretrained body, for example.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    /// A name for logs.
    pub name: String,
    /// Multiplies the learning rate the optimizer step is given.
    pub lr_scale: f32,
    /// Decoupled weight decay for this group's parameters with decay on; `None` takes the
    /// optimizer's.
    pub weight_decay: Option<f32>,
}

impl Default for ParamGroup {
    fn default() -> Self {
        ParamGroup {
            name: "default".into(),
            lr_scale: 1.0,
            weight_decay: None,
        }
    }
}

/// Collects parameter declarations, then lays them out flat.
pub struct ParamStoreBuilder {
    infos: Vec<ParamInfo>,
    /// The values declared so far, in the dtype the store is expected in.
    values: Buffer,
}

impl Default for ParamStoreBuilder {
    fn default() -> Self {
        ParamStoreBuilder {
            infos: Vec::new(),
            values: Buffer::F32(Vec::new()),
        }
    }
}

impl ParamStoreBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder for a store of `dtype` holding about `elements` values: each value is
    /// rounded as it is declared and the buffer is allocated once, so building a large 16-bit
    /// model never holds its f32 values (measured on a 191M-parameter bf16 GPT: construction
    /// peaked at 1,863 MB RSS and left 750 MB with the allocator, from an f32 buffer grown by
    /// doubling and converted at the end).
    pub fn with_capacity(dtype: DType, elements: usize) -> Self {
        let values = match dtype {
            DType::F32 => Buffer::F32(Vec::with_capacity(elements)),
            DType::BF16 => Buffer::BF16(Vec::with_capacity(elements)),
            DType::F16 => Buffer::F16(Vec::with_capacity(elements)),
        };
        ParamStoreBuilder {
            infos: Vec::new(),
            values,
        }
    }

    /// True before any parameter is declared.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// Declares a parameter with its initial value.
    pub fn add(&mut self, name: &str, init: &Tensor, weight_decay: bool) -> Result<ParamId> {
        if self.infos.iter().any(|p| p.name == name) {
            return Err(invalid(
                "ParamStoreBuilder::add",
                format!("parameter {name:?} declared twice"),
            ));
        }
        let offset = self.values.len();
        init.with_f32(|v| match &mut self.values {
            Buffer::F32(out) => out.extend_from_slice(v),
            Buffer::BF16(out) => out.extend(v.iter().map(|&x| half::bf16::from_f32(x))),
            Buffer::F16(out) => out.extend(v.iter().map(|&x| half::f16::from_f32(x))),
        });
        self.infos.push(ParamInfo {
            name: name.to_string(),
            shape: init.shape().to_vec(),
            offset,
            len: init.numel(),
            weight_decay,
            requires_grad: true,
            grad_offset: None,
            group: 0,
        });
        Ok(ParamId(self.infos.len() - 1))
    }

    /// Lays the parameters out in one buffer of `dtype`.
    pub fn build(self, dtype: DType) -> ParamStore {
        let total = self.values.len();
        let count = self.infos.len();
        let values = if self.values.dtype() == dtype {
            self.values
        } else {
            let mut wide = vec![0.0; total];
            self.values.read_range_f32(0, &mut wide);
            Buffer::from_f32(wide, dtype)
        };
        let data = Arc::new(Storage::new(values));
        let mut store = ParamStore {
            version: std::sync::atomic::AtomicU64::new(0),
            dtype,
            data,
            grads: Arc::new(Storage::gradient(DType::F32, 0)),
            grad_dtype: DType::F32,
            home: GradHome::Flat,
            index: self
                .infos
                .iter()
                .enumerate()
                .map(|(i, p)| (p.name.clone(), i))
                .collect(),
            infos: self.infos,
            groups: vec![ParamGroup::default()],
            own: vec![None; count],
            tensors: Arc::new(Vec::new()),
            total,
            trainable: 0,
        };
        store.lay_out_grads();
        store
    }
}

/// What of a parameter a write replaces.
#[derive(Clone, Copy)]
enum Region {
    /// Its value.
    Value,
    /// Its accumulated gradient.
    Grad,
}

/// Parameters of a model, flat in one buffer of one dtype, with a flat gradient buffer for
/// the trainable ones.
pub struct ParamStore {
    /// Bumped by every write that bypasses the optimizer, so optimizers re-read their master copy.
    version: std::sync::atomic::AtomicU64,
    dtype: DType,
    data: Arc<Storage>,
    /// What the flat gradient buffer holds: f32, or bf16 ([`ParamStore::set_grad_dtype`]).
    grad_dtype: DType,
    /// The gradients this store holds: all of them, or its shard ([`GradHome`]).
    grads: Arc<Storage>,
    home: GradHome,
    infos: Vec<ParamInfo>,
    groups: Vec<ParamGroup>,
    /// Storage of each parameter held in its own dtype.
    own: Vec<Option<Arc<Storage>>>,
    index: HashMap<String, usize>,
    tensors: Arc<Vec<Tensor>>,
    total: usize,
    trainable: usize,
}

impl ParamStore {
    /// Gives each trainable parameter its place in a new, zeroed gradient buffer (declaration
    /// order) and rebuilds the parameter tensors over it.
    fn lay_out_grads(&mut self) {
        let mut next = 0;
        for (p, own) in self.infos.iter_mut().zip(&self.own) {
            // A parameter held in its own dtype stays frozen: the optimizer steps the flat buffer.
            p.requires_grad &= own.is_none();
            p.grad_offset = p.requires_grad.then(|| {
                next += p.len;
                next - p.len
            });
        }
        self.trainable = next;
        self.grads = Arc::new(Storage::gradient(self.grad_dtype, next));
        self.home = GradHome::Flat;
        self.tensors = Arc::new((0..self.infos.len()).map(|i| self.make_tensor(i)).collect());
    }

    /// The trainable parameters grouped into buckets of about `bucket_floats` elements (at
    /// least one parameter each), taken in reverse declaration order, roughly the order backward
    /// finishes their gradients (PyTorch DDP's bucketing). Each bucket is a consecutive range of
    /// the gradient buffer; the buckets are listed in the order they fill.
    pub fn buckets(&self, bucket_floats: usize) -> Vec<GradBucket> {
        let mut buckets: Vec<GradBucket> = Vec::new();
        for (id, p) in self.infos.iter().enumerate().rev() {
            let Some(g) = p.grad_offset else { continue };
            let range = g..g + p.len;
            match buckets.last_mut() {
                Some(b) if b.range.len() < bucket_floats && b.range.start == range.end => {
                    b.range.start = range.start;
                    b.params.push(ParamId(id));
                }
                _ => buckets.push(GradBucket {
                    range,
                    params: vec![ParamId(id)],
                    storage: None,
                }),
            }
        }
        buckets
    }

    /// Shards the gradients (ZeRO-2): the store keeps only `shard` of the gradient buffer
    /// (what [`ParamStore::grads`] and the gradient methods then work on), and backward
    /// accumulates each bucket of [`ParamStore::buckets`]`(bucket_floats)` into a storage of its
    /// own that holds memory only once written. A strategy reduces each bucket into the ranks'
    /// shards as backward finishes it ([`ParamStore::gradient_buckets`]). Freezing or unfreezing
    /// lays the gradients out flat again. Takes effect for forwards run after the call.
    pub fn shard_gradients(&mut self, shard: Range<usize>, bucket_floats: usize) -> Result<()> {
        if self.grad_dtype != DType::F32 {
            return Err(invalid(
                "ParamStore::shard_gradients",
                format!(
                    "sharded gradients are f32; this store keeps {} gradients",
                    self.grad_dtype
                ),
            ));
        }
        if shard.start > shard.end || shard.end > self.trainable {
            return Err(invalid(
                "ParamStore::shard_gradients",
                format!(
                    "{shard:?} is not within the {} trainable elements",
                    self.trainable
                ),
            ));
        }
        let mut buckets = self.buckets(bucket_floats.max(1));
        for b in &mut buckets {
            b.storage = Some(Arc::new(Storage::lazy(b.range.len())));
        }
        self.grads = Arc::new(Storage::gradient(DType::F32, shard.len()));
        self.home = GradHome::Sharded { shard, buckets };
        self.tensors = Arc::new((0..self.infos.len()).map(|i| self.make_tensor(i)).collect());
        Ok(())
    }

    /// Keeps the gradients in `dtype`: f32 (the default), or bf16, half the bytes, as the leanest
    /// training mode does. Backward computes each gradient in f32 and rounds it to nearest even
    /// as it accumulates into the buffer; clipping and the optimizer widen it back. The dtype it
    /// already has changes nothing; another lays the gradients out anew (zeroed, flat), and
    /// fails for f16 and for a store whose gradients are sharded.
    pub fn set_grad_dtype(&mut self, dtype: DType) -> Result<()> {
        if dtype == self.grad_dtype {
            return Ok(());
        }
        if dtype == DType::F16 {
            return Err(invalid(
                "ParamStore::set_grad_dtype",
                "gradients are kept in f32 or bf16 (f16's range does not hold them unscaled)"
                    .to_string(),
            ));
        }
        if !matches!(self.home, GradHome::Flat) {
            return Err(invalid(
                "ParamStore::set_grad_dtype",
                "the gradients are sharded (ZeRO-2), which keeps them in f32".to_string(),
            ));
        }
        self.grad_dtype = dtype;
        self.lay_out_grads();
        Ok(())
    }

    /// The dtype of the gradient buffer ([`ParamStore::set_grad_dtype`]).
    pub fn grad_dtype(&self) -> DType {
        self.grad_dtype
    }

    /// The buckets backward accumulates into when the gradients are sharded (empty otherwise).
    pub fn gradient_buckets(&self) -> &[GradBucket] {
        match &self.home {
            GradHome::Flat => &[],
            GradHome::Sharded { buckets, .. } => buckets,
        }
    }

    /// The range of the gradient buffer's order this store holds: every trainable element, or
    /// its shard when the gradients are sharded.
    pub fn held_grads(&self) -> Range<usize> {
        match &self.home {
            GradHome::Flat => 0..self.trainable,
            GradHome::Sharded { shard, .. } => shard.clone(),
        }
    }

    /// `range` (of the gradient buffer's order) as a range of the held buffer; panics, naming
    /// both, when it is not held.
    fn held(&self, range: Range<usize>) -> Range<usize> {
        let held = self.held_grads();
        assert!(
            range.is_empty() || (held.start <= range.start && range.end <= held.end),
            "gradients {range:?} are not held by this store (it holds {held:?})"
        );
        range.start.saturating_sub(held.start)..range.end.saturating_sub(held.start)
    }

    fn make_tensor(&self, i: usize) -> Tensor {
        let p = &self.infos[i];
        let strides = contiguous_strides(&p.shape);
        if let Some(own) = &self.own[i] {
            return Tensor::from_parts(own.clone(), p.shape.clone(), strides, 0, Autograd::None);
        }
        let value = Tensor::from_parts(
            self.data.clone(),
            p.shape.clone(),
            strides.clone(),
            p.offset,
            Autograd::None,
        );
        let Some(grad_offset) = p.grad_offset else {
            return value;
        };
        let (storage, offset) = match &self.home {
            GradHome::Flat => (self.grads.clone(), grad_offset),
            GradHome::Sharded { buckets, .. } => {
                let b = buckets
                    .iter()
                    .find(|b| b.range.contains(&grad_offset))
                    .expect("every trainable parameter is in a bucket");
                let storage = b.storage.clone().expect("sharded buckets have storage");
                (storage, grad_offset - b.range.start)
            }
        };
        let grad = Tensor::from_parts(storage, p.shape.clone(), strides, offset, Autograd::None);
        value.with_grad_buffer(grad)
    }

    /// The parameter as a leaf tensor (gradients accumulate into the flat gradient buffer), or as a
    /// constant when frozen.
    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.0]
    }

    /// Looks a parameter up by name.
    pub fn id(&self, name: &str) -> Result<ParamId> {
        self.index
            .get(name)
            .map(|&i| ParamId(i))
            .ok_or_else(|| invalid("ParamStore", format!("no parameter named {name:?}")))
    }

    /// The parameter named `name`.
    pub fn by_name(&self, name: &str) -> Result<&Tensor> {
        Ok(self.get(self.id(name)?))
    }

    /// Every parameter's layout, in declaration order.
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }

    /// Every parameter tensor, indexed by [`ParamId`]: a cheap handle that layers look their
    /// parameters up in at forward time, and that outlives a borrow of the store (a recomputed
    /// segment holds one).
    pub fn tensors(&self) -> Arc<Vec<Tensor>> {
        self.tensors.clone()
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.total
    }

    /// Elements of the trainable parameters: the length of the gradient buffer and of each
    /// optimizer state vector.
    pub fn trainable_numel(&self) -> usize {
        self.trainable
    }

    /// Each trainable parameter's place in the flat parameter buffer and in the gradient buffer
    /// (and so in optimizer state), in state order: `(info, data range, state range)`.
    pub fn trainable_ranges(
        &self,
    ) -> impl Iterator<Item = (&ParamInfo, Range<usize>, Range<usize>)> {
        self.infos.iter().filter_map(|p| {
            let s = p.grad_offset?;
            Some((p, p.offset..p.offset + p.len, s..s + p.len))
        })
    }

    /// The values of the trainable parameters at `range` of state order (the order of the
    /// gradient buffer), widened to f32: a rank's shard under ZeRO.
    pub fn trainable_values(&self, range: Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0f32; range.len()];
        let data = self.data.read();
        for (_, d, s) in self.trainable_ranges() {
            let (lo, hi) = (s.start.max(range.start), s.end.min(range.end));
            if lo < hi {
                let from = d.start + (lo - s.start);
                data.read_range_f32(from, &mut out[lo - range.start..hi - range.start]);
            }
        }
        out
    }

    /// Writes `values` over the trainable parameters from `start` of state order (a ZeRO step
    /// gathers every rank's updated shard this way).
    pub fn set_trainable_values(&self, start: usize, values: &[f32]) {
        let range = start..start + values.len();
        let mut data = self.data.write();
        for (_, d, s) in self.trainable_ranges() {
            let (lo, hi) = (s.start.max(range.start), s.end.min(range.end));
            if lo < hi {
                data.write_range_f32(d.start + (lo - s.start), &values[lo - start..hi - start]);
            }
        }
        drop(data);
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The parameter groups; group 0 is the default every parameter starts in.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Adds a parameter group and returns its index.
    pub fn add_group(&mut self, group: ParamGroup) -> usize {
        self.groups.push(group);
        self.groups.len() - 1
    }

    /// Moves a parameter into group `group` (an index from [`ParamStore::add_group`]).
    pub fn set_group(&mut self, id: ParamId, group: usize) -> Result<()> {
        if group >= self.groups.len() {
            return Err(invalid(
                "ParamStore::set_group",
                format!(
                    "group {group} does not exist; the store has {} groups",
                    self.groups.len()
                ),
            ));
        }
        self.infos[id.0].group = group;
        Ok(())
    }

    /// Storage dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The flat parameter buffer.
    pub fn data(&self) -> &Arc<Storage> {
        &self.data
    }

    /// The gradient buffer (f32, or bf16 after [`ParamStore::set_grad_dtype`]): over every trainable element, or over the shard
    /// [`ParamStore::held_grads`] when the gradients are sharded.
    pub fn grads(&self) -> &Arc<Storage> {
        &self.grads
    }

    /// Freezes (`false`) or unfreezes a parameter. The gradient buffer is laid out anew (and
    /// zeroed) over the trainable parameters, so create optimizers after freezing. Takes effect
    /// for forwards run after the call. A parameter held in its own dtype
    /// ([`ParamStore::freeze_as`]) stays frozen.
    pub fn set_requires_grad(&mut self, id: ParamId, requires_grad: bool) {
        self.infos[id.0].requires_grad = requires_grad;
        self.lay_out_grads();
    }

    /// Freezes parameter `id` and holds it in its own buffer of `dtype` (a bf16 copy of a
    /// pretrained base beside f32 adapters, say), taking it out of the flat buffer. Layers widen
    /// it to the model's dtype when they look it up. Lays the parameter and gradient buffers out
    /// anew, so call it before creating optimizers.
    pub fn freeze_as(&mut self, id: ParamId, dtype: DType) {
        let values = self.tensors[id.0].to_vec_f32();
        self.infos[id.0].requires_grad = false;
        self.own[id.0] = Some(Arc::new(Storage::new(Buffer::from_f32(values, dtype))));
        // The flat buffer keeps only the parameters held in it.
        let mut flat = Vec::new();
        for (i, p) in self.infos.iter_mut().enumerate() {
            if self.own[i].is_none() {
                let mut v = vec![0.0f32; p.len];
                self.data.read().read_range_f32(p.offset, &mut v);
                p.offset = flat.len();
                flat.extend(v);
            } else {
                p.offset = 0;
            }
        }
        self.data = Arc::new(Storage::new(Buffer::from_f32(flat, self.dtype)));
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lay_out_grads();
    }

    /// Bytes of parameter values: the flat buffer and every parameter held in its own dtype.
    pub fn bytes(&self) -> usize {
        self.data.bytes() + self.own.iter().flatten().map(|s| s.bytes()).sum::<usize>()
    }

    /// Trains exactly the parameters whose name `train` accepts and freezes the rest (those held
    /// in their own dtype stay frozen), laying the gradient buffer out once. Returns the number
    /// of trainable parameters.
    pub fn train_only(&mut self, train: impl Fn(&str) -> bool) -> usize {
        for p in &mut self.infos {
            p.requires_grad = train(&p.name);
        }
        self.lay_out_grads();
        self.infos.iter().filter(|p| p.requires_grad).count()
    }

    /// Turns decoupled weight decay on or off for a parameter.
    pub fn set_weight_decay(&mut self, id: ParamId, on: bool) {
        self.infos[id.0].weight_decay = on;
    }

    /// Zeroes every gradient (sharded: the shard, and the buckets give their memory back).
    pub fn zero_grad(&self) {
        match &mut *self.grads.write() {
            Buffer::F32(g) => g.fill(0.0),
            Buffer::BF16(g) => g.fill(half::bf16::ZERO),
            Buffer::F16(_) => unreachable!("gradients are f32 or bf16"),
        }
        for b in self.gradient_buckets() {
            if let Some(s) = &b.storage {
                s.release();
            }
        }
    }

    /// Overwrites a parameter's values (loading a checkpoint, tying, tests).
    pub fn set(&self, id: ParamId, values: &Tensor) -> Result<()> {
        self.write_region(Region::Value, id, values, "ParamStore::set")?;
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Copies into this store, by name, every parameter of `from` whose name `take` accepts (a
    /// pretrained encoder into a classifier, a momentum encoder's start); returns how many.
    /// Fails naming a taken parameter this store lacks or holds in another shape.
    pub fn copy_from(&self, from: &ParamStore, take: impl Fn(&str) -> bool) -> Result<usize> {
        let mut copied = 0;
        for info in from.infos.iter().filter(|i| take(&i.name)) {
            self.set(self.id(&info.name)?, from.by_name(&info.name)?)?;
            copied += 1;
        }
        Ok(copied)
    }

    /// Writes `values` over parameter `id`'s value (wherever it is held) or its gradient.
    fn write_region(
        &self,
        region: Region,
        id: ParamId,
        values: &Tensor,
        op: &'static str,
    ) -> Result<()> {
        let p = &self.infos[id.0];
        if values.shape() != p.shape.as_slice() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: p.shape.clone(),
                rhs: values.shape().to_vec(),
            });
        }
        let (buffer, offset) = match (region, &self.own[id.0]) {
            (Region::Grad, _) => {
                let offset = p.grad_offset.ok_or_else(|| {
                    invalid(op, format!("{} is frozen and has no gradient", p.name))
                })?;
                let held = self.held_grads();
                if offset < held.start || offset + p.len > held.end {
                    return Err(invalid(
                        op,
                        format!(
                            "the gradient of {} is not in this store's shard {held:?}",
                            p.name
                        ),
                    ));
                }
                (&*self.grads, offset - held.start)
            }
            (Region::Value, Some(own)) => (&**own, 0),
            (Region::Value, None) => (&*self.data, p.offset),
        };
        let v = values.to_vec_f32();
        let mut buf = buffer.write();
        for (i, x) in v.into_iter().enumerate() {
            buf.set_f32(offset + i, x);
        }
        Ok(())
    }

    /// Every parameter under its name, in declaration order (what a checkpoint writes).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.infos
            .iter()
            .zip(self.tensors.iter())
            .map(|(p, t)| (p.name.clone(), t.clone()))
            .collect()
    }

    /// Sets every parameter from `tensors` by name. Fails, naming the parameter, when one is
    /// missing or has another shape, and names any key of `tensors` that matches no parameter;
    /// nothing is written unless everything matches.
    pub fn load_named(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for p in &self.infos {
            match tensors.get(&p.name) {
                None => {
                    return Err(invalid(
                        "ParamStore::load_named",
                        format!("missing parameter {}", p.name),
                    ))
                }
                Some(t) if t.shape() != p.shape.as_slice() => {
                    return Err(invalid(
                        "ParamStore::load_named",
                        format!(
                            "{} has shape {:?}, the model expects {:?}",
                            p.name,
                            t.shape(),
                            p.shape
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = tensors.keys().find(|k| !self.index.contains_key(*k)) {
            return Err(invalid(
                "ParamStore::load_named",
                format!("{extra} is not a parameter of this model"),
            ));
        }
        for (i, p) in self.infos.iter().enumerate() {
            self.write_region(
                Region::Value,
                ParamId(i),
                &tensors[&p.name],
                "ParamStore::load_named",
            )?;
        }
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Counts writes made with [`ParamStore::set`].
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every trainable parameter's gradient, flat in parameter order (the held shard when
    /// sharded).
    pub fn grads_to_vec(&self) -> Vec<f32> {
        self.with_grads(<[f32]>::to_vec)
    }

    /// Runs `f` on the flat gradients of the trainable parameters, in parameter order, for
    /// reading (a data-parallel strategy copies its buckets out of them); the held shard when
    /// sharded.
    /// bf16 gradients are widened into a copy first.
    pub fn with_grads<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let buf = self.grads.read();
        match &*buf {
            Buffer::F32(g) => f(g),
            other => {
                let mut wide = vec![0.0; other.len()];
                other.read_range_f32(0, &mut wide);
                f(&wide)
            }
        }
    }

    /// Runs `f` on the flat gradients of the trainable parameters, in parameter order, for
    /// writing (a data-parallel strategy averages them across ranks in place); the held shard
    /// when sharded.
    /// bf16 gradients are widened into a copy and rounded back (to nearest even) after `f`.
    pub fn with_grads_mut<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let mut buf = self.grads.write();
        match &mut *buf {
            Buffer::F32(g) => f(g),
            other => {
                let mut wide = vec![0.0; other.len()];
                other.read_range_f32(0, &mut wide);
                let r = f(&mut wide);
                other.write_range_f32(0, &wide);
                r
            }
        }
    }

    /// Overwrites a trainable parameter's accumulated gradient (loading a gradient, tests).
    pub fn set_grad(&self, id: ParamId, values: &Tensor) -> Result<()> {
        self.write_region(Region::Grad, id, values, "ParamStore::set_grad")
    }

    /// Global L2 norm of all gradients, √(Σ g²), accumulated in f64: chunks of [`NORM_CHUNK`]
    /// elements in parallel ([`ParamStore::grad_norm_partials`]), then their sums in chunk
    /// order, so the norm is the same bits on any thread count, and the same when the chunks are
    /// summed on the ranks that hold them (ZeRO-2). When the gradients are sharded, the norm of
    /// the shard.
    pub fn grad_norm(&self) -> f32 {
        self.grad_norm_partials(self.held_grads())
            .iter()
            .sum::<f64>()
            .sqrt() as f32
    }

    /// Σ g² of each [`NORM_CHUNK`]-element chunk of the gradients in `range` (whose start is a
    /// multiple of the chunk; held by the store), in f64, in chunk order.
    pub fn grad_norm_partials(&self, range: Range<usize>) -> Vec<f64> {
        debug_assert!(range.is_empty() || range.start.is_multiple_of(NORM_CHUNK));
        let range = self.held(range);
        let buf = self.grads.read();
        use rayon::prelude::*;
        let square = |x: f32| (x as f64) * (x as f64);
        match &*buf {
            Buffer::F32(g) => g[range]
                .par_chunks(NORM_CHUNK)
                .map(|c| c.iter().map(|&x| square(x)).sum::<f64>())
                .collect(),
            Buffer::BF16(g) => g[range]
                .par_chunks(NORM_CHUNK)
                .map(|c| c.iter().map(|&x| square(x.to_f32())).sum::<f64>())
                .collect(),
            Buffer::F16(_) => unreachable!("gradients are f32 or bf16"),
        }
    }

    /// Multiplies the gradients in `range` (held by the store) by `s` (clipping all of them,
    /// or a shard).
    pub fn scale_grads(&self, range: Range<usize>, s: f32) {
        use rayon::prelude::*;
        let range = self.held(range);
        let mut buf = self.grads.write();
        match &mut *buf {
            Buffer::F32(g) => g[range]
                .par_chunks_mut(1 << 16)
                .for_each(|c| c.iter_mut().for_each(|x| *x *= s)),
            Buffer::BF16(g) => g[range].par_chunks_mut(1 << 16).for_each(|c| {
                c.iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(x.to_f32() * s))
            }),
            Buffer::F16(_) => unreachable!("gradients are f32 or bf16"),
        }
    }

    /// Global-norm gradient clipping (Pascanu et al. 2013): when the norm exceeds `max_norm`, scales
    /// every gradient by max_norm/norm. Returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f32) -> f32 {
        let norm = self.grad_norm();
        if let Some(s) = clip_factor(norm, max_norm) {
            self.scale_grads(self.held_grads(), s);
        }
        norm
    }
}
