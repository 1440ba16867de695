//! Reverse-mode automatic differentiation on a graph of coarse ops.
//!
//! Every op that produces a tensor from inputs needing gradients records a node: the op's
//! [`Backward`] (which owns exactly the tensors the gradient needs) and edges to its inputs.
//! [`Tensor::backward`] walks the nodes from the loss in reverse dependency order; each node's
//! backward is *moved out* of the graph and dropped after it runs, so saved activations are freed
//! as soon as backward has used them, and running backward twice through one graph is an error.
//!
//! Leaves (parameters and inputs marked with [`Tensor::requires_grad_`]) accumulate their gradient
//! into a buffer they own, so micro-batches accumulate by calling backward repeatedly. A leaf's
//! hooks run the moment its gradient for this backward pass is final, which is where a data
//! parallel trainer starts that gradient's all-reduce while backward continues.
//!
//! Custom ops live outside this crate with the same API the built-in ones use: compute the output
//! without tracking, then [`Tensor::from_op`] with a [`Backward`] implementation.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::storage::Buffer;
use crate::{DType, Tensor};

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

fn next_id() -> usize {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Calls and seconds per op name.
type OpTimes = HashMap<&'static str, (u32, f64)>;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static PROFILE: std::cell::RefCell<Option<OpTimes>> =
        const { std::cell::RefCell::new(None) };
    /// While a checkpointed segment runs its untracked forward: the leaves its ops read.
    static LEAF_RECORDER: std::cell::RefCell<Option<Vec<Arc<Leaf>>>> = const { std::cell::RefCell::new(None) };
    /// Depth of backward passes nested inside a checkpoint's recomputation.
    static NESTED_BACKWARD: Cell<usize> = const { Cell::new(0) };
    static FORWARD_PROFILE: std::cell::RefCell<Option<(std::time::Instant, OpTimes)>> =
        const { std::cell::RefCell::new(None) };
}

/// Starts attributing, on this thread, the time between consecutive recorded ops to the later
/// one (its forward computation, as ops compute their value and then record it).
pub fn start_forward_profile() {
    FORWARD_PROFILE.with(|p| *p.borrow_mut() = Some((std::time::Instant::now(), HashMap::new())));
}

/// Stops the forward attribution and returns (op name, calls, seconds), slowest first.
pub fn take_forward_profile() -> Vec<(&'static str, u32, f64)> {
    let map = FORWARD_PROFILE
        .with(|p| p.borrow_mut().take())
        .map(|(_, m)| m)
        .unwrap_or_default();
    let mut v: Vec<_> = map.into_iter().map(|(k, (n, s))| (k, n, s)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

fn note_forward(name: &'static str) {
    FORWARD_PROFILE.with(|p| {
        if let Some((last, map)) = p.borrow_mut().as_mut() {
            let now = std::time::Instant::now();
            let e = map.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += (now - *last).as_secs_f64();
            *last = now;
        }
    });
}

/// Starts recording, on this thread, the wall time each kind of op spends in backward.
pub fn start_backward_profile() {
    PROFILE.with(|p| *p.borrow_mut() = Some(HashMap::new()));
}

/// Stops recording and returns (op name, calls, seconds), slowest first.
pub fn take_backward_profile() -> Vec<(&'static str, u32, f64)> {
    let map = PROFILE.with(|p| p.borrow_mut().take()).unwrap_or_default();
    let mut v: Vec<_> = map.into_iter().map(|(k, (n, s))| (k, n, s)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

/// True unless inside [`no_grad`].
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` without recording any op for autograd (inference, optimizer updates, evaluation).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    set_grad_mode(false, f)
}

/// Runs `f` recording ops even inside an enclosing [`no_grad`] (used by recomputation).
pub fn enable_grad<R>(f: impl FnOnce() -> R) -> R {
    set_grad_mode(true, f)
}

fn set_grad_mode<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(enabled)));
    f()
}

/// The gradient rule of one op: given dLoss/dOutput, the gradient for each of the op's inputs, in
/// the order they were passed to [`Tensor::from_op`] (`None` for an input that gets none).
///
/// `backward` takes `self` by value: whatever the op saved is dropped when it returns.
pub trait Backward: Send + Sync {
    /// A short name used in error messages.
    fn name(&self) -> &'static str;
    /// Gradients for each input.
    fn backward(self: Box<Self>, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// A hook run with a leaf's gradient buffer when its gradient for the current backward is final.
pub type GradHook = Box<dyn Fn(&Tensor) + Send + Sync>;

/// A tensor that accumulates a gradient.
pub(crate) struct Leaf {
    pub(crate) id: usize,
    pub(crate) grad: Tensor,
    hooks: Mutex<Vec<GradHook>>,
}

pub(crate) struct Node {
    id: usize,
    name: &'static str,
    inputs: Vec<Option<Edge>>,
    input_shapes: Vec<Vec<usize>>,
    backward: Mutex<Option<Box<dyn Backward>>>,
}

#[derive(Clone)]
enum Edge {
    Node(Arc<Node>),
    Leaf(Arc<Leaf>),
}

/// Where a tensor sits in the autograd graph.
#[derive(Clone, Default)]
pub(crate) enum Autograd {
    /// No gradient is tracked.
    #[default]
    None,
    /// A user-created tensor that accumulates its gradient.
    Leaf(Arc<Leaf>),
    /// The output of a recorded op.
    Node(Arc<Node>),
}

impl Tensor {
    /// True when gradients flow to or through this tensor.
    pub fn requires_grad(&self) -> bool {
        !matches!(self.0.autograd, Autograd::None)
    }

    /// True for a tensor that accumulates its own gradient (a parameter or marked input).
    pub fn is_leaf(&self) -> bool {
        matches!(self.0.autograd, Autograd::Leaf(_))
    }

    /// Marks this tensor as a leaf that accumulates its gradient into a fresh f32 buffer of its
    /// shape. Returns the leaf; the receiver is unchanged.
    pub fn requires_grad_(&self) -> Tensor {
        let grad = Tensor::zeros(self.shape(), DType::F32);
        self.with_grad_buffer(grad)
    }

    /// Makes a leaf whose gradient accumulates into `grad` (a view into a flat gradient buffer,
    /// for parameters). `grad` must be contiguous f32 or bf16 (rounded to nearest even as it
    /// accumulates) of the same shape.
    pub(crate) fn with_grad_buffer(&self, grad: Tensor) -> Tensor {
        debug_assert_eq!(grad.shape(), self.shape());
        debug_assert!(grad.is_contiguous() && grad.dtype() != DType::F16);
        let leaf = Arc::new(Leaf {
            id: next_id(),
            grad,
            hooks: Mutex::new(Vec::new()),
        });
        self.with_autograd(Autograd::Leaf(leaf))
    }

    /// The same values cut off from the graph: no gradient flows through the result.
    pub fn detach(&self) -> Tensor {
        self.data()
    }

    /// A leaf's accumulated gradient (same shape; f32, or bf16 in a store that keeps bf16
    /// gradients), or `None` for a non-leaf.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.0.autograd {
            Autograd::Leaf(l) => Some(l.grad.clone()),
            _ => None,
        }
    }

    /// Sets a leaf's accumulated gradient to zero.
    pub fn zero_grad(&self) {
        if let Autograd::Leaf(l) = &self.0.autograd {
            fill_zero(&l.grad);
        }
    }

    /// Registers a hook run when this leaf's gradient is final in a backward pass.
    pub fn register_grad_hook(&self, hook: impl Fn(&Tensor) + Send + Sync + 'static) -> Result<()> {
        match &self.0.autograd {
            Autograd::Leaf(l) => {
                l.hooks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Box::new(hook));
                Ok(())
            }
            _ => Err(Error::Autograd(
                "gradient hooks can only be registered on leaf tensors".into(),
            )),
        }
    }

    /// Records an op: `value` is the op's output computed without tracking; `inputs` are the
    /// tensors it was computed from; `backward` computes their gradients. When gradients are
    /// disabled or no input requires them, returns `value` untouched and drops `backward`.
    pub fn from_op(value: Tensor, inputs: &[&Tensor], backward: impl Backward + 'static) -> Tensor {
        LEAF_RECORDER.with(|r| {
            if let Some(seen) = r.borrow_mut().as_mut() {
                for t in inputs {
                    if let Autograd::Leaf(l) = &t.0.autograd {
                        if !seen.iter().any(|s| s.id == l.id) {
                            seen.push(l.clone());
                        }
                    }
                }
            }
        });
        if !is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
            return value;
        }
        from_op_always(value, inputs, backward)
    }

    /// Backpropagates from a one-element tensor (the loss), seeding dLoss/dLoss = 1.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward() without a gradient needs a one-element loss, got shape {:?}; use backward_with_grad",
                self.shape()
            )));
        }
        self.backward_with_grad(&Tensor::ones(self.shape(), DType::F32))
    }

    /// Backpropagates `grad` (dLoss/dSelf, same shape) through the graph that produced this
    /// tensor, as a pipeline stage does with the gradient it receives from the next stage.
    pub fn backward_with_grad(&self, grad: &Tensor) -> Result<()> {
        if grad.shape() != self.shape() {
            return Err(Error::ShapeMismatch {
                op: "backward_with_grad",
                lhs: self.shape().to_vec(),
                rhs: grad.shape().to_vec(),
            });
        }
        match &self.0.autograd {
            Autograd::None => Err(Error::Autograd(
                "backward on a tensor that does not require grad".into(),
            )),
            Autograd::Leaf(l) => {
                accumulate_leaf(l, grad);
                run_hooks(l);
                Ok(())
            }
            Autograd::Node(root) => no_grad(|| run_backward(root.clone(), grad.clone())),
        }
    }
}

fn fill_zero(t: &Tensor) {
    let mut buf = t.storage().write();
    let (off, n) = (t.offset(), t.numel());
    match &mut *buf {
        Buffer::F32(v) => v[off..off + n].fill(0.0),
        Buffer::BF16(v) => v[off..off + n].fill(half::bf16::ZERO),
        Buffer::F16(v) => v[off..off + n].fill(half::f16::ZERO),
    }
}

fn accumulate_leaf(leaf: &Leaf, grad: &Tensor) {
    let g = &leaf.grad;
    if grad.same_storage(g) {
        // Reading and writing one storage would take its lock twice: copy the source first.
        let copy = Tensor::from_f32_unchecked(grad.to_vec_f32(), grad.shape());
        return accumulate_leaf(leaf, &copy);
    }
    grad.with_f32(|src| {
        let mut buf = g.storage().write();
        let range = g.offset()..g.offset() + g.numel();
        match &mut *buf {
            Buffer::F32(v) => crate::kernels::add_assign(&mut v[range], src),
            Buffer::BF16(v) => crate::kernels::add_assign_bf16(&mut v[range], src),
            Buffer::F16(_) => unreachable!("gradients are f32 or bf16"),
        }
    });
}

fn run_hooks(leaf: &Leaf) {
    // Inside a checkpoint's recomputation the gradient is not final yet: the enclosing pass counts
    // this leaf among the checkpoint node's edges and runs the hooks when it is.
    if NESTED_BACKWARD.with(|d| d.get()) > 0 {
        return;
    }
    let hooks = leaf.hooks.lock().unwrap_or_else(|e| e.into_inner());
    for h in hooks.iter() {
        h(&leaf.grad);
    }
}

/// Sums two gradients, in place when the first is uniquely owned contiguous f32.
fn add_grads(acc: Tensor, g: Tensor) -> Tensor {
    if acc.dtype() == DType::F32
        && acc.is_contiguous()
        && Arc::strong_count(&acc.0) == 1
        && Arc::strong_count(acc.storage()) == 1
    {
        g.with_f32(|src| {
            let mut buf = acc.storage().write();
            if let Buffer::F32(v) = &mut *buf {
                let off = acc.offset();
                crate::kernels::add_assign(&mut v[off..off + src.len()], src);
            }
        });
        return acc;
    }
    let mut out = acc.to_vec_f32();
    g.with_f32(|src| crate::kernels::add_assign(&mut out, src));
    Tensor::from_f32_unchecked(out, acc.shape())
}

fn run_backward(root: Arc<Node>, seed: Tensor) -> Result<()> {
    // Count, for every node and leaf reachable from the root, how many edges point at it.
    let mut deps: HashMap<usize, usize> = HashMap::new();
    let mut leaf_uses: HashMap<usize, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.clone()];
    seen.insert(root.id);
    while let Some(node) = stack.pop() {
        for edge in node.inputs.iter().flatten() {
            match edge {
                Edge::Node(child) => {
                    *deps.entry(child.id).or_insert(0) += 1;
                    if seen.insert(child.id) {
                        stack.push(child.clone());
                    }
                }
                Edge::Leaf(leaf) => *leaf_uses.entry(leaf.id).or_insert(0) += 1,
            }
        }
    }

    let mut pending: HashMap<usize, Tensor> = HashMap::new();
    pending.insert(root.id, seed);
    let mut ready = vec![root];
    while let Some(node) = ready.pop() {
        let backward = node
            .backward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let grad = pending.remove(&node.id);
        let input_grads: Vec<Option<Tensor>> = match (backward, grad) {
            (Some(b), Some(g)) => {
                let t0 = std::time::Instant::now();
                let grads = b.backward(&g)?;
                PROFILE.with(|p| {
                    if let Some(map) = p.borrow_mut().as_mut() {
                        let e = map.entry(node.name).or_insert((0, 0.0));
                        e.0 += 1;
                        e.1 += t0.elapsed().as_secs_f64();
                    }
                });
                if grads.len() != node.inputs.len() {
                    return Err(Error::Autograd(format!(
                        "{}: backward returned {} gradients for {} inputs",
                        node.name,
                        grads.len(),
                        node.inputs.len()
                    )));
                }
                grads
            }
            (None, Some(_)) => {
                return Err(Error::Autograd(format!(
                    "{}: backward through this graph a second time (its saved tensors were freed after the first); run the forward again",
                    node.name
                )))
            }
            // No gradient reached this node: its inputs get none from it.
            (_, None) => vec![None; node.inputs.len()],
        };
        for (i, (edge, g)) in node.inputs.iter().zip(input_grads).enumerate() {
            let Some(edge) = edge else { continue };
            if let Some(g) = &g {
                if g.shape() != node.input_shapes[i].as_slice() {
                    return Err(Error::Autograd(format!(
                        "{}: gradient for input {i} has shape {:?}, the input has {:?}",
                        node.name,
                        g.shape(),
                        node.input_shapes[i]
                    )));
                }
            }
            match edge {
                Edge::Node(child) => {
                    if let Some(g) = g {
                        let acc = match pending.remove(&child.id) {
                            Some(prev) => add_grads(prev, g),
                            None => g,
                        };
                        pending.insert(child.id, acc);
                    }
                    let d = deps.get_mut(&child.id).expect("counted above");
                    *d -= 1;
                    if *d == 0 {
                        ready.push(child.clone());
                    }
                }
                Edge::Leaf(leaf) => {
                    if let Some(g) = g {
                        accumulate_leaf(leaf, &g);
                    }
                    let u = leaf_uses.get_mut(&leaf.id).expect("counted above");
                    *u -= 1;
                    if *u == 0 {
                        run_hooks(leaf);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Activation checkpointing: runs `f` on `inputs` without keeping anything for backward, and
/// recomputes it (with the same inputs, so `f` must be deterministic: pass dropout seeds in) when
/// the gradient arrives. Trades one extra forward of the segment for its activation memory
/// (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
///
/// Parameters `f` reads receive their gradients during the recomputation. The untracked forward
/// notes which leaves it reads and the checkpoint node keeps an edge to each, so their grad hooks
/// still fire exactly once, when every use (inside this segment, other segments or outside) has
/// contributed.
pub fn checkpoint<F>(inputs: &[Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let needs: Vec<bool> = inputs.iter().map(|t| t.requires_grad()).collect();
    // Run untracked, noting which leaves (parameters) the segment reads: the node gets an edge to
    // each, so the enclosing backward knows their gradients are final only after this node.
    let outer_recording = LEAF_RECORDER.with(|r| r.borrow_mut().replace(Vec::new()));
    let out = no_grad(|| f(&detached));
    let inner_leaves = LEAF_RECORDER
        .with(|r| std::mem::replace(&mut *r.borrow_mut(), outer_recording))
        .unwrap_or_default();
    if LEAF_RECORDER.with(|r| r.borrow().is_some()) {
        // A checkpoint inside a checkpointed segment: the outer segment reads these leaves too.
        LEAF_RECORDER.with(|r| {
            if let Some(seen) = r.borrow_mut().as_mut() {
                for l in &inner_leaves {
                    if !seen.iter().any(|s| s.id == l.id) {
                        seen.push(l.clone());
                    }
                }
            }
        });
    }
    let out = out?;
    let refs: Vec<&Tensor> = inputs.iter().collect();
    // Parameters captured by `f` make the segment need backward even if no input does.
    let any_param_path = is_grad_enabled();
    if !any_param_path {
        return Ok(out);
    }
    struct CheckpointBackward<F> {
        inputs: Vec<Tensor>,
        needs: Vec<bool>,
        extra_edges: usize,
        f: F,
    }
    impl<F> Backward for CheckpointBackward<F>
    where
        F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync,
    {
        fn name(&self) -> &'static str {
            "checkpoint"
        }
        fn backward(self: Box<Self>, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>> {
            let leaves: Vec<Tensor> = self
                .inputs
                .iter()
                .zip(&self.needs)
                .map(|(t, &n)| if n { t.requires_grad_() } else { t.clone() })
                .collect();
            NESTED_BACKWARD.with(|d| d.set(d.get() + 1));
            let result = enable_grad(|| -> Result<()> {
                let y = (self.f)(&leaves)?;
                if y.requires_grad() {
                    y.backward_with_grad(grad_output)?;
                }
                Ok(())
            });
            NESTED_BACKWARD.with(|d| d.set(d.get() - 1));
            result?;
            // The parameters' gradients were accumulated by the nested pass; their edges get none.
            Ok(leaves
                .iter()
                .zip(&self.needs)
                .map(|(l, &n)| if n { l.grad() } else { None })
                .chain(std::iter::repeat_n(None, self.extra_edges))
                .collect())
        }
    }
    let extra: Vec<Edge> = inner_leaves.into_iter().map(Edge::Leaf).collect();
    let node_backward = CheckpointBackward {
        inputs: detached,
        needs,
        extra_edges: extra.len(),
        f,
    };
    // Record the node even when no input needs a gradient, so parameters inside still get theirs.
    Ok(record_node(out, &refs, extra, node_backward))
}

/// Like [`Tensor::from_op`] but records the node even when no input requires grad (the op has
/// parameters of its own that backward reaches).
fn from_op_always(value: Tensor, inputs: &[&Tensor], backward: impl Backward + 'static) -> Tensor {
    record_node(value, inputs, Vec::new(), backward)
}

/// Records a node with edges to `inputs`, plus `extra` edges that only order the pass (their
/// gradient is always `None`: the checkpoint's parameters).
fn record_node(
    value: Tensor,
    inputs: &[&Tensor],
    extra: Vec<Edge>,
    backward: impl Backward + 'static,
) -> Tensor {
    note_forward(backward.name());
    let mut input_shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
    input_shapes.extend(extra.iter().map(|e| match e {
        Edge::Leaf(l) => l.grad.shape().to_vec(),
        Edge::Node(_) => Vec::new(),
    }));
    let edges = inputs
        .iter()
        .map(|t| match &t.0.autograd {
            Autograd::None => None,
            Autograd::Leaf(l) => Some(Edge::Leaf(l.clone())),
            Autograd::Node(n) => Some(Edge::Node(n.clone())),
        })
        .chain(extra.into_iter().map(Some))
        .collect();
    let node = Arc::new(Node {
        id: next_id(),
        name: backward.name(),
        inputs: edges,
        input_shapes,
        backward: Mutex::new(Some(Box::new(backward))),
    });
    value.with_autograd(Autograd::Node(node))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::testing::randn;

    #[test]
    fn accumulates_over_micro_batches_and_zeroes() {
        let w = randn(&[3], 1).requires_grad_();
        for _ in 0..2 {
            w.scale(2.0).sum_all().unwrap().backward().unwrap();
        }
        assert_eq!(w.grad().unwrap().to_vec_f32(), vec![4.0; 3]);
        w.zero_grad();
        assert_eq!(w.grad().unwrap().to_vec_f32(), vec![0.0; 3]);
    }

    #[test]
    fn second_backward_is_an_error_and_saved_tensors_are_freed() {
        let w = randn(&[4], 2).requires_grad_();
        let loss = w.mul(&w).unwrap().sum_all().unwrap();
        loss.backward().unwrap();
        let err = loss.backward().unwrap_err();
        assert!(err.to_string().contains("second time"), "{err}");
    }

    #[test]
    fn no_grad_detach_and_frozen() {
        let w = randn(&[2], 3).requires_grad_();
        let y = no_grad(|| w.scale(3.0));
        assert!(!y.requires_grad());
        assert!(!w.detach().requires_grad());
        let c = randn(&[2], 4); // constant: no grad
        let y = w.mul(&c).unwrap().add(&c.exp()).unwrap().sum_all().unwrap();
        y.backward().unwrap();
        assert_eq!(w.grad().unwrap().to_vec_f32(), c.to_vec_f32());
        assert!(c.grad().is_none());
    }

    #[test]
    fn backward_with_supplied_gradient() {
        let w = randn(&[3], 5).requires_grad_();
        let y = w.scale(2.0);
        y.backward_with_grad(&Tensor::from_f32(vec![1.0, 2.0, 3.0], &[3]).unwrap())
            .unwrap();
        assert_eq!(w.grad().unwrap().to_vec_f32(), vec![2.0, 4.0, 6.0]);
        assert!(y
            .backward_with_grad(&Tensor::zeros(&[2], DType::F32))
            .is_err());
    }

    #[test]
    fn backward_with_a_leafs_own_gradient_buffer_does_not_deadlock() {
        let w = randn(&[3], 11).requires_grad_();
        w.scale(1.0).sum_all().unwrap().backward().unwrap();
        w.backward_with_grad(&w.grad().unwrap()).unwrap();
        assert_eq!(w.grad().unwrap().to_vec_f32(), vec![2.0; 3]);
    }

    #[test]
    fn hook_fires_once_when_gradient_is_final() {
        // w is used twice; the hook must see the sum of both uses.
        let w = randn(&[2], 6).requires_grad_();
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        w.register_grad_hook(move |g| {
            assert_eq!(g.to_vec_f32(), vec![5.0, 5.0]);
            s2.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let a = w.scale(2.0);
        let b = w.scale(3.0);
        a.add(&b).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn custom_op_defined_with_the_public_api() {
        // y = x³ with its own backward, as a crate outside this one would define it.
        struct Cube(Tensor);
        impl Backward for Cube {
            fn name(&self) -> &'static str {
                "cube"
            }
            fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
                let x = self.0;
                Ok(vec![Some(grad.mul(&x.mul(&x)?.scale(3.0))?)])
            }
        }
        let x = Tensor::from_f32(vec![1.0, 2.0], &[2])
            .unwrap()
            .requires_grad_();
        let value = no_grad(|| x.mul(&x).and_then(|s| s.mul(&x))).unwrap();
        let y = Tensor::from_op(value, &[&x], Cube(x.detach()));
        y.sum_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec_f32(), vec![3.0, 12.0]);
    }

    #[test]
    fn hooks_fire_once_with_the_full_gradient_across_checkpointed_segments() {
        // w is read by two checkpointed segments and outside them.
        let run = |ckpt: bool| {
            let w = randn(&[4, 4], 21).requires_grad_();
            let fired = Arc::new(std::sync::Mutex::new(Vec::new()));
            let f2 = fired.clone();
            w.register_grad_hook(move |g| f2.lock().unwrap().push(g.to_vec_f32()))
                .unwrap();
            let x = randn(&[2, 4], 22).requires_grad_();
            let seg = {
                let w = w.clone();
                move |t: &[Tensor]| Ok(t[0].matmul(&w)?.gelu_tanh())
            };
            let h = if ckpt {
                checkpoint(&[x.clone()], seg.clone()).unwrap()
            } else {
                seg(&[x.clone()]).unwrap()
            };
            let h = if ckpt {
                checkpoint(&[h], seg).unwrap()
            } else {
                seg(&[h]).unwrap()
            };
            h.matmul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let calls = fired.lock().unwrap().clone();
            (calls, w.grad().unwrap().to_vec_f32())
        };
        let (plain_calls, plain_grad) = run(false);
        let (ckpt_calls, ckpt_grad) = run(true);
        assert_eq!(plain_calls.len(), 1);
        assert_eq!(ckpt_calls.len(), 1, "hook fired {} times", ckpt_calls.len());
        assert_eq!(ckpt_calls[0], plain_grad, "the hook saw the final gradient");
        assert_eq!(ckpt_grad, plain_grad);
    }

    #[test]
    fn checkpoint_gives_identical_gradients() {
        let x = randn(&[4, 8], 7);
        let w1 = randn(&[8, 8], 8).requires_grad_();
        let w2 = randn(&[8, 8], 9).requires_grad_();
        let block = {
            let (w1, w2) = (w1.clone(), w2.clone());
            move |t: &[Tensor]| t[0].matmul(&w1)?.gelu_tanh().matmul(&w2)?.dropout(0.1, 42)
        };
        let xa = x.requires_grad_();
        block(&[xa.clone()])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (g1, g2, gx) = (
            w1.grad().unwrap().to_vec_f32(),
            w2.grad().unwrap().to_vec_f32(),
            xa.grad().unwrap().to_vec_f32(),
        );
        w1.zero_grad();
        w2.zero_grad();
        let xb = x.requires_grad_();
        checkpoint(&[xb.clone()], block)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(w1.grad().unwrap().to_vec_f32(), g1);
        assert_eq!(w2.grad().unwrap().to_vec_f32(), g2);
        assert_eq!(xb.grad().unwrap().to_vec_f32(), gx);
    }
}
