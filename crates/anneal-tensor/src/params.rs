//! Named parameters held in one flat buffer per store, with one flat f32 gradient buffer beside
//! it (llm.c's layout): an optimizer step, a gradient all-reduce or a ZeRO shard is one loop over
//! contiguous memory, and each name maps one-to-one onto a checkpoint key.

use std::collections::HashMap;
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
    /// First element in the flat buffers.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Whether decoupled weight decay applies (off for biases, norms and embeddings by convention).
    pub weight_decay: bool,
    /// Whether the parameter is trained (false: frozen).
    pub requires_grad: bool,
}

/// Collects parameter declarations, then lays them out flat.
#[derive(Default)]
pub struct ParamStoreBuilder {
    infos: Vec<ParamInfo>,
    values: Vec<f32>,
}

impl ParamStoreBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
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
        self.values.extend(init.to_vec_f32());
        self.infos.push(ParamInfo {
            name: name.to_string(),
            shape: init.shape().to_vec(),
            offset,
            len: init.numel(),
            weight_decay,
            requires_grad: true,
        });
        Ok(ParamId(self.infos.len() - 1))
    }

    /// Lays the parameters out in one buffer of `dtype`.
    pub fn build(self, dtype: DType) -> ParamStore {
        let total = self.values.len();
        let data = Arc::new(Storage::new(Buffer::from_f32(self.values, dtype)));
        let grads = Arc::new(Storage::new(Buffer::zeros(DType::F32, total)));
        let mut store = ParamStore {
            version: std::sync::atomic::AtomicU64::new(0),
            dtype,
            data,
            grads,
            index: self
                .infos
                .iter()
                .enumerate()
                .map(|(i, p)| (p.name.clone(), i))
                .collect(),
            infos: self.infos,
            tensors: Vec::new(),
            total,
        };
        store.tensors = (0..store.infos.len())
            .map(|i| store.make_tensor(i))
            .collect();
        store
    }
}

/// Parameters of a model, flat in one buffer of one dtype, with a flat f32 gradient buffer.
pub struct ParamStore {
    /// Bumped by every write that bypasses the optimizer, so optimizers re-read their master copy.
    version: std::sync::atomic::AtomicU64,
    dtype: DType,
    data: Arc<Storage>,
    grads: Arc<Storage>,
    infos: Vec<ParamInfo>,
    index: HashMap<String, usize>,
    tensors: Vec<Tensor>,
    total: usize,
}

impl ParamStore {
    fn make_tensor(&self, i: usize) -> Tensor {
        let p = &self.infos[i];
        let strides = contiguous_strides(&p.shape);
        let value = Tensor::from_parts(
            self.data.clone(),
            p.shape.clone(),
            strides.clone(),
            p.offset,
            Autograd::None,
        );
        if !p.requires_grad {
            return value;
        }
        let grad = Tensor::from_parts(
            self.grads.clone(),
            p.shape.clone(),
            strides,
            p.offset,
            Autograd::None,
        );
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

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.total
    }

    /// Storage dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The flat parameter buffer.
    pub fn data(&self) -> &Arc<Storage> {
        &self.data
    }

    /// The flat f32 gradient buffer.
    pub fn grads(&self) -> &Arc<Storage> {
        &self.grads
    }

    /// Freezes (`false`) or unfreezes a parameter. Takes effect for forwards run after the call.
    pub fn set_requires_grad(&mut self, id: ParamId, requires_grad: bool) {
        self.infos[id.0].requires_grad = requires_grad;
        self.tensors[id.0] = self.make_tensor(id.0);
    }

    /// Turns decoupled weight decay on or off for a parameter.
    pub fn set_weight_decay(&mut self, id: ParamId, on: bool) {
        self.infos[id.0].weight_decay = on;
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&self) {
        if let Buffer::F32(g) = &mut *self.grads.write() {
            g.fill(0.0);
        }
    }

    /// Overwrites a parameter's values (loading a checkpoint, tying, tests).
    pub fn set(&self, id: ParamId, values: &Tensor) -> Result<()> {
        self.write_region(&self.data, id, values, "ParamStore::set")?;
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Writes `values` over parameter `id`'s region of a flat buffer.
    fn write_region(
        &self,
        buffer: &Storage,
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
        let v = values.to_vec_f32();
        let mut buf = buffer.write();
        for (i, x) in v.into_iter().enumerate() {
            buf.set_f32(p.offset + i, x);
        }
        Ok(())
    }

    /// Every parameter under its name, in declaration order (what a checkpoint writes).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.infos
            .iter()
            .zip(&self.tensors)
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
                &self.data,
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

    /// Every gradient, flat in parameter order.
    pub fn grads_to_vec(&self) -> Vec<f32> {
        let buf = self.grads.read();
        let mut out = vec![0.0; buf.len()];
        buf.read_range_f32(0, &mut out);
        out
    }

    /// Overwrites a parameter's accumulated gradient (loading a gradient, tests).
    pub fn set_grad(&self, id: ParamId, values: &Tensor) -> Result<()> {
        self.write_region(&self.grads, id, values, "ParamStore::set_grad")
    }

    /// Global L2 norm of all gradients, √(Σ g²), accumulated in f64.
    pub fn grad_norm(&self) -> f32 {
        let buf = self.grads.read();
        let Buffer::F32(g) = &*buf else { return 0.0 };
        use rayon::prelude::*;
        g.par_chunks(1 << 16)
            .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .sum::<f64>()
            .sqrt() as f32
    }

    /// Global-norm gradient clipping (Pascanu et al. 2013): when the norm exceeds `max_norm`, scales
    /// every gradient by max_norm/norm. Returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f32) -> f32 {
        let norm = self.grad_norm();
        if norm > max_norm && norm.is_finite() {
            let s = max_norm / (norm + 1e-6);
            if let Buffer::F32(g) = &mut *self.grads.write() {
                use rayon::prelude::*;
                g.par_chunks_mut(1 << 16)
                    .for_each(|c| c.iter_mut().for_each(|x| *x *= s));
            }
        }
        norm
    }
}
