//! Layout ops: views that share storage (`reshape`, `permute`, `transpose`, `narrow`) and copies
//! that move elements (`contiguous`, `concat`, `index_select`, `gather`, `scatter_add`,
//! `embedding`). Each has its backward beside it.

use crate::autograd::Backward;
use crate::error::{invalid, Error, Result};
use crate::tensor::contiguous_strides;
use crate::{DType, Tensor};

struct ReshapeBackward {
    shape: Vec<usize>,
}
impl Backward for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.contiguous_data().reshape(&self.shape)?)])
    }
}

struct PermuteBackward {
    inverse: Vec<usize>,
}
impl Backward for PermuteBackward {
    fn name(&self) -> &'static str {
        "permute"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.permute(&self.inverse)?)])
    }
}

struct NarrowBackward {
    shape: Vec<usize>,
    axis: usize,
    start: usize,
}
impl Backward for NarrowBackward {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let full = Tensor::zeros(&self.shape, DType::F32);
        let len = grad.shape()[self.axis];
        let region = full.narrow(self.axis as isize, self.start, len)?;
        write_into(&region, grad);
        Ok(vec![Some(full)])
    }
}

struct CopyBackward;
impl Backward for CopyBackward {
    fn name(&self) -> &'static str {
        "contiguous"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.clone())])
    }
}

/// Writes `src` (any layout) into the strided f32 view `dst`.
pub(crate) fn write_into(dst: &Tensor, src: &Tensor) {
    let values = src.to_vec_f32();
    let mut buf = dst.storage().write();
    let shape = dst.shape();
    let strides = dst.strides();
    let rank = shape.len();
    let mut index = vec![0usize; rank];
    for &v in &values {
        let mut at = dst.offset();
        for a in 0..rank {
            at += index[a] * strides[a];
        }
        buf.set_f32(at, v);
        for a in (0..rank).rev() {
            index[a] += 1;
            if index[a] < shape[a] {
                break;
            }
            index[a] = 0;
        }
    }
}

/// Strides that let a tensor of `shape`/`strides` be viewed as `new_shape` without moving
/// elements, or `None` when some merged group of axes is not contiguous in memory (the rule
/// NumPy applies before copying on reshape).
fn view_strides(shape: &[usize], strides: &[usize], new_shape: &[usize]) -> Option<Vec<usize>> {
    if shape.iter().product::<usize>() == 0 {
        return None;
    }
    // Axes of extent 1 carry no layout information.
    let (old, old_st): (Vec<usize>, Vec<usize>) = shape
        .iter()
        .zip(strides)
        .filter(|(&n, _)| n != 1)
        .map(|(&n, &s)| (n, s))
        .unzip();
    let mut new_st = vec![1usize; new_shape.len()];
    let (mut oi, mut ni) = (0usize, 0usize);
    while oi < old.len() && ni < new_shape.len() {
        // Grow a group of old axes [oi, oj) and new axes [ni, nj) until both cover as many elements.
        let (mut oj, mut nj) = (oi + 1, ni + 1);
        let (mut op, mut np) = (old[oi], new_shape[ni]);
        while op != np {
            if np < op {
                np *= *new_shape.get(nj)?;
                nj += 1;
            } else {
                op *= *old.get(oj)?;
                oj += 1;
            }
        }
        // The old group must be one contiguous run.
        for k in oi..oj - 1 {
            if old_st[k] != old[k + 1] * old_st[k + 1] {
                return None;
            }
        }
        new_st[nj - 1] = old_st[oj - 1];
        for k in (ni + 1..nj).rev() {
            new_st[k - 1] = new_st[k] * new_shape[k];
        }
        oi = oj;
        ni = nj;
    }
    Some(new_st)
}

pub(crate) fn copy_contiguous(t: &Tensor) -> Tensor {
    Tensor::from_op(t.contiguous_data(), &[t], CopyBackward)
}

impl Tensor {
    /// The same elements under a new shape (every extent explicit). A view whenever the strides
    /// allow it (each group of merged or split axes is contiguous in memory), a copy otherwise.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(Error::BadShape {
                op: "reshape",
                shape: shape.to_vec(),
                reason: format!("{} elements cannot view {:?}", self.numel(), self.shape()),
            });
        }
        let value = match view_strides(self.shape(), self.strides(), shape) {
            Some(strides) => self.view_raw(shape.to_vec(), strides, self.offset()),
            None => {
                let src = self.contiguous_data();
                src.view_raw(shape.to_vec(), contiguous_strides(shape), src.offset())
            }
        };
        Ok(Tensor::from_op(
            value,
            &[self],
            ReshapeBackward {
                shape: self.shape().to_vec(),
            },
        ))
    }

    /// Reorders axes: output axis `i` is input axis `order[i]`. A view.
    pub fn permute(&self, order: &[usize]) -> Result<Tensor> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if order.len() != rank
            || order
                .iter()
                .any(|&a| a >= rank || std::mem::replace(&mut seen[a], true))
        {
            return Err(invalid(
                "permute",
                format!("{order:?} is not a permutation of 0..{rank}"),
            ));
        }
        let shape = order.iter().map(|&a| self.shape()[a]).collect();
        let strides = order.iter().map(|&a| self.strides()[a]).collect();
        let mut inverse = vec![0; rank];
        for (i, &a) in order.iter().enumerate() {
            inverse[a] = i;
        }
        let value = self.view_raw(shape, strides, self.offset());
        Ok(Tensor::from_op(value, &[self], PermuteBackward { inverse }))
    }

    /// Swaps two axes. A view.
    pub fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        let (a, b) = (self.axis(a, "transpose")?, self.axis(b, "transpose")?);
        let mut order: Vec<usize> = (0..self.rank()).collect();
        order.swap(a, b);
        self.permute(&order)
    }

    /// Elements `start..start+len` along `axis`. A view.
    pub fn narrow(&self, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        let ax = self.axis(axis, "narrow")?;
        if start + len > self.shape()[ax] {
            return Err(invalid(
                "narrow",
                format!(
                    "range {start}..{} exceeds axis {ax} of extent {}",
                    start + len,
                    self.shape()[ax]
                ),
            ));
        }
        let mut shape = self.shape().to_vec();
        shape[ax] = len;
        let offset = self.offset() + start * self.strides()[ax];
        let value = self.view_raw(shape, self.strides().to_vec(), offset);
        Ok(Tensor::from_op(
            value,
            &[self],
            NarrowBackward {
                shape: self.shape().to_vec(),
                axis: ax,
                start,
            },
        ))
    }

    /// Splits `axis` into consecutive pieces of the given sizes (views).
    pub fn split(&self, axis: isize, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let ax = self.axis(axis, "split")?;
        if sizes.iter().sum::<usize>() != self.shape()[ax] {
            return Err(invalid(
                "split",
                format!("sizes {sizes:?} do not sum to extent {}", self.shape()[ax]),
            ));
        }
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &s in sizes {
            parts.push(self.narrow(ax as isize, start, s)?);
            start += s;
        }
        Ok(parts)
    }

    /// Joins tensors along `axis`; all other extents must agree.
    pub fn concat(tensors: &[&Tensor], axis: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| invalid("concat", "needs at least one tensor"))?;
        let ax = first.axis(axis, "concat")?;
        let mut shape = first.shape().to_vec();
        shape[ax] = 0;
        for t in tensors {
            let ok = t.rank() == first.rank()
                && t.shape()
                    .iter()
                    .zip(first.shape())
                    .enumerate()
                    .all(|(i, (a, b))| i == ax || a == b);
            if !ok {
                return Err(Error::ShapeMismatch {
                    op: "concat",
                    lhs: first.shape().to_vec(),
                    rhs: t.shape().to_vec(),
                });
            }
            shape[ax] += t.shape()[ax];
        }
        let outer: usize = shape[..ax].iter().product();
        let inner: usize = shape[ax + 1..].iter().product();
        let mut out = crate::pool::zeros(shape.iter().product());
        let row = shape[ax] * inner;
        let mut col = 0;
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors {
            let width = t.shape()[ax] * inner;
            t.with_f32(|v| {
                for o in 0..outer {
                    out[o * row + col..o * row + col + width]
                        .copy_from_slice(&v[o * width..(o + 1) * width]);
                }
            });
            col += width;
            sizes.push(t.shape()[ax]);
        }
        struct ConcatBackward {
            axis: usize,
            sizes: Vec<usize>,
        }
        impl Backward for ConcatBackward {
            fn name(&self) -> &'static str {
                "concat"
            }
            fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
                let parts = grad.data().split(self.axis as isize, &self.sizes)?;
                Ok(parts
                    .into_iter()
                    .map(|p| Some(p.contiguous_data()))
                    .collect())
            }
        }
        let value = Tensor::from_f32_as(out, &shape, first.dtype());
        Ok(Tensor::from_op(
            value,
            tensors,
            ConcatBackward { axis: ax, sizes },
        ))
    }

    /// Rows `indices` of `axis`, in order (repeats allowed).
    pub fn index_select(&self, axis: isize, indices: &[usize]) -> Result<Tensor> {
        let ax = self.axis(axis, "index_select")?;
        let n = self.shape()[ax];
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            return Err(Error::IndexOutOfRange {
                op: "index_select",
                index: bad as i64,
                limit: n,
            });
        }
        let outer: usize = self.shape()[..ax].iter().product();
        let inner: usize = self.shape()[ax + 1..].iter().product();
        let mut shape = self.shape().to_vec();
        shape[ax] = indices.len();
        // Every output row is copied from a source row below, so the buffer needs no zero fill.
        let mut out = crate::pool::uninit(shape.iter().product());
        self.with_f32(|v| {
            for o in 0..outer {
                for (j, &i) in indices.iter().enumerate() {
                    let src = (o * n + i) * inner;
                    let dst = (o * indices.len() + j) * inner;
                    out[dst..dst + inner].copy_from_slice(&v[src..src + inner]);
                }
            }
        });
        struct IndexSelectBackward {
            shape: Vec<usize>,
            axis: usize,
            indices: Vec<usize>,
        }
        impl Backward for IndexSelectBackward {
            fn name(&self) -> &'static str {
                "index_select"
            }
            fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
                let outer: usize = self.shape[..self.axis].iter().product();
                let inner: usize = self.shape[self.axis + 1..].iter().product();
                let n = self.shape[self.axis];
                let mut out = crate::pool::zeros(self.shape.iter().product());
                grad.with_f32(|g| {
                    for o in 0..outer {
                        for (j, &i) in self.indices.iter().enumerate() {
                            let src = (o * self.indices.len() + j) * inner;
                            let dst = (o * n + i) * inner;
                            crate::kernels::add_assign(
                                &mut out[dst..dst + inner],
                                &g[src..src + inner],
                            );
                        }
                    }
                });
                Ok(vec![Some(Tensor::from_f32_unchecked(out, &self.shape))])
            }
        }
        let value = Tensor::from_f32_as(out, &shape, self.dtype());
        Ok(Tensor::from_op(
            value,
            &[self],
            IndexSelectBackward {
                shape: self.shape().to_vec(),
                axis: ax,
                indices: indices.to_vec(),
            },
        ))
    }

    /// Embedding lookup: row `ids[i]` of this `[vocab, dim]` table for each id, shaped
    /// `[ids_shape..., dim]`. Backward scatters into the table's rows.
    pub fn embedding(&self, ids: &[u32], ids_shape: &[usize]) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::BadShape {
                op: "embedding",
                shape: self.shape().to_vec(),
                reason: "the table must be [vocab, dim]".into(),
            });
        }
        if ids_shape.iter().product::<usize>() != ids.len() {
            return Err(invalid(
                "embedding",
                format!("{} ids do not fill shape {ids_shape:?}", ids.len()),
            ));
        }
        let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let rows = self.index_select(0, &idx)?;
        let mut shape = ids_shape.to_vec();
        shape.push(self.shape()[1]);
        rows.reshape(&shape)
    }

    /// `out[i][j][k] = self[index[i][j][k]][j][k]` along `axis` (as `torch.gather`): `index` has the
    /// output's shape `index_shape`, equal to `self`'s except along `axis`.
    pub fn gather(&self, axis: isize, index: &[usize], index_shape: &[usize]) -> Result<Tensor> {
        let ax = self.axis(axis, "gather")?;
        let plan = GatherPlan::new("gather", self.shape(), ax, index, index_shape)?;
        let mut out = crate::pool::zeros(index.len());
        self.with_f32(|v| {
            plan.for_each(|dst, src| out[dst] = v[src]);
        });
        struct GatherBackward {
            plan: GatherPlan,
            shape: Vec<usize>,
        }
        impl Backward for GatherBackward {
            fn name(&self) -> &'static str {
                "gather"
            }
            fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
                let mut out = crate::pool::zeros(self.shape.iter().product());
                grad.with_f32(|g| self.plan.for_each(|dst, src| out[src] += g[dst]));
                Ok(vec![Some(Tensor::from_f32_unchecked(out, &self.shape))])
            }
        }
        let value = Tensor::from_f32_as(out, index_shape, self.dtype());
        Ok(Tensor::from_op(
            value,
            &[self],
            GatherBackward {
                plan,
                shape: self.shape().to_vec(),
            },
        ))
    }

    /// A copy of `self` with `src[i][j][k]` added at `[index[i][j][k]][j][k]` along `axis` (as
    /// `torch.scatter_add`); `src` has shape `index_shape`.
    pub fn scatter_add(&self, axis: isize, index: &[usize], src: &Tensor) -> Result<Tensor> {
        let ax = self.axis(axis, "scatter_add")?;
        let plan = GatherPlan::new("scatter_add", self.shape(), ax, index, src.shape())?;
        let mut out = self.to_vec_f32();
        src.with_f32(|s| plan.for_each(|i, o| out[o] += s[i]));
        struct ScatterAddBackward {
            plan: GatherPlan,
            src_shape: Vec<usize>,
        }
        impl Backward for ScatterAddBackward {
            fn name(&self) -> &'static str {
                "scatter_add"
            }
            fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
                let mut dsrc = crate::pool::zeros(self.src_shape.iter().product());
                grad.with_f32(|g| self.plan.for_each(|i, o| dsrc[i] = g[o]));
                Ok(vec![
                    Some(grad.contiguous_data()),
                    Some(Tensor::from_f32_unchecked(dsrc, &self.src_shape)),
                ])
            }
        }
        let value = Tensor::from_f32_as(out, self.shape(), self.dtype());
        Ok(Tensor::from_op(
            value,
            &[self, src],
            ScatterAddBackward {
                plan,
                src_shape: src.shape().to_vec(),
            },
        ))
    }
}

/// The flat offsets pairing each element of an index-shaped tensor with its place in the indexed
/// tensor, for `gather` and `scatter_add`.
struct GatherPlan {
    pairs: Vec<(usize, usize)>,
}

impl GatherPlan {
    fn new(
        op: &'static str,
        shape: &[usize],
        ax: usize,
        index: &[usize],
        index_shape: &[usize],
    ) -> Result<GatherPlan> {
        if index_shape.len() != shape.len()
            || index_shape
                .iter()
                .zip(shape)
                .enumerate()
                .any(|(i, (a, b))| i != ax && a != b)
            || index_shape.iter().product::<usize>() != index.len()
        {
            return Err(Error::ShapeMismatch {
                op,
                lhs: shape.to_vec(),
                rhs: index_shape.to_vec(),
            });
        }
        let strides = contiguous_strides(shape);
        let istrides = contiguous_strides(index_shape);
        let mut pairs = Vec::with_capacity(index.len());
        for (flat, &ix) in index.iter().enumerate() {
            if ix >= shape[ax] {
                return Err(Error::IndexOutOfRange {
                    op,
                    index: ix as i64,
                    limit: shape[ax],
                });
            }
            let mut rem = flat;
            let mut src = 0;
            for a in 0..shape.len() {
                let c = rem / istrides[a];
                rem %= istrides[a];
                src += if a == ax { ix } else { c } * strides[a];
            }
            pairs.push((flat, src));
        }
        Ok(GatherPlan { pairs })
    }

    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        for &(i, o) in &self.pairs {
            f(i, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};
    use crate::Tensor;

    #[test]
    fn views_share_storage_and_carry_grads() {
        let x = randn(&[2, 3, 4], 1);
        let t = x.transpose(0, 2).unwrap();
        assert!(t.same_storage(&x) && !t.is_contiguous());
        assert!(x.narrow(1, 1, 2).unwrap().same_storage(&x));
        assert_grads(
            |t| {
                t[0].permute(&[2, 0, 1])?
                    .contiguous()
                    .mul(&randn(&[4, 2, 3], 2))
            },
            &[x.clone()],
        );
        assert_grads(|t| t[0].narrow(-1, 1, 2)?.reshape(&[12]), &[x.clone()]);
        assert_grads(|t| t[0].transpose(0, 1)?.reshape(&[24]), &[x.clone()]);
    }

    #[test]
    fn reshape_views_where_strides_allow_and_copies_otherwise() {
        let x = randn(&[4, 6, 5], 3);
        // Merging the last two axes of a narrowed tensor keeps a view (each row stays one run).
        let n = x.narrow(0, 1, 2).unwrap();
        let r = n.reshape(&[2, 30]).unwrap();
        assert!(r.same_storage(&x));
        assert_eq!(r.to_vec_f32(), n.contiguous().to_vec_f32());
        // Splitting an axis of a transposed tensor: a view.
        let t = x.transpose(0, 2).unwrap(); // [5, 6, 4]
        let r = t.reshape(&[5, 2, 3, 4]).unwrap();
        assert!(r.same_storage(&x));
        assert_eq!(r.to_vec_f32(), t.contiguous().to_vec_f32());
        // Merging transposed axes needs a copy, with the same values.
        let r = t.reshape(&[30, 4]).unwrap();
        assert!(!r.same_storage(&x));
        assert_eq!(r.to_vec_f32(), t.contiguous().to_vec_f32());
        // Unit axes anywhere.
        let r = n.reshape(&[1, 2, 1, 6, 5, 1]).unwrap();
        assert!(r.same_storage(&x));
        assert_eq!(r.to_vec_f32(), n.contiguous().to_vec_f32());
        // Every reshape of every permutation gives the copied result.
        for order in [[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1]] {
            let p = x.permute(&order).unwrap();
            for shape in [
                vec![120],
                vec![4, 30],
                vec![20, 6],
                vec![2, 60],
                vec![10, 12],
                vec![5, 24],
            ] {
                let want = p.contiguous().to_vec_f32();
                assert_eq!(
                    p.reshape(&shape).unwrap().to_vec_f32(),
                    want,
                    "{order:?} -> {shape:?}"
                );
            }
        }
        assert_grads(
            |t| t[0].transpose(0, 2)?.reshape(&[5, 2, 3, 4]),
            &[randn(&[4, 6, 5], 4)],
        );
    }

    #[test]
    fn concat_split_index_grads() {
        let a = randn(&[2, 3], 3);
        let b = randn(&[2, 2], 4);
        assert_grads(
            |t| Tensor::concat(&[&t[0], &t[1]], 1),
            &[a.clone(), b.clone()],
        );
        let parts = randn(&[2, 5], 5).split(1, &[3, 2]).unwrap();
        assert_eq!(parts[1].shape(), &[2, 2]);
        assert_grads(|t| t[0].index_select(1, &[2, 0, 2]), &[a.clone()]);
        assert_grads(
            |t| t[0].embedding(&[1, 0, 1, 1], &[2, 2]),
            &[randn(&[3, 4], 6)],
        );
    }

    #[test]
    fn gather_scatter_values_and_grads() {
        let x = Tensor::from_f32(vec![1., 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
        let g = x.gather(1, &[2, 0, 1, 1], &[2, 2]).unwrap();
        assert_eq!(g.to_vec_f32(), vec![3., 1., 5., 5.]);
        let src = Tensor::from_f32(vec![10., 20., 30., 40.], &[2, 2]).unwrap();
        let s = x.scatter_add(1, &[2, 0, 1, 1], &src).unwrap();
        assert_eq!(s.to_vec_f32(), vec![21., 2., 13., 4., 75., 6.]);
        assert_grads(
            |t| t[0].gather(1, &[2, 0, 1, 1], &[2, 2]),
            &[randn(&[2, 3], 7)],
        );
        assert_grads(
            |t| t[0].scatter_add(1, &[2, 0, 1, 1], &t[1]),
            &[randn(&[2, 3], 8), randn(&[2, 2], 9)],
        );
        assert!(x.gather(1, &[3, 0, 0, 0], &[2, 2]).is_err());
    }
}
