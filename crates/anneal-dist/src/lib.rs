//! Communication for anneal's parallel training: the [`Communicator`] trait every parallel
//! strategy is written against, and its backends.
//!
//! - [`local`]: ranks as threads of one process, exchanging owned buffers (never shared
//!   tensors). The default, used by the tests and by single-machine multi-rank runs.
//! - `mpi` (behind the cargo feature `mpi`): the `mpi` crate on Open MPI, for jobs launched with
//!   `mpirun`. The trait leaves room for NCCL later.
//!
//! Reductions are deterministic: every backend sums the ranks' contributions in rank order, so
//! an all-reduce and a reduce-scatter followed by an all-gather give bitwise the same values,
//! and a run repeats bit for bit. (This is what lets ZeRO's sharded reduction be checked
//! bitwise against plain data parallelism.)
//!
//! Failure is collective: when any rank fails (returns an error or panics), every other rank's
//! pending or later communication returns [`Error::PeerFailed`] naming that rank and its error,
//! so a job ends instead of hanging.

pub mod expert_parallel;
pub mod local;
pub mod model_parallel;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod zero3;

pub use expert_parallel::ExpertParallel;
pub use model_parallel::ModelParallel;
pub use zero3::ZeroThree;

/// Errors of communication. Each names the rank or the sizes at fault.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// Another rank failed; this rank's communication cannot complete.
    #[error("rank {rank} failed: {reason}")]
    PeerFailed {
        /// The global rank that failed first.
        rank: usize,
        /// Its error.
        reason: String,
    },
    /// A call's arguments do not fit the group (a rank out of range, a length not divisible
    /// by the group size, ranks disagreeing on a length).
    #[error("{op}: {reason}")]
    Invalid {
        /// The collective.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// How an all-reduce or reduce-scatter combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// The sum, added in rank order.
    Sum,
    /// The sum (in rank order) divided by the number of ranks.
    Mean,
}

/// Rank `rank`'s shard of `total` elements split over `size` ranks: chunks of [`shard_len`]
/// elements, the last ones shorter (or empty). Collectives over shards pad every chunk to that
/// length.
pub fn shard_range(total: usize, rank: usize, size: usize, align: usize) -> std::ops::Range<usize> {
    let chunk = shard_len(total, size, align);
    (rank * chunk).min(total)..((rank + 1) * chunk).min(total)
}

/// The length of every shard of `total` elements over `size` ranks: ⌈total / size⌉ rounded up
/// to a multiple of `align` (so a shard holds whole chunks of a chunked reduction).
pub fn shard_len(total: usize, size: usize, align: usize) -> usize {
    let align = align.max(1);
    total.div_ceil(size.max(1)).div_ceil(align) * align
}

/// 64-bit words (f64 bit patterns, ids) as the bit patterns of pairs of f32 values, so they
/// travel through f32 collectives exactly (no arithmetic touches them).
pub fn words_to_f32(words: impl IntoIterator<Item = u64>) -> Vec<f32> {
    words
        .into_iter()
        .flat_map(|w| [f32::from_bits(w as u32), f32::from_bits((w >> 32) as u32)])
        .collect()
}

/// The words [`words_to_f32`] encoded, back from their pairs.
pub fn f32_to_words(values: &[f32]) -> impl Iterator<Item = u64> + '_ {
    values
        .chunks_exact(2)
        .map(|p| p[0].to_bits() as u64 | (p[1].to_bits() as u64) << 32)
}

/// The process groups of hybrid sharding (PaddlePaddle's sharding axis inside data
/// parallelism): the world's `dp × sharding` ranks as `dp` replicas of `sharding` ranks each,
/// rank r being shard `r % sharding` of replica `r / sharding`. Returns this rank's sharding group
/// (the ranks of its replica, ordered by shard) and its replica group (the ranks holding the same
/// shard in every replica, ordered by replica). Fails, before any communication, when the world
/// is not `dp × sharding` ranks.
pub fn hybrid_groups(
    world: &dyn Communicator,
    dp: usize,
    sharding: usize,
) -> Result<(Box<dyn Communicator>, Box<dyn Communicator>)> {
    if dp == 0 || sharding == 0 || dp.checked_mul(sharding) != Some(world.size()) {
        return Err(Error::Invalid {
            op: "hybrid_groups",
            reason: format!(
                "dp = {dp} × sharding = {sharding} must equal the {} ranks of the job",
                world.size()
            ),
        });
    }
    let r = world.rank();
    let (replica, shard) = (r / sharding, r % sharding);
    let sharding_group = world.split(replica, shard)?;
    let replica_group = world.split(shard, replica)?;
    Ok((sharding_group, replica_group))
}

/// The ranks' contributions `parts` (in rank order, of equal length) added in rank order and,
/// for [`Reduce::Mean`], divided by their number: the one reduction every backend computes, so
/// backends agree bit for bit.
pub(crate) fn reduce_in_rank_order(
    op_name: &'static str,
    parts: Vec<Vec<f32>>,
    op: Reduce,
) -> Result<Vec<f32>> {
    let n = parts.len();
    let len = parts.first().map_or(0, Vec::len);
    if let Some(i) = parts.iter().position(|p| p.len() != len) {
        return Err(Error::Invalid {
            op: op_name,
            reason: format!(
                "rank {i} contributed {} values, rank 0 {len}",
                parts[i].len()
            ),
        });
    }
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_default();
    for p in parts {
        for (s, v) in sum.iter_mut().zip(&p) {
            *s += v;
        }
    }
    if op == Reduce::Mean {
        let n = n as f32;
        sum.iter_mut().for_each(|s| *s /= n);
    }
    Ok(sum)
}

/// A communication failure inside a layer's op as an engine error, `op` naming the collective's
/// purpose (the parallel contexts' ops report through `anneal_tensor`'s errors).
pub(crate) fn comm_error(op: &'static str) -> impl Fn(Error) -> anneal_tensor::Error {
    move |e| anneal_tensor::Error::Invalid {
        op,
        reason: e.to_string(),
    }
}

/// Whether this process is one of several ranks started by an MPI launcher (`mpirun` of Open MPI,
/// or a PMI launcher such as MPICH's), read from the environment the launcher sets.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().any(|v| {
        std::env::var(v)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .is_some_and(|n| n > 1)
    })
}

/// How many ranks of the job the launcher started on this machine (Open MPI's and MPICH's
/// environment), to share its cores among them.
pub fn ranks_on_this_node() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
}

/// The largest message tag every backend takes: MPI guarantees tags up to 32,767 (the
/// standard's least upper bound), and the `local` backend refuses larger ones too, so a tag that
/// works in tests works under `mpirun`.
pub const MAX_TAG: u32 = 32767;

thread_local! {
    static WAITED: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Runs `f`, a blocking communication inside forward or backward (a tensor-parallel all-reduce,
/// a pipeline's receive, a ZeRO-3 gather, an expert all-to-all), adding its wall time to this
/// thread's communication clock ([`waited`]): the communication a strategy could not hide.
pub fn timed<T>(f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let out = f();
    WAITED.with(|w| w.set(w.get() + t.elapsed().as_secs_f64()));
    out
}

/// Seconds this thread has spent in communication run through [`timed`].
pub fn waited() -> f64 {
    WAITED.with(|w| w.get())
}

/// A communicator whose every call, and every wait on what it started, runs through [`timed`]:
/// the groups of the strategies that communicate inside forward and backward are wrapped in it,
/// so a step can report the communication it waited for.
pub struct Timed(pub std::sync::Arc<dyn Communicator>);

impl Timed {
    /// `group`, timed.
    pub fn wrap(group: std::sync::Arc<dyn Communicator>) -> std::sync::Arc<dyn Communicator> {
        std::sync::Arc::new(Timed(group))
    }

    fn handle<T: Send + 'static>(h: Result<Handle<T>>) -> Result<Handle<T>> {
        let h = h?;
        Ok(Handle::new(move || timed(|| h.wait())))
    }
}

impl Communicator for Timed {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn global_rank(&self) -> usize {
        self.0.global_rank()
    }
    fn all_reduce_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        Timed::handle(timed(|| self.0.all_reduce_start(buf, op)))
    }
    fn reduce_scatter_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        Timed::handle(timed(|| self.0.reduce_scatter_start(buf, op)))
    }
    fn all_gather_start(&self, chunk: Vec<f32>) -> Result<Handle<Vec<f32>>> {
        Timed::handle(timed(|| self.0.all_gather_start(chunk)))
    }
    fn broadcast_start(&self, buf: Vec<f32>, root: usize) -> Result<Handle<Vec<f32>>> {
        Timed::handle(timed(|| self.0.broadcast_start(buf, root)))
    }
    fn all_to_all_start(&self, chunks: Vec<Vec<f32>>) -> Result<Handle<Vec<Vec<f32>>>> {
        Timed::handle(timed(|| self.0.all_to_all_start(chunks)))
    }
    fn send(&self, buf: Vec<f32>, to: usize, tag: u32) -> Result<()> {
        timed(|| self.0.send(buf, to, tag))
    }
    fn recv_start(&self, from: usize, tag: u32) -> Result<Handle<Vec<f32>>> {
        Timed::handle(timed(|| self.0.recv_start(from, tag)))
    }
    fn barrier(&self) -> Result<()> {
        timed(|| self.0.barrier())
    }
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(Timed(std::sync::Arc::from(
            self.0.split(color, key)?,
        ))))
    }
}

/// A pending non-blocking operation; [`Handle::wait`] completes it.
#[must_use = "a pending operation completes only when waited on"]
pub struct Handle<T> {
    finish: Box<dyn FnOnce() -> Result<T> + Send>,
}

impl<T> Handle<T> {
    /// A handle that completes with `finish`.
    pub fn new(finish: impl FnOnce() -> Result<T> + Send + 'static) -> Handle<T> {
        Handle {
            finish: Box::new(finish),
        }
    }

    /// Blocks until the operation completes and returns its result.
    pub fn wait(self) -> Result<T> {
        (self.finish)()
    }
}

/// A group of ranks that communicate: the world, or a sub-group made by
/// [`Communicator::split`] (a data-parallel or sharding group of a mesh, say). Buffers are
/// owned `Vec<f32>`s, handed over and given back, so no rank ever sees another's memory.
///
/// Every rank of a group must make the same collective calls in the same order (as with MPI);
/// point-to-point messages are matched by sender and tag, in order.
pub trait Communicator: Send + Sync {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn size(&self) -> usize;

    /// This rank's index in the world (for messages that name it).
    fn global_rank(&self) -> usize;

    /// Starts an all-reduce of `buf` (the same length on every rank): every rank receives the
    /// sum (or mean) of all ranks' buffers.
    fn all_reduce_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>>;

    /// Starts a reduce-scatter: `buf`'s length is the same on every rank and divisible by
    /// `size()`; rank r receives the reduction of every rank's r-th chunk.
    fn reduce_scatter_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>>;

    /// Starts an all-gather: every rank receives the ranks' chunks (of equal length) concatenated
    /// in rank order.
    fn all_gather_start(&self, chunk: Vec<f32>) -> Result<Handle<Vec<f32>>>;

    /// Starts a broadcast of the `root` rank's buffer to every rank (the others' `buf` is
    /// ignored).
    fn broadcast_start(&self, buf: Vec<f32>, root: usize) -> Result<Handle<Vec<f32>>>;

    /// Starts an all-to-all: `chunks[j]` goes to rank j; rank r receives, in rank order, the
    /// r-th chunk of every rank.
    fn all_to_all_start(&self, chunks: Vec<Vec<f32>>) -> Result<Handle<Vec<Vec<f32>>>>;

    /// Sends `buf` to rank `to` with `tag` (at most [`MAX_TAG`]; never blocks: messages are
    /// buffered).
    fn send(&self, buf: Vec<f32>, to: usize, tag: u32) -> Result<()>;

    /// Starts receiving the next message from rank `from` with `tag`.
    fn recv_start(&self, from: usize, tag: u32) -> Result<Handle<Vec<f32>>>;

    /// Waits until every rank of the group has reached the barrier.
    fn barrier(&self) -> Result<()>;

    /// Splits the group (collectively): ranks passing the same `color` form a new group, ordered
    /// by `key` (then by rank). Process groups of a mesh are made this way.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;

    /// All-reduce, blocking.
    fn all_reduce(&self, buf: Vec<f32>, op: Reduce) -> Result<Vec<f32>> {
        self.all_reduce_start(buf, op)?.wait()
    }

    /// Reduce-scatter, blocking.
    fn reduce_scatter(&self, buf: Vec<f32>, op: Reduce) -> Result<Vec<f32>> {
        self.reduce_scatter_start(buf, op)?.wait()
    }

    /// All-gather, blocking.
    fn all_gather(&self, chunk: Vec<f32>) -> Result<Vec<f32>> {
        self.all_gather_start(chunk)?.wait()
    }

    /// Broadcast, blocking.
    fn broadcast(&self, buf: Vec<f32>, root: usize) -> Result<Vec<f32>> {
        self.broadcast_start(buf, root)?.wait()
    }

    /// All-to-all, blocking.
    fn all_to_all(&self, chunks: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        self.all_to_all_start(chunks)?.wait()
    }

    /// Receive, blocking.
    fn recv(&self, from: usize, tag: u32) -> Result<Vec<f32>> {
        self.recv_start(from, tag)?.wait()
    }

    /// [`Communicator::reduce_scatter_start`] with the values sent as bf16 (half the bytes):
    /// each rank's chunks are rounded to bf16 and exchanged by an all-to-all, and each rank adds
    /// the ranks' copies of its chunk in f32, in rank order. Values come back in f32, each the
    /// reduction of bf16-rounded inputs.
    fn reduce_scatter_bf16_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        let n = self.size();
        if !buf.len().is_multiple_of(n) {
            return Err(Error::Invalid {
                op: "reduce_scatter_bf16",
                reason: format!("{} values do not split into {n} equal chunks", buf.len()),
            });
        }
        let chunk = buf.len() / n;
        let parts = (0..n)
            .map(|j| bf16::pack(&buf[j * chunk..(j + 1) * chunk]))
            .collect();
        let exchanged = self.all_to_all_start(parts)?;
        Ok(Handle::new(move || {
            let parts = exchanged
                .wait()?
                .iter()
                .map(|p| bf16::unpack(p, chunk))
                .collect();
            reduce_in_rank_order("reduce_scatter_bf16", parts, op)
        }))
    }

    /// Starts a reduce-scatter of parts of any length: `buf` (the same length on every rank) is
    /// cut into consecutive parts of `counts[j]` values (the same counts on every rank), and
    /// rank j receives the reduction of every rank's j-th part, as f32 or, with `bf16`, sent as
    /// bf16 (half the bytes). Composed as an all-to-all and a sum in rank order, so each value
    /// is the same bits as an all-reduce's. ZeRO-2 reduces gradient buckets this way: a
    /// bucket's parts are where it meets each rank's shard.
    fn reduce_scatter_v_start(
        &self,
        buf: Vec<f32>,
        counts: &[usize],
        op: Reduce,
        bf16: bool,
    ) -> Result<Handle<Vec<f32>>> {
        reduce_scatter_v_by_all_to_all(self, buf, counts, op, bf16)
    }
}

/// Fails unless `counts` has one part per rank of a group of `n` and they add up to `len`.
pub(crate) fn check_counts(counts: &[usize], len: usize, n: usize) -> Result<()> {
    if counts.len() != n || counts.iter().sum::<usize>() != len {
        return Err(Error::Invalid {
            op: "reduce_scatter_v",
            reason: format!(
                "{} counts summing to {} for {len} values on {n} ranks",
                counts.len(),
                counts.iter().sum::<usize>(),
            ),
        });
    }
    Ok(())
}

/// [`Communicator::reduce_scatter_v_start`] from [`Communicator::all_to_all_start`]: the parts
/// (packed to bf16 with `bf16`) exchanged, then added in rank order.
pub(crate) fn reduce_scatter_v_by_all_to_all<C: Communicator + ?Sized>(
    comm: &C,
    mut buf: Vec<f32>,
    counts: &[usize],
    op: Reduce,
    bf16: bool,
) -> Result<Handle<Vec<f32>>> {
    let n = comm.size();
    check_counts(counts, buf.len(), n)?;
    let mine = counts[comm.rank()];
    let mut parts = Vec::with_capacity(n);
    for &c in counts.iter().rev() {
        let tail = buf.split_off(buf.len() - c);
        parts.push(if bf16 { bf16::pack(&tail) } else { tail });
    }
    drop(buf);
    parts.reverse();
    let exchanged = comm.all_to_all_start(parts)?;
    Ok(Handle::new(move || {
        let mut got = exchanged.wait()?;
        if bf16 {
            got = got.iter().map(|p| bf16::unpack(p, mine)).collect();
        }
        reduce_in_rank_order("reduce_scatter_v", got, op)
    }))
}

/// An all-reduce over `group` with the values sent as bf16 (half the bytes of
/// [`Communicator::all_reduce_start`]): a [`Communicator::reduce_scatter_bf16_start`] of even
/// chunks, then an all-gather of the reduced chunks rounded to bf16. Every rank receives the same
/// values. The all-gather is issued when the handle is waited on.
pub fn all_reduce_bf16_start(
    group: &std::sync::Arc<dyn Communicator>,
    mut buf: Vec<f32>,
    op: Reduce,
) -> Result<Handle<Vec<f32>>> {
    let (len, n) = (buf.len(), group.size());
    // Chunks of an even length, so each packs into whole f32 words.
    let chunk = len.div_ceil(n).div_ceil(2) * 2;
    buf.resize(chunk * n, 0.0);
    let scattered = group.reduce_scatter_bf16_start(buf, op)?;
    let group = group.clone();
    Ok(Handle::new(move || {
        let mine = scattered.wait()?;
        let all = group.all_gather(bf16::pack(&mine))?;
        let mut out = bf16::unpack(&all, chunk * n);
        out.truncate(len);
        Ok(out)
    }))
}

/// bf16 payloads: values rounded to bf16 (round to nearest even), two to an f32 word's bits, so
/// they travel through the f32 collectives untouched.
pub mod bf16 {
    /// `values` rounded to bf16 and packed two per word (an odd count is padded with zero).
    pub fn pack(values: &[f32]) -> Vec<f32> {
        let bits = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
        values
            .chunks(2)
            .map(|p| f32::from_bits(bits(p[0]) | bits(p.get(1).copied().unwrap_or(0.0)) << 16))
            .collect()
    }

    /// The first `len` values of packed words, widened to f32.
    pub fn unpack(words: &[f32], len: usize) -> Vec<f32> {
        let half = |b: u32| half::bf16::from_bits(b as u16).to_f32();
        words
            .iter()
            .flat_map(|w| {
                let b = w.to_bits();
                [half(b & 0xffff), half(b >> 16)]
            })
            .take(len)
            .collect()
    }
}
