//! The `mpi` backend: ranks as processes of a job launched by `mpirun` (Open MPI, through the
//! `mpi` crate), one [`Communicator`] per MPI communicator.
//!
//! Every MPI call of a process runs on one communication thread that owns MPI (it initialises and
//! finalises it), taking operations in the order the process starts them. A `*_start` call hands
//! its buffer to that thread and returns at once, so communication runs while the caller
//! computes (the overlap data parallelism needs), and waiting on the handle collects the result.
//!
//! Reductions are composed so that they add the ranks' values in rank order, as the `local`
//! backend does, and give the same bits: an all-reduce is an all-to-all of chunks (each rank
//! receives every rank's copy of its chunk), a reduction of each chunk in rank order, and an
//! all-gather of the reduced chunks. It moves 2(n−1)/n of the buffer per rank, as a ring
//! all-reduce does.
//!
//! Sends are buffered (`MPI_Isend` of a buffer the communication thread keeps until the send
//! completes), so a send never blocks. A receive holds the communication thread until its message
//! arrives: start a receive when its message is due, not ahead of collectives its sender must
//! reach first.
//!
//! Failure: MPI cannot tell the other ranks that one failed, so a failing rank ends the job.
//! [`abort`] calls `MPI_Abort` on the world (every process of the job ends within about a
//! second), and [`abort_on_panic`] installs a panic hook that does so; without it a panic on
//! one rank leaves the others waiting in a collective forever.

use crate::{Communicator, Error, Handle, Reduce, Result};
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::Communicator as _;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Set once MPI is initialised, so [`abort`] knows whether `MPI_Abort` may be called.
static INITIALISED: AtomicBool = AtomicBool::new(false);

/// One operation for the communication thread, on a group.
enum Op {
    AllReduce(Vec<f32>, Reduce),
    /// The buffer, each rank's part of it, and the reduction.
    ReduceScatter(Vec<f32>, Vec<usize>, Reduce),
    AllGather(Vec<f32>),
    Broadcast(Vec<f32>, usize),
    AllToAll(Vec<Vec<f32>>),
    Send(Vec<f32>, usize, u32),
    Recv(usize, u32),
    Barrier,
    Split(usize, usize),
    /// The last handle of a split-off group went: free its MPI communicator.
    Free,
}

/// What an operation gives back.
enum Reply {
    One(Vec<f32>),
    Many(Vec<Vec<f32>>),
    Group { id: usize, rank: usize, size: usize },
    Done,
}

struct Job {
    group: usize,
    op: Op,
    reply: Option<mpsc::Sender<Result<Reply>>>,
}

/// The communication thread: its queue, and its handle to join when the last communicator goes.
struct Service {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        // Closing the queue ends the thread, which finalises MPI.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One rank's communicator of the `mpi` backend: the world from [`init`], or a group split off
/// it. A clone is another handle to the same communicator (operations from both run in the order
/// they start); MPI is finalised when the last handle of the job's communicators is dropped.
#[derive(Clone)]
pub struct MpiComm {
    service: Arc<Service>,
    group: Arc<Group>,
    rank: usize,
    size: usize,
    global_rank: usize,
}

/// A group's id on the communication thread; when its last handle goes, a split-off group's MPI
/// communicator is freed (the world lives until MPI is finalised).
struct Group {
    id: usize,
    service: Arc<Service>,
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.id != 0 {
            if let Some(jobs) = &self.service.jobs {
                let _ = jobs.send(Job {
                    group: self.id,
                    op: Op::Free,
                    reply: None,
                });
            }
        }
    }
}

/// Initialises MPI (on its communication thread) and returns this process's world communicator.
/// MPI is finalised when the world and every group split off it are dropped. Fails when MPI is
/// already initialised or cannot start.
pub fn init() -> Result<MpiComm> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready, started) = mpsc::channel::<Result<(usize, usize)>>();
    let thread = std::thread::Builder::new()
        .name("mpi".into())
        .spawn(move || serve(queue, ready))
        .map_err(|e| {
            invalid(
                "init",
                format!("cannot start the communication thread: {e}"),
            )
        })?;
    let (rank, size) = started
        .recv()
        .map_err(|_| invalid("init", "the communication thread ended during start-up"))??;
    let service = Arc::new(Service {
        jobs: Some(jobs),
        thread: Some(thread),
    });
    Ok(MpiComm {
        group: Arc::new(Group {
            id: 0,
            service: service.clone(),
        }),
        service,
        rank,
        size,
        global_rank: rank,
    })
}

/// Ends every process of the job with `code` (`MPI_Abort` on the world), or this process alone
/// when MPI is not initialised. What a failing rank calls after reporting its error, while it
/// still holds a communicator: a rank that finalises MPI instead would wait for the others, which
/// wait for it.
pub fn abort(code: i32) -> ! {
    if INITIALISED.load(Ordering::SeqCst) {
        SimpleCommunicator::world().abort(code)
    }
    std::process::exit(code)
}

/// Installs a panic hook that reports the panic (through the hook installed before) and then
/// ends the whole job with [`abort`], so a panic on one rank cannot leave the others waiting.
pub fn abort_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        abort(101);
    }));
}

fn invalid(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        op,
        reason: reason.into(),
    }
}

/// A length as an MPI count, or an error for messages beyond MPI's 2³¹ − 1 elements.
fn count(op: &'static str, n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| {
        invalid(
            op,
            format!(
                "{n} values are more than one MPI message holds (2^31 - 1); models of over 2 \
                 billion trained parameters need messages split, which this backend does not do \
                 yet"
            ),
        )
    })
}

/// Counts and displacements of `lens` laid end to end.
fn layout(op: &'static str, lens: &[usize]) -> Result<(Vec<Count>, Vec<Count>)> {
    let counts = lens
        .iter()
        .map(|&n| count(op, n))
        .collect::<Result<Vec<_>>>()?;
    let mut displs = Vec::with_capacity(lens.len());
    let mut at = 0usize;
    for &n in lens {
        displs.push(count(op, at)?);
        at += n;
    }
    Ok((counts, displs))
}

/// The lengths of `len` values cut into `n` chunks as evenly as possible (earlier ones longer).
fn even_chunks(len: usize, n: usize) -> Vec<usize> {
    (0..n).map(|j| len / n + usize::from(j < len % n)).collect()
}

/// A send in flight: MPI reads the leaked buffer until the request completes, then it is freed.
struct PendingSend(mpi::request::Request<'static, [f32]>);

impl PendingSend {
    fn start(comm: &SimpleCommunicator, buf: Vec<f32>, to: usize, tag: u32) -> PendingSend {
        let data: &'static [f32] = Box::leak(buf.into_boxed_slice());
        let request = comm.process_at_rank(to as i32).immediate_send_with_tag(
            mpi::request::StaticScope,
            data,
            tag as i32,
        );
        PendingSend(request)
    }

    /// Frees the buffer of a completed send.
    fn free(data: &'static [f32]) {
        // SAFETY: `data` was leaked from a `Box<[f32]>` in `start`, and its request has
        // completed, so MPI no longer reads it and nothing else refers to it.
        drop(unsafe { Box::from_raw(data as *const [f32] as *mut [f32]) });
    }

    /// Completes the send if it is done; gives it back otherwise.
    fn test(self) -> Option<PendingSend> {
        match self.0.test_with_data() {
            Ok((_, data)) => {
                Self::free(data);
                None
            }
            Err(request) => Some(PendingSend(request)),
        }
    }

    fn wait(self) {
        Self::free(self.0.wait_for_data());
    }
}

/// The communication thread: initialises MPI, runs every job in order, finalises MPI when the
/// queue closes.
fn serve(queue: mpsc::Receiver<Job>, ready: mpsc::Sender<Result<(usize, usize)>>) {
    let Some((universe, threading)) = mpi::initialize_with_threading(mpi::Threading::Multiple)
    else {
        let _ = ready.send(Err(invalid("init", "MPI is already initialised")));
        return;
    };
    INITIALISED.store(true, Ordering::SeqCst);
    if threading != mpi::Threading::Multiple {
        // Every call but `abort` comes from this thread; `abort` may come from another.
        eprintln!(
            "warning: MPI grants {threading:?} threading, not Multiple: ending the job from a \
             failing rank may not work while this rank waits in a collective"
        );
    }
    let world = universe.world();
    let _ = ready.send(Ok((world.rank() as usize, world.size() as usize)));
    let mut groups = vec![Some(world)];
    let mut sends: Vec<PendingSend> = Vec::new();
    while let Ok(job) = queue.recv() {
        let result = execute(&mut groups, &mut sends, job.group, job.op);
        sends = sends.into_iter().filter_map(PendingSend::test).collect();
        if let Some(reply) = job.reply {
            let _ = reply.send(result);
        }
    }
    sends.into_iter().for_each(PendingSend::wait);
    drop(groups);
    INITIALISED.store(false, Ordering::SeqCst);
    drop(universe);
}

fn execute(
    groups: &mut Vec<Option<SimpleCommunicator>>,
    sends: &mut Vec<PendingSend>,
    group: usize,
    op: Op,
) -> Result<Reply> {
    if let Op::Free = op {
        // Dropping a split-off communicator frees it (MPI_Comm_free).
        groups[group] = None;
        return Ok(Reply::Done);
    }
    let comm = groups[group]
        .as_ref()
        .ok_or_else(|| invalid("mpi", "the group was freed"))?;
    let n = comm.size() as usize;
    Ok(match op {
        Op::AllReduce(buf, reduce) => {
            let lens = even_chunks(buf.len(), n);
            let mine = lens[comm.rank() as usize];
            let parts = exchange(comm, "all_reduce", &buf, &lens, &vec![mine; n])?;
            let chunk = crate::reduce_in_rank_order("all_reduce", parts, reduce)?;
            Reply::One(gather(comm, "all_reduce", &chunk, &lens)?)
        }
        Op::ReduceScatter(buf, lens, reduce) => {
            let mine = vec![lens[comm.rank() as usize]; n];
            let parts = exchange(comm, "reduce_scatter", &buf, &lens, &mine)?;
            Reply::One(crate::reduce_in_rank_order(
                "reduce_scatter",
                parts,
                reduce,
            )?)
        }
        Op::AllGather(chunk) => {
            let mut out = vec![0.0f32; chunk.len() * n];
            count("all_gather", out.len())?;
            comm.all_gather_into(&chunk[..], &mut out[..]);
            Reply::One(out)
        }
        Op::Broadcast(mut buf, root) => {
            let root = comm.process_at_rank(root as i32);
            let mut len = [buf.len() as u64];
            root.broadcast_into(&mut len[..]);
            buf.resize(len[0] as usize, 0.0);
            count("broadcast", buf.len())?;
            root.broadcast_into(&mut buf[..]);
            Reply::One(buf)
        }
        Op::AllToAll(chunks) => {
            let lens: Vec<usize> = chunks.iter().map(Vec::len).collect();
            let mut theirs = vec![0u64; n];
            let ours: Vec<u64> = lens.iter().map(|&l| l as u64).collect();
            comm.all_to_all_into(&ours[..], &mut theirs[..]);
            let theirs: Vec<usize> = theirs.iter().map(|&l| l as usize).collect();
            let flat = chunks.concat();
            Reply::Many(exchange(comm, "all_to_all", &flat, &lens, &theirs)?)
        }
        Op::Send(buf, to, tag) => {
            sends.push(PendingSend::start(comm, buf, to, tag));
            Reply::Done
        }
        Op::Recv(from, tag) => {
            let (buf, _) = comm
                .process_at_rank(from as i32)
                .receive_vec_with_tag::<f32>(tag as i32);
            Reply::One(buf)
        }
        Op::Barrier => {
            comm.barrier();
            Reply::Done
        }
        Op::Free => Reply::Done,
        Op::Split(color, key) => {
            let color = Color::with_value(count("split", color)?);
            let sub = comm
                .split_by_color_with_key(color, count("split", key)?)
                .ok_or_else(|| invalid("split", "MPI returned no communicator"))?;
            let (rank, size) = (sub.rank() as usize, sub.size() as usize);
            groups.push(Some(sub));
            Reply::Group {
                id: groups.len() - 1,
                rank,
                size,
            }
        }
    })
}

/// An all-to-all of variable counts: `send` cut into `send_lens` (part j to rank j), and rank i's
/// part of `recv_lens[i]` values received from each; the received parts in rank order.
fn exchange(
    comm: &SimpleCommunicator,
    op: &'static str,
    send: &[f32],
    send_lens: &[usize],
    recv_lens: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let (sc, sd) = layout(op, send_lens)?;
    let (rc, rd) = layout(op, recv_lens)?;
    let mut recv = vec![0.0f32; recv_lens.iter().sum()];
    {
        let out = Partition::new(send, &sc[..], &sd[..]);
        let mut inp = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
        comm.all_to_all_varcount_into(&out, &mut inp);
    }
    let mut parts = Vec::with_capacity(recv_lens.len());
    let mut at = 0;
    for &l in recv_lens {
        parts.push(recv[at..at + l].to_vec());
        at += l;
    }
    Ok(parts)
}

/// An all-gather of variable counts: rank j's `lens[j]` values, concatenated in rank order.
fn gather(
    comm: &SimpleCommunicator,
    op: &'static str,
    mine: &[f32],
    lens: &[usize],
) -> Result<Vec<f32>> {
    let (counts, displs) = layout(op, lens)?;
    let mut out = vec![0.0f32; lens.iter().sum()];
    {
        let mut inp = PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
        comm.all_gather_varcount_into(mine, &mut inp);
    }
    Ok(out)
}

impl MpiComm {
    fn submit(&self, op: Op) -> Result<Handle<Reply>> {
        let (reply, answer) = mpsc::channel();
        self.post(op, Some(reply))?;
        Ok(Handle::new(move || {
            answer
                .recv()
                .map_err(|_| invalid("mpi", "the communication thread ended"))?
        }))
    }

    fn post(&self, op: Op, reply: Option<mpsc::Sender<Result<Reply>>>) -> Result<()> {
        let jobs = self
            .service
            .jobs
            .as_ref()
            .ok_or_else(|| invalid("mpi", "MPI is finalised"))?;
        jobs.send(Job {
            group: self.group.id,
            op,
            reply,
        })
        .map_err(|_| invalid("mpi", "the communication thread ended"))
    }

    fn one(&self, op: Op) -> Result<Handle<Vec<f32>>> {
        let h = self.submit(op)?;
        Ok(Handle::new(move || match h.wait()? {
            Reply::One(v) => Ok(v),
            _ => Err(invalid("mpi", "unexpected reply")),
        }))
    }

    fn check_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if rank < self.size {
            Ok(())
        } else {
            Err(invalid(
                op,
                format!("rank {rank} is not in a group of {}", self.size),
            ))
        }
    }
}

use crate::MAX_TAG;

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn global_rank(&self) -> usize {
        self.global_rank
    }

    fn all_reduce_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        self.one(Op::AllReduce(buf, op))
    }

    fn reduce_scatter_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        if !buf.len().is_multiple_of(self.size) {
            return Err(invalid(
                "reduce_scatter",
                format!(
                    "{} values do not split into {} equal chunks",
                    buf.len(),
                    self.size
                ),
            ));
        }
        let lens = vec![buf.len() / self.size; self.size];
        self.one(Op::ReduceScatter(buf, lens, op))
    }

    /// Parts of any length in one MPI all-to-all (f32; bf16 payloads are packed and exchanged by
    /// [`Communicator::all_to_all_start`]).
    fn reduce_scatter_v_start(
        &self,
        buf: Vec<f32>,
        counts: &[usize],
        op: Reduce,
        bf16: bool,
    ) -> Result<Handle<Vec<f32>>> {
        if bf16 {
            return crate::reduce_scatter_v_by_all_to_all(self, buf, counts, op, bf16);
        }
        crate::check_counts(counts, buf.len(), self.size)?;
        self.one(Op::ReduceScatter(buf, counts.to_vec(), op))
    }

    fn all_gather_start(&self, chunk: Vec<f32>) -> Result<Handle<Vec<f32>>> {
        self.one(Op::AllGather(chunk))
    }

    fn broadcast_start(&self, buf: Vec<f32>, root: usize) -> Result<Handle<Vec<f32>>> {
        self.check_rank("broadcast", root)?;
        self.one(Op::Broadcast(buf, root))
    }

    fn all_to_all_start(&self, chunks: Vec<Vec<f32>>) -> Result<Handle<Vec<Vec<f32>>>> {
        if chunks.len() != self.size {
            return Err(invalid(
                "all_to_all",
                format!("{} chunks for a group of {} ranks", chunks.len(), self.size),
            ));
        }
        let h = self.submit(Op::AllToAll(chunks))?;
        Ok(Handle::new(move || match h.wait()? {
            Reply::Many(v) => Ok(v),
            _ => Err(invalid("mpi", "unexpected reply")),
        }))
    }

    fn send(&self, buf: Vec<f32>, to: usize, tag: u32) -> Result<()> {
        self.check_rank("send", to)?;
        if tag > MAX_TAG {
            return Err(invalid("send", format!("tag {tag} is above {MAX_TAG}")));
        }
        self.post(Op::Send(buf, to, tag), None)
    }

    fn recv_start(&self, from: usize, tag: u32) -> Result<Handle<Vec<f32>>> {
        self.check_rank("recv", from)?;
        if tag > MAX_TAG {
            return Err(invalid("recv", format!("tag {tag} is above {MAX_TAG}")));
        }
        self.one(Op::Recv(from, tag))
    }

    fn barrier(&self) -> Result<()> {
        self.submit(Op::Barrier)?.wait()?;
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        match self.submit(Op::Split(color, key))?.wait()? {
            Reply::Group { id, rank, size } => Ok(Box::new(MpiComm {
                service: self.service.clone(),
                group: Arc::new(Group {
                    id,
                    service: self.service.clone(),
                }),
                rank,
                size,
                global_rank: self.global_rank,
            })),
            _ => Err(invalid("split", "unexpected reply")),
        }
    }
}
