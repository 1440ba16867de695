//! The [`Tensor`] type: a shape and strides over shared storage, plus its place in the autograd graph.

use std::fmt;
use std::sync::Arc;

use crate::autograd::Autograd;
use crate::error::{Error, Result};
use crate::storage::{Buffer, Storage};
use crate::DType;

/// An n-dimensional array of f32, bf16 or f16 elements.
///
/// Cloning is cheap (a reference count). A tensor is immutable once made, except parameters and
/// gradient buffers, which the optimizer and the backward pass update in place through their
/// storage. Views (`reshape`, `transpose`, `narrow`, `permute`) share storage; `contiguous()` copies
/// only when the layout is not already row-major.
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) storage: Arc<Storage>,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) offset: usize,
    pub(crate) dtype: DType,
    pub(crate) autograd: Autograd,
}

/// Row-major strides for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl Tensor {
    pub(crate) fn from_parts(
        storage: Arc<Storage>,
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
        autograd: Autograd,
    ) -> Tensor {
        let dtype = storage.dtype();
        Tensor(Arc::new(Inner {
            storage,
            shape,
            strides,
            offset,
            dtype,
            autograd,
        }))
    }

    /// A contiguous tensor owning `buffer`, whose length the caller has checked.
    pub(crate) fn over_buffer(buffer: Buffer, shape: &[usize]) -> Tensor {
        debug_assert_eq!(buffer.len(), shape.iter().product::<usize>());
        let dtype = buffer.dtype();
        Tensor(Arc::new(Inner {
            storage: Arc::new(Storage::new(buffer)),
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
            dtype,
            autograd: Autograd::None,
        }))
    }

    /// A contiguous tensor over a fresh buffer.
    pub fn from_buffer(buffer: Buffer, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != buffer.len() {
            return Err(Error::BadShape {
                op: "from_buffer",
                shape: shape.to_vec(),
                reason: format!("needs {numel} elements, the buffer has {}", buffer.len()),
            });
        }
        Ok(Tensor::over_buffer(buffer, shape))
    }

    /// An f32 tensor holding `values` in row-major order.
    pub fn from_f32(values: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_buffer(Buffer::F32(values), shape)
    }

    /// Like [`Tensor::from_f32`], for internal callers whose sizes are correct by construction.
    pub(crate) fn from_f32_unchecked(values: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::over_buffer(Buffer::F32(values), shape)
    }

    /// Stores f32 `values` as `dtype`.
    pub(crate) fn from_f32_as(values: Vec<f32>, shape: &[usize], dtype: DType) -> Tensor {
        Tensor::over_buffer(Buffer::from_f32(values, dtype), shape)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::over_buffer(Buffer::zeros(dtype, shape.iter().product()), shape)
    }

    /// A tensor with every element `value`.
    pub fn full(shape: &[usize], value: f32, dtype: DType) -> Tensor {
        let numel = shape.iter().product();
        Tensor::from_f32_as(vec![value; numel], shape, dtype)
    }

    /// A tensor of ones.
    pub fn ones(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::full(shape, 1.0, dtype)
    }

    /// A rank-0 f32 tensor.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::from_f32_unchecked(vec![value], &[])
    }

    /// The extent of each axis.
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    /// Element strides of each axis.
    pub fn strides(&self) -> &[usize] {
        &self.0.strides
    }

    /// Offset of the first element in the storage, in elements.
    pub fn offset(&self) -> usize {
        self.0.offset
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.shape.iter().product()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// Extent of axis `axis`; negative axes count from the end.
    pub fn dim(&self, axis: isize) -> Result<usize> {
        Ok(self.0.shape[self.axis(axis, "dim")?])
    }

    /// Resolves a possibly negative axis.
    pub fn axis(&self, axis: isize, op: &'static str) -> Result<usize> {
        let rank = self.rank() as isize;
        let a = if axis < 0 { axis + rank } else { axis };
        if a < 0 || a >= rank {
            return Err(Error::BadAxis {
                op,
                axis,
                rank: self.rank(),
            });
        }
        Ok(a as usize)
    }

    /// True when elements are laid out row-major with no gaps.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&n, &s) in self.0.shape.iter().zip(&self.0.strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// Where the tensor's storage lives; ops pick their kernels by it ([`crate::backend`]).
    pub fn device(&self) -> crate::Device {
        self.0.storage.device()
    }

    /// The shared storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.0.storage
    }

    /// True when both tensors view the same storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// A view with another layout over the same storage and no autograd history.
    pub(crate) fn view_raw(&self, shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Tensor {
        Tensor(Arc::new(Inner {
            storage: self.0.storage.clone(),
            shape,
            strides,
            offset,
            dtype: self.0.dtype,
            autograd: Autograd::None,
        }))
    }

    /// The same data with no autograd history.
    pub(crate) fn data(&self) -> Tensor {
        self.with_autograd(Autograd::None)
    }

    /// The same view of the same storage, placed in the graph as `autograd`.
    pub(crate) fn with_autograd(&self, autograd: Autograd) -> Tensor {
        Tensor(Arc::new(Inner {
            storage: self.0.storage.clone(),
            shape: self.0.shape.clone(),
            strides: self.0.strides.clone(),
            offset: self.0.offset,
            dtype: self.0.dtype,
            autograd,
        }))
    }

    /// All elements, row-major, as f32.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        // bf16 widened into a cached buffer, or a fresh one without a zero-fill.
        let widened = self.with_bf16(|v| match crate::pool::cached(v.len()) {
            Some(mut out) => {
                crate::kernels::bf16_to_f32(v, &mut out);
                out
            }
            None => crate::kernels::map_to(v, |x| x),
        });
        if let Some(v) = widened {
            return v;
        }
        let mut out = crate::pool::uninit(self.numel());
        self.read_into_f32(&mut out);
        out
    }

    /// The single element of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::BadShape {
                op: "item",
                shape: self.shape().to_vec(),
                reason: "item() needs exactly one element".into(),
            });
        }
        Ok(self.to_vec_f32()[0])
    }

    /// Copies all elements, row-major, into `out` as f32.
    pub(crate) fn read_into_f32(&self, out: &mut [f32]) {
        let buf = self.0.storage.read();
        if self.is_contiguous() {
            buf.read_range_f32(self.0.offset, out);
            return;
        }
        copy_strided(&buf, &self.0.shape, &self.0.strides, self.0.offset, out);
    }

    /// Runs `f` on the elements of a contiguous bf16 tensor, borrowed; None for any other tensor.
    pub(crate) fn with_bf16<R>(&self, f: impl FnOnce(&[half::bf16]) -> R) -> Option<R> {
        if self.0.dtype != DType::BF16 || !self.is_contiguous() {
            return None;
        }
        let buf = self.0.storage.read();
        match &*buf {
            Buffer::BF16(v) => Some(f(&v[self.0.offset..self.0.offset + self.numel()])),
            _ => None,
        }
    }

    /// Runs `f` on the elements as a row-major f32 slice: borrowed when the tensor is contiguous
    /// f32, otherwise copied into a temporary.
    pub(crate) fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        if self.0.dtype == DType::F32 && self.is_contiguous() {
            let buf = self.0.storage.read();
            if let Buffer::F32(v) = &*buf {
                return f(&v[self.0.offset..self.0.offset + self.numel()]);
            }
        }
        let tmp = self.to_vec_f32();
        let r = f(&tmp);
        // A gathered f32 copy goes back to the cache; widened half-precision data does not (see
        // `pool`'s note on conversion scratch).
        if self.0.dtype == DType::F32 {
            crate::pool::recycle(tmp);
        }
        r
    }

    /// A row-major copy unless the tensor already is row-major. Carries gradients.
    pub fn contiguous(&self) -> Tensor {
        if self.is_contiguous() {
            return self.clone();
        }
        crate::ops::shape::copy_contiguous(self)
    }

    /// A row-major copy without autograd history, in the same dtype.
    pub(crate) fn contiguous_data(&self) -> Tensor {
        if self.is_contiguous() {
            return self.data();
        }
        Tensor::from_f32_as(self.to_vec_f32(), self.shape(), self.dtype())
    }
}

/// Gathers a strided view into a row-major f32 slice.
pub(crate) fn copy_strided(
    buf: &Buffer,
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    out: &mut [f32],
) {
    let rank = shape.len();
    if rank == 0 {
        out[0] = buf.get_f32(offset);
        return;
    }
    let inner = shape[rank - 1];
    let inner_stride = strides[rank - 1];
    let outer: usize = shape[..rank - 1].iter().product();
    let mut index = vec![0usize; rank - 1];
    for o in 0..outer {
        let mut base = offset;
        for (i, &ix) in index.iter().enumerate() {
            base += ix * strides[i];
        }
        let dst = &mut out[o * inner..(o + 1) * inner];
        if inner_stride == 1 {
            buf.read_range_f32(base, dst);
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = buf.get_f32(base + j * inner_stride);
            }
        }
        for ax in (0..rank - 1).rev() {
            index[ax] += 1;
            if index[ax] < shape[ax] {
                break;
            }
            index[ax] = 0;
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = self.to_vec_f32();
        let shown: Vec<f32> = values.iter().take(8).copied().collect();
        write!(
            f,
            "Tensor(shape={:?}, dtype={}, requires_grad={}, values={:?}{})",
            self.shape(),
            self.dtype(),
            self.requires_grad(),
            shown,
            if values.len() > 8 { "…" } else { "" }
        )
    }
}
