//! Mixture-of-Experts routing, dispatch and combine (Shazeer et al. 2017, "Outrageously Large
//! Neural Networks"; Lepikhin et al. 2020, GShard; Fedus et al. 2021, "Switch Transformers").
//!
//! ```text
//! routing   = Routing::top_k(softmax(router logits), experts, k, capacity)   (indices only)
//! rows      = x.index_select(0, routing.tokens())        tokens grouped by expert  [rows, d]
//! h         = rows.grouped_linear(w_fc, b_fc, counts, None)       one product per expert
//! out       = h.grouped_linear(w_proj, b_proj, counts, Some(gelu))
//! y         = out.moe_combine(gates, &routing)          gate-weighted, back in token order
//! ```
//!
//! No dense `[tokens, experts, capacity]` one-hot dispatch tensor exists anywhere (GShard's
//! einsum formulation builds one): the cost of every step follows the rows routed, as in
//! MegaBlocks' gather/scatter reference (Gale et al. 2022).

use rayon::prelude::*;

use super::elementwise::{gelu_grad, gelu_values};
use super::matmul::{column_sums, product_into, MatmulBackward};
use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::error::{invalid, Error, Result};
use crate::Tensor;

/// Expert capacity ⌈factor · k · tokens / experts⌉: the rows each expert takes from a batch of
/// `tokens` tokens with `k` choices each (GShard §2.2; Switch Transformers §2.2, with k = 1;
/// DeepSpeed multiplies the factor by k for top-k in the same way).
pub fn expert_capacity(factor: f64, top_k: usize, tokens: usize, experts: usize) -> usize {
    let exact = factor * top_k.saturating_mul(tokens) as f64 / experts.max(1) as f64;
    // A product that lands a rounding error above a whole number (1.1 · 100 / 2 is
    // 55.00000000000001 in f64) is that number.
    (exact - 1e-9 * exact.max(1.0)).ceil().max(0.0) as usize
}

/// Where each token's choices of expert went: the routing of one batch, as indices only.
///
/// Assignment `t·k + c` is token `t`'s `c`-th choice (its best expert first). Rows are the kept
/// assignments grouped by expert (expert 0's first); inside an expert, every first choice comes
/// before any second choice, and each choice's tokens are in position order, so when capacity
/// runs out the later choices and later positions are dropped (GShard's priority).
///
/// Only [`Routing::top_k`] makes one, so its indices are consistent by construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    experts: usize,
    top_k: usize,
    choice: Vec<usize>,
    row: Vec<usize>,
    assignment: Vec<usize>,
    counts: Vec<usize>,
    wanted: Vec<usize>,
    capacity: Option<usize>,
}

impl Routing {
    /// The row of an assignment over its expert's capacity.
    pub const DROPPED: usize = usize::MAX;

    /// Routes each row of router probabilities `probs` `[tokens, experts]` to its `top_k` most
    /// probable experts (ties to the lower index), each expert taking at most `capacity`
    /// assignments (`None`: all of them).
    pub fn top_k(
        probs: &[f32],
        experts: usize,
        top_k: usize,
        capacity: Option<usize>,
    ) -> Result<Routing> {
        if experts == 0 || top_k == 0 || top_k > experts || !probs.len().is_multiple_of(experts) {
            return Err(invalid(
                "moe routing",
                format!(
                    "{} probabilities over {experts} experts with top_k {top_k}: top_k must be \
                     between 1 and the experts, and the probabilities whole rows",
                    probs.len()
                ),
            ));
        }
        let tokens = probs.len() / experts;
        let mut choice = Vec::with_capacity(tokens * top_k);
        for p in probs.chunks(experts) {
            let first = choice.len();
            for _ in 0..top_k {
                let mut best: Option<usize> = None;
                for (e, &v) in p.iter().enumerate() {
                    // A NaN never wins: a diverged row still routes, to its lowest free experts.
                    if choice[first..].contains(&e) || v.is_nan() {
                        continue;
                    }
                    if best.is_none_or(|b| v > p[b]) {
                        best = Some(e);
                    }
                }
                let best = best.unwrap_or_else(|| {
                    (0..experts)
                        .find(|e| !choice[first..].contains(e))
                        .expect("top_k <= experts")
                });
                choice.push(best);
            }
        }
        // Slots in priority order: every token's first choice, then every second choice.
        let mut wanted = vec![0usize; experts];
        let mut slot = vec![Routing::DROPPED; tokens * top_k];
        for c in 0..top_k {
            for t in 0..tokens {
                let a = t * top_k + c;
                let e = choice[a];
                if capacity.is_none_or(|cap| wanted[e] < cap) {
                    slot[a] = wanted[e];
                }
                wanted[e] += 1;
            }
        }
        let counts: Vec<usize> = wanted
            .iter()
            .map(|&w| capacity.map_or(w, |cap| w.min(cap)))
            .collect();
        let mut offset = vec![0usize; experts];
        for e in 1..experts {
            offset[e] = offset[e - 1] + counts[e - 1];
        }
        let rows = offset[experts - 1] + counts[experts - 1];
        let mut assignment = vec![0usize; rows];
        let row: Vec<usize> = slot
            .iter()
            .zip(&choice)
            .enumerate()
            .map(|(a, (&s, &e))| {
                if s == Routing::DROPPED {
                    return s;
                }
                let r = offset[e] + s;
                assignment[r] = a;
                r
            })
            .collect();
        Ok(Routing {
            experts,
            top_k,
            choice,
            row,
            assignment,
            counts,
            wanted,
            capacity,
        })
    }

    /// Experts routed over.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Choices per token.
    pub fn k(&self) -> usize {
        self.top_k
    }

    /// Expert of each assignment, `[tokens · k]` (assignment `t·k + c` is token `t`'s `c`-th
    /// choice).
    pub fn choice(&self) -> &[usize] {
        &self.choice
    }

    /// Row of each assignment, or [`Routing::DROPPED`] when its expert was full.
    pub fn row(&self) -> &[usize] {
        &self.row
    }

    /// Assignment of each row, `[rows]`.
    pub fn assignment(&self) -> &[usize] {
        &self.assignment
    }

    /// Rows each expert took (kept assignments), `[experts]`.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// Assignments each expert was chosen for before capacity, `[experts]`.
    pub fn wanted(&self) -> &[usize] {
        &self.wanted
    }

    /// The capacity applied; `None` routed dropless.
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.choice.len() / self.top_k
    }

    /// Rows kept (assignments within capacity).
    pub fn rows(&self) -> usize {
        self.assignment.len()
    }

    /// The token of each row, to gather the rows with.
    pub fn row_tokens(&self) -> Vec<usize> {
        self.assignment.iter().map(|a| a / self.top_k).collect()
    }

    /// Assignments dropped for want of capacity.
    pub fn dropped(&self) -> usize {
        self.choice.len() - self.rows()
    }

    /// The share of assignments dropped.
    pub fn dropped_fraction(&self) -> f64 {
        if self.choice.is_empty() {
            0.0
        } else {
            self.dropped() as f64 / self.choice.len() as f64
        }
    }
}

/// Backward of [`Tensor::grouped_linear`]: each group's dX and dW by the dense product's own
/// backward over its rows, so one group of all rows computes exactly what a dense linear layer
/// does.
struct GroupedLinearBackward {
    x: Tensor,
    weight: Tensor,
    counts: Vec<usize>,
    gelu: Option<bool>,
    has_bias: bool,
    needs: [bool; 3],
}

impl Backward for GroupedLinearBackward {
    fn name(&self) -> &'static str {
        "grouped_linear"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let [need_x, need_w, need_b] = self.needs;
        let (d_in, d_out) = (self.weight.shape()[1], self.weight.shape()[2]);
        let rows = self.x.shape()[0];
        let input = match self.gelu {
            Some(exact) if need_w => gelu_values(&self.x, exact),
            _ => self.x.clone(),
        };
        let mut dx = need_x.then(|| crate::pool::uninit(rows * d_in));
        let mut dw = need_w.then(|| crate::pool::uninit(self.weight.numel()));
        let mut db =
            (self.has_bias && need_b).then(|| crate::pool::uninit(self.counts.len() * d_out));
        let grad = grad.contiguous_data();
        let mut off = 0;
        for (e, &n) in self.counts.iter().enumerate() {
            let w_range = e * d_in * d_out..(e + 1) * d_in * d_out;
            if n == 0 {
                // An expert no row reached: no gradient.
                if let Some(dw) = &mut dw {
                    dw[w_range].fill(0.0);
                }
                if let Some(db) = &mut db {
                    db[e * d_out..(e + 1) * d_out].fill(0.0);
                }
                continue;
            }
            let g = grad.narrow(0, off, n)?;
            let product = MatmulBackward {
                a: input.narrow(0, off, n)?,
                b: self.weight.narrow(0, e, 1)?.reshape(&[d_in, d_out])?,
                has_bias: false,
                needs: [need_x, need_w, false],
            };
            product.products(
                &g,
                dx.as_mut().map(|dx| &mut dx[off * d_in..(off + n) * d_in]),
                dw.as_mut().map(|dw| &mut dw[w_range]),
            );
            if let Some(db) = &mut db {
                let sums = g.with_f32(|g| column_sums(g, d_out));
                db[e * d_out..(e + 1) * d_out].copy_from_slice(&sums);
                crate::pool::recycle(sums);
            }
            off += n;
        }
        drop(input);
        let dx = dx.map(|dx| {
            let dx = Tensor::from_f32_unchecked(dx, &[rows, d_in]);
            match self.gelu {
                Some(exact) => gelu_grad(&dx, &self.x, exact),
                None => dx,
            }
        });
        let mut grads = vec![
            dx,
            dw.map(|dw| Tensor::from_f32_unchecked(dw, self.weight.shape())),
        ];
        if self.has_bias {
            grads.push(db.map(|db| Tensor::from_f32_unchecked(db, &[self.counts.len(), d_out])));
        }
        Ok(grads)
    }
}

/// Backward of [`Tensor::moe_combine`]: d rows[r] = gate[a] · dy[a / k] for the assignment `a`
/// of row `r`, and d gate[a] = ⟨rows[r], dy[a / k]⟩ (zero for a dropped assignment).
struct CombineBackward {
    rows: Tensor,
    gates: Tensor,
    row: Vec<usize>,
    assignment: Vec<usize>,
    top_k: usize,
    needs: [bool; 2],
}

impl Backward for CombineBackward {
    fn name(&self) -> &'static str {
        "moe_combine"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.rows.shape()[1];
        let k = self.top_k;
        let (drows, dgates) = grad.with_f32(|g| {
            self.gates.with_f32(|gates| {
                let drows = self.needs[0].then(|| {
                    let mut out = crate::pool::uninit(self.assignment.len() * d);
                    out.par_chunks_mut(d.max(1))
                        .zip(self.assignment.par_iter())
                        .for_each(|(o, &a)| {
                            let (gate, dy) = (gates[a], &g[(a / k) * d..(a / k + 1) * d]);
                            crate::kernels::vectorized(|| {
                                o.iter_mut().zip(dy).for_each(|(o, &dy)| *o = gate * dy)
                            });
                        });
                    out
                });
                let dgates = self.needs[1].then(|| {
                    self.rows.with_f32(|rows| {
                        self.row
                            .par_iter()
                            .enumerate()
                            .map(|(a, &r)| {
                                if r == Routing::DROPPED {
                                    return 0.0;
                                }
                                let dy = &g[(a / k) * d..(a / k + 1) * d];
                                crate::kernels::dot(&rows[r * d..(r + 1) * d], dy)
                            })
                            .collect::<Vec<f32>>()
                    })
                });
                (drows, dgates)
            })
        });
        Ok(vec![
            drows.map(|v| Tensor::from_f32_unchecked(v, self.rows.shape())),
            dgates.map(|v| Tensor::from_f32_unchecked(v, self.gates.shape())),
        ])
    }
}

impl Tensor {
    /// Rows `[rows, in]` grouped by expert (`counts[e]` rows for expert `e`, in expert order)
    /// through each group's own affine map: rows of group `e` times `weight[e]` `[in, out]` plus
    /// `bias[e]`. With `gelu` set, the input first goes through the GELU (exact when `true`, the
    /// tanh approximation otherwise), recomputed in backward rather than kept, as
    /// [`Tensor::gelu_linear`] does. One matrix product per expert over the rows routed to it,
    /// so the cost follows the rows, not rows × experts; a single group is exactly
    /// [`Tensor::linear`] (or `gelu_linear`) on all the rows.
    pub fn grouped_linear(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        counts: &[usize],
        gelu: Option<bool>,
    ) -> Result<Tensor> {
        let ws = weight.shape();
        if self.rank() != 2 || ws.len() != 3 || ws[0] != counts.len() || ws[1] != self.shape()[1] {
            return Err(Error::ShapeMismatch {
                op: "grouped_linear (rows [n, in], weight [experts, in, out])",
                lhs: self.shape().to_vec(),
                rhs: ws.to_vec(),
            });
        }
        if let Some(b) = bias {
            if b.shape() != [ws[0], ws[2]] {
                return Err(Error::ShapeMismatch {
                    op: "grouped_linear bias (weight [experts, in, out], bias [experts, out])",
                    lhs: ws.to_vec(),
                    rhs: b.shape().to_vec(),
                });
            }
        }
        let rows = self.shape()[0];
        let total = counts.iter().try_fold(0usize, |acc, &n| acc.checked_add(n));
        if total != Some(rows) {
            return Err(invalid(
                "grouped_linear",
                format!("group sizes {counts:?} do not add up to the {rows} rows"),
            ));
        }
        let (d_in, d_out) = (ws[1], ws[2]);
        let (weight_data, bias_data) = (weight.data(), bias.map(Tensor::data));
        let mut out = crate::pool::uninit(rows * d_out);
        {
            let input = match gelu {
                Some(exact) => gelu_values(self, exact),
                None => self.data(),
            };
            let mut off = 0;
            for (e, &n) in counts.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let we = weight_data.narrow(0, e, 1)?.reshape(&[d_in, d_out])?;
                let be = match &bias_data {
                    Some(b) => Some(b.narrow(0, e, 1)?.reshape(&[d_out])?),
                    None => None,
                };
                product_into(
                    &input.narrow(0, off, n)?,
                    &we,
                    be.as_ref(),
                    &mut out[off * d_out..(off + n) * d_out],
                )?;
                off += n;
            }
        }
        let value = Tensor::from_f32_as(
            out,
            &[rows, d_out],
            output_dtype(Kind::Product, self.dtype()),
        );
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        Ok(Tensor::from_op(
            value,
            &inputs,
            GroupedLinearBackward {
                x: self.contiguous_data(),
                weight: weight_data.contiguous_data(),
                counts: counts.to_vec(),
                gelu,
                has_bias: bias.is_some(),
                needs: [
                    self.requires_grad(),
                    weight.requires_grad(),
                    bias.is_some_and(Tensor::requires_grad),
                ],
            },
        ))
    }

    /// The experts' output rows `[rows, d]` (grouped as `routing` says) back in token order,
    /// each weighted by its gate: `y[t] = Σ_c gates[t·k + c] · self[routing.row[t·k + c]]`, a
    /// dropped assignment adding nothing (the token passes on the residual path alone).
    /// `gates` holds one gate per assignment, `[tokens · k]`. Returns `[tokens, d]`.
    pub fn moe_combine(&self, gates: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (tokens, k) = (routing.tokens(), routing.top_k);
        if self.rank() != 2 || self.shape()[0] != routing.rows() {
            return Err(invalid(
                "moe_combine",
                format!(
                    "expert rows of shape {:?} for a routing of {} rows",
                    self.shape(),
                    routing.rows()
                ),
            ));
        }
        if gates.numel() != tokens * k {
            return Err(invalid(
                "moe_combine",
                format!("{} gates for {tokens} tokens × {k} choices", gates.numel()),
            ));
        }
        let d = self.shape()[1];
        let mut out = crate::pool::uninit(tokens * d);
        self.with_f32(|rows| {
            gates.with_f32(|g| {
                out.par_chunks_mut(d.max(1)).enumerate().for_each(|(t, y)| {
                    let mut first = true;
                    for a in t * k..(t + 1) * k {
                        let r = routing.row[a];
                        if r == Routing::DROPPED {
                            continue;
                        }
                        let (gate, src) = (g[a], &rows[r * d..(r + 1) * d]);
                        crate::kernels::vectorized(|| {
                            if first {
                                y.iter_mut().zip(src).for_each(|(y, &s)| *y = gate * s);
                            } else {
                                y.iter_mut().zip(src).for_each(|(y, &s)| *y += gate * s);
                            }
                        });
                        first = false;
                    }
                    if first {
                        y.fill(0.0);
                    }
                })
            })
        });
        let value =
            Tensor::from_f32_as(out, &[tokens, d], output_dtype(Kind::Product, self.dtype()));
        let gates_flat = gates.reshape(&[tokens * k])?;
        Ok(Tensor::from_op(
            value,
            &[self, &gates_flat],
            CombineBackward {
                rows: self.contiguous_data(),
                gates: gates_flat.contiguous_data(),
                row: routing.row.clone(),
                assignment: routing.assignment.clone(),
                top_k: k,
                needs: [self.requires_grad(), gates_flat.requires_grad()],
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_grads, randn};
    use crate::DType;

    /// Probabilities written by hand: tokens' preferences over 3 experts.
    fn probs() -> Vec<f32> {
        vec![
            0.7, 0.2, 0.1, // t0: 0, then 1
            0.6, 0.3, 0.1, // t1: 0, then 1
            0.5, 0.1, 0.4, // t2: 0, then 2
            0.1, 0.8, 0.1, // t3: 1, then 0 (tie with 2 goes to the lower index)
            0.2, 0.1, 0.7, // t4: 2, then 0
        ]
    }

    #[test]
    fn top1_with_capacity_drops_later_positions() {
        // Capacity ⌈1.0 · 1 · 5 / 3⌉ = 2: expert 0 wanted by t0, t1, t2 keeps t0 and t1.
        let cap = expert_capacity(1.0, 1, 5, 3);
        assert_eq!(cap, 2);
        let r = Routing::top_k(&probs(), 3, 1, Some(cap)).unwrap();
        assert_eq!(r.choice, vec![0, 0, 0, 1, 2]);
        assert_eq!(r.wanted, vec![3, 1, 1]);
        assert_eq!(r.counts, vec![2, 1, 1]);
        assert_eq!(r.row, vec![0, 1, Routing::DROPPED, 2, 3]);
        assert_eq!(r.assignment, vec![0, 1, 3, 4]);
        assert_eq!(r.row_tokens(), vec![0, 1, 3, 4]);
        assert_eq!(r.dropped(), 1);
        assert!((r.dropped_fraction() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn top2_places_all_first_choices_before_second_choices() {
        // Capacity ⌈1.0 · 2 · 5 / 3⌉ = 4. Expert 0: first choices t0, t1, t2, then the second
        // choices of t3 (kept, slot 3) and t4 (dropped). Expert 1: first choice t3, then second
        // choices t0, t1. Expert 2: first choice t4, second choice t2.
        let cap = expert_capacity(1.0, 2, 5, 3);
        assert_eq!(cap, 4);
        let r = Routing::top_k(&probs(), 3, 2, Some(cap)).unwrap();
        assert_eq!(r.choice, vec![0, 1, 0, 1, 0, 2, 1, 0, 2, 0]);
        assert_eq!(r.wanted, vec![5, 3, 2]);
        assert_eq!(r.counts, vec![4, 3, 2]);
        // Rows: expert 0 = [t0, t1, t2, t3'], expert 1 = [t3, t0', t1'], expert 2 = [t4, t2'].
        assert_eq!(r.row, vec![0, 5, 1, 6, 2, 8, 4, 3, 7, Routing::DROPPED]);
        assert_eq!(r.row_tokens(), vec![0, 1, 2, 3, 3, 0, 1, 4, 2]);
        assert_eq!(r.dropped(), 1);
        // Dropless keeps all ten.
        let r = Routing::top_k(&probs(), 3, 2, None).unwrap();
        assert_eq!(r.counts, vec![5, 3, 2]);
        assert_eq!(r.dropped(), 0);
        assert!(Routing::top_k(&probs(), 3, 4, None).is_err());
    }

    #[test]
    fn capacity_is_exact_and_nan_rows_still_route() {
        // 1.1 · 100 / 2 is 55.00000000000001 in f64; the capacity is 55.
        assert_eq!(expert_capacity(1.1, 1, 100, 2), 55);
        assert_eq!(expert_capacity(1.25, 2, 5, 3), 5);
        assert_eq!(expert_capacity(1.0, 1, 0, 4), 0);
        let probs = [f32::NAN, 0.2, 0.8, f32::NAN, f32::NAN, f32::NAN];
        let r = Routing::top_k(&probs, 3, 2, None).unwrap();
        assert_eq!(r.choice(), &[2, 1, 0, 1]);
        // No tokens: nothing routed, nothing dropped.
        let r = Routing::top_k(&[], 3, 1, Some(0)).unwrap();
        assert_eq!((r.tokens(), r.rows(), r.dropped_fraction()), (0, 0, 0.0));
    }

    #[test]
    fn one_group_is_the_linear_layer_exactly() {
        let x = randn(&[6, 4], 1).requires_grad_();
        let w = randn(&[4, 5], 2).requires_grad_();
        let b = randn(&[5], 3).requires_grad_();
        for gelu in [None, Some(false), Some(true)] {
            let dense = match gelu {
                None => x.linear(&w, Some(&b)).unwrap(),
                Some(exact) => x.gelu_linear(&w, Some(&b), exact).unwrap(),
            };
            let (wg, bg) = (
                w.detach().reshape(&[1, 4, 5]).unwrap().requires_grad_(),
                b.detach().reshape(&[1, 5]).unwrap().requires_grad_(),
            );
            let xg = x.detach().requires_grad_();
            let grouped = xg.grouped_linear(&wg, Some(&bg), &[6], gelu).unwrap();
            assert_eq!(dense.to_vec_f32(), grouped.to_vec_f32());
            let dy = randn(&[6, 5], 4);
            x.zero_grad();
            w.zero_grad();
            b.zero_grad();
            dense.backward_with_grad(&dy).unwrap();
            grouped.backward_with_grad(&dy).unwrap();
            let g = |t: &Tensor| t.grad().unwrap().to_vec_f32();
            assert_eq!(g(&x), g(&xg));
            assert_eq!(g(&w), g(&wg));
            assert_eq!(g(&b), g(&bg));
        }
    }

    #[test]
    fn grouped_linear_grads_with_an_empty_group() {
        let counts = [2, 0, 3];
        for gelu in [None, Some(false)] {
            assert_grads(
                |t| t[0].grouped_linear(&t[1], Some(&t[2]), &counts, gelu),
                &[randn(&[5, 3], 5), randn(&[3, 3, 4], 6), randn(&[3, 4], 7)],
            );
        }
        // Each group used its own weight: group 2's rows equal a plain product with weight 2.
        let (x, w) = (randn(&[5, 3], 5), randn(&[3, 3, 4], 6));
        let y = x.grouped_linear(&w, None, &counts, None).unwrap();
        let want = x
            .narrow(0, 2, 3)
            .unwrap()
            .matmul(&w.narrow(0, 2, 1).unwrap().reshape(&[3, 4]).unwrap())
            .unwrap();
        assert_eq!(y.narrow(0, 2, 3).unwrap().to_vec_f32(), want.to_vec_f32());
    }

    #[test]
    fn combine_weights_and_sums_the_choices() {
        let r = Routing::top_k(&probs(), 3, 2, Some(4)).unwrap();
        let rows = randn(&[r.rows(), 2], 8);
        let gates = randn(&[5, 2], 9);
        let y = rows.moe_combine(&gates, &r).unwrap().to_vec_f32();
        let (rv, gv) = (rows.to_vec_f32(), gates.to_vec_f32());
        for t in 0..5 {
            for j in 0..2 {
                let mut want = 0.0;
                for c in 0..2 {
                    let a = t * 2 + c;
                    if r.row[a] != Routing::DROPPED {
                        want += gv[a] * rv[r.row[a] * 2 + j];
                    }
                }
                assert!((y[t * 2 + j] - want).abs() < 1e-6, "token {t}");
            }
        }
        assert_grads(|t| t[0].moe_combine(&t[1], &r), &[rows, gates]);
        // A token with every choice dropped gets zeros.
        let r = Routing::top_k(&probs(), 3, 1, Some(1)).unwrap();
        let rows = Tensor::ones(&[r.rows(), 2], DType::F32);
        let y = rows
            .moe_combine(&Tensor::ones(&[5], DType::F32), &r)
            .unwrap();
        assert_eq!(
            y.to_vec_f32(),
            vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
        );
    }
}
