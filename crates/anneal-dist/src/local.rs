//! The `local` backend: ranks as threads of one process ([`run`]), exchanging owned buffers
//! through one shared mailbox. Messages are buffered, so a send never blocks and a collective
//! posts its contributions when it starts; its handle collects and reduces them, adding the
//! ranks' values in rank order (bitwise identical on every rank, and between an all-reduce and
//! a reduce-scatter of the same data).
//!
//! When a rank's function returns an error or panics, the world is marked failed and every
//! rank waiting for a message wakes with [`Error::PeerFailed`]; a rank that returns while
//! another still waits for its message ends that wait with an error too, so a job never hangs.

use crate::{Communicator, Error, Handle, Reduce, Result};
use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Which conversation a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Channel {
    /// Point-to-point messages of a group, by tag.
    Direct { group: u64, tag: u32 },
    /// The `seq`-th collective of a group.
    Collective { group: u64, seq: u64 },
}

/// A message's address: channel, sending and receiving global ranks.
type Address = (Channel, usize, usize);

#[derive(Default)]
struct Mail {
    boxes: HashMap<Address, VecDeque<Vec<f32>>>,
    /// The first rank that failed, and its error.
    failed: Option<(usize, String)>,
    /// Ranks whose function has returned.
    exited: Vec<bool>,
}

struct World {
    mail: Mutex<Mail>,
    arrived: Condvar,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, Mail> {
        self.mail.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn post(&self, address: Address, buf: Vec<f32>) {
        self.lock().boxes.entry(address).or_default().push_back(buf);
        self.arrived.notify_all();
    }

    /// The next message at `address`, waiting for it; an error once the world has failed or
    /// the sender has returned without sending it.
    fn take(&self, address: Address) -> Result<Vec<f32>> {
        let mut mail = self.lock();
        loop {
            if let std::collections::hash_map::Entry::Occupied(mut queue) =
                mail.boxes.entry(address)
            {
                let buf = queue.get_mut().pop_front();
                // An emptied queue goes: collectives never reuse an address, so keeping it would
                // grow the mailbox by every collective a long run makes.
                if queue.get().is_empty() {
                    queue.remove();
                }
                if let Some(buf) = buf {
                    return Ok(buf);
                }
            }
            if let Some((rank, reason)) = &mail.failed {
                return Err(Error::PeerFailed {
                    rank: *rank,
                    reason: reason.clone(),
                });
            }
            let from = address.1;
            if mail.exited[from] {
                // The rank that returned early is the cause: recorded as the job's failure, so
                // the job's error names it rather than the rank left waiting.
                let reason = "returned without sending a message another rank waits for";
                if mail.failed.is_none() {
                    mail.failed = Some((from, reason.into()));
                }
                self.arrived.notify_all();
                return Err(Error::PeerFailed {
                    rank: from,
                    reason: reason.into(),
                });
            }
            mail = self.arrived.wait(mail).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fail(&self, rank: usize, reason: String) {
        let mut mail = self.lock();
        if mail.failed.is_none() {
            mail.failed = Some((rank, reason));
        }
        drop(mail);
        self.arrived.notify_all();
    }

    fn exit(&self, rank: usize) {
        self.lock().exited[rank] = true;
        self.arrived.notify_all();
    }
}

/// One rank's communicator of the local backend: the world from [`run`], or a group split off
/// it.
pub struct LocalComm {
    world: Arc<World>,
    group: u64,
    /// The group's members as global ranks, in group order.
    members: Arc<Vec<usize>>,
    rank: usize,
    /// Collectives started on this group so far (the same count on every member).
    seq: std::sync::atomic::AtomicU64,
}

/// A 64-bit mix (SplitMix64's finaliser, Steele et al. 2014) for deriving group ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl LocalComm {
    fn me(&self) -> usize {
        self.members[self.rank]
    }

    fn next_channel(&self) -> Channel {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Channel::Collective {
            group: self.group,
            seq,
        }
    }

    fn check_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if rank < self.size() {
            Ok(())
        } else {
            Err(Error::Invalid {
                op,
                reason: format!("rank {rank} is not in a group of {}", self.size()),
            })
        }
    }

    /// Posts `parts[j]` to member j (keeping its own part), and returns a handle that gathers
    /// every member's part for this rank, in rank order.
    fn exchange(&self, mut parts: Vec<Vec<f32>>) -> Handle<Vec<Vec<f32>>> {
        let channel = self.next_channel();
        let me = self.me();
        let own = std::mem::take(&mut parts[self.rank]);
        for (j, part) in parts.into_iter().enumerate() {
            if j != self.rank {
                self.world.post((channel, me, self.members[j]), part);
            }
        }
        let (world, members, rank) = (self.world.clone(), self.members.clone(), self.rank);
        Handle::new(move || {
            let mut own = Some(own);
            members
                .iter()
                .enumerate()
                .map(|(i, &from)| {
                    if i == rank {
                        Ok(own.take().expect("own part taken once"))
                    } else {
                        world.take((channel, from, me))
                    }
                })
                .collect()
        })
    }

    /// A handle reducing the gathered parts of `exchange` in rank order.
    fn reduce(&self, op_name: &'static str, parts: Vec<Vec<f32>>, op: Reduce) -> Handle<Vec<f32>> {
        let gathered = self.exchange(parts);
        Handle::new(move || crate::reduce_in_rank_order(op_name, gathered.wait()?, op))
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn global_rank(&self) -> usize {
        self.me()
    }

    fn all_reduce_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        let parts = vec![buf; self.size()];
        Ok(self.reduce("all_reduce", parts, op))
    }

    fn reduce_scatter_start(&self, buf: Vec<f32>, op: Reduce) -> Result<Handle<Vec<f32>>> {
        let n = self.size();
        if !buf.len().is_multiple_of(n) {
            return Err(Error::Invalid {
                op: "reduce_scatter",
                reason: format!("{} values do not split into {n} equal chunks", buf.len()),
            });
        }
        let chunk = buf.len() / n;
        let parts = buf.chunks(chunk.max(1)).map(<[f32]>::to_vec).collect();
        let parts = if chunk == 0 {
            vec![Vec::new(); n]
        } else {
            parts
        };
        Ok(self.reduce("reduce_scatter", parts, op))
    }

    fn all_gather_start(&self, chunk: Vec<f32>) -> Result<Handle<Vec<f32>>> {
        let gathered = self.exchange(vec![chunk; self.size()]);
        Ok(Handle::new(move || {
            let parts = gathered.wait()?;
            if let Some(i) = parts.iter().position(|p| p.len() != parts[0].len()) {
                return Err(Error::Invalid {
                    op: "all_gather",
                    reason: format!(
                        "rank {i} contributed {} values, rank 0 {}",
                        parts[i].len(),
                        parts[0].len()
                    ),
                });
            }
            Ok(parts.concat())
        }))
    }

    fn broadcast_start(&self, buf: Vec<f32>, root: usize) -> Result<Handle<Vec<f32>>> {
        self.check_rank("broadcast", root)?;
        let n = self.size();
        let parts = if self.rank == root {
            vec![buf; n]
        } else {
            vec![Vec::new(); n]
        };
        let gathered = self.exchange(parts);
        Ok(Handle::new(move || {
            Ok(std::mem::take(&mut gathered.wait()?[root]))
        }))
    }

    fn all_to_all_start(&self, chunks: Vec<Vec<f32>>) -> Result<Handle<Vec<Vec<f32>>>> {
        if chunks.len() != self.size() {
            return Err(Error::Invalid {
                op: "all_to_all",
                reason: format!(
                    "{} chunks for a group of {} ranks",
                    chunks.len(),
                    self.size()
                ),
            });
        }
        Ok(self.exchange(chunks))
    }

    fn send(&self, buf: Vec<f32>, to: usize, tag: u32) -> Result<()> {
        self.check_rank("send", to)?;
        check_tag("send", tag)?;
        let channel = Channel::Direct {
            group: self.group,
            tag,
        };
        self.world.post((channel, self.me(), self.members[to]), buf);
        Ok(())
    }

    fn recv_start(&self, from: usize, tag: u32) -> Result<Handle<Vec<f32>>> {
        self.check_rank("recv", from)?;
        check_tag("recv", tag)?;
        let channel = Channel::Direct {
            group: self.group,
            tag,
        };
        let (world, from, me) = (self.world.clone(), self.members[from], self.me());
        Ok(Handle::new(move || world.take((channel, from, me))))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(vec![Vec::new(); self.size()]).wait()?;
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let mine = crate::words_to_f32([color as u64, key as u64]);
        let seq = self.seq.load(std::sync::atomic::Ordering::Relaxed);
        let all = self.exchange(vec![mine; self.size()]).wait()?;
        let word = |p: &[f32], i: usize| crate::f32_to_words(p).nth(i).expect("two words");
        let mut same: Vec<(u64, usize)> = all
            .iter()
            .enumerate()
            .filter(|(_, p)| word(p, 0) == color as u64)
            .map(|(i, p)| (word(p, 1), i))
            .collect();
        same.sort();
        let members: Vec<usize> = same.iter().map(|&(_, i)| self.members[i]).collect();
        let rank = same
            .iter()
            .position(|&(_, i)| i == self.rank)
            .expect("a rank is in its own color");
        Ok(Box::new(LocalComm {
            world: self.world.clone(),
            group: mix(self.group ^ mix(seq ^ mix(color as u64 + 1))),
            members: Arc::new(members),
            rank,
            seq: Default::default(),
        }))
    }
}

/// Runs `f` on `ranks` threads, each with its rank's world communicator, and returns their
/// results in rank order. When any rank returns an error or panics, the others' communication
/// fails with [`Error::PeerFailed`], and the result is that first failure (its rank and error).
pub fn run<T, E, F>(ranks: usize, f: F) -> Result<Vec<T>>
where
    T: Send,
    E: Display,
    F: Fn(LocalComm) -> std::result::Result<T, E> + Sync,
{
    if ranks == 0 {
        return Err(Error::Invalid {
            op: "local::run",
            reason: "at least one rank".into(),
        });
    }
    let world = Arc::new(World {
        mail: Mutex::new(Mail {
            exited: vec![false; ranks],
            ..Default::default()
        }),
        arrived: Condvar::new(),
    });
    let members = Arc::new((0..ranks).collect::<Vec<_>>());
    let results: Vec<Option<T>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..ranks)
            .map(|rank| {
                let comm = LocalComm {
                    world: world.clone(),
                    group: 0,
                    members: members.clone(),
                    rank,
                    seq: Default::default(),
                };
                let (world, f) = (world.clone(), &f);
                std::thread::Builder::new()
                    .name(format!("rank {rank}"))
                    .spawn_scoped(scope, move || {
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
                        let result = match outcome {
                            Ok(Ok(value)) => Some(value),
                            Ok(Err(e)) => {
                                world.fail(rank, e.to_string());
                                None
                            }
                            Err(panic) => {
                                let reason = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "panicked".into());
                                world.fail(rank, format!("panicked: {reason}"));
                                None
                            }
                        };
                        world.exit(rank);
                        result
                    })
                    .expect("a rank's thread starts")
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or(None))
            .collect()
    });
    if let Some((rank, reason)) = world.lock().failed.clone() {
        return Err(Error::PeerFailed { rank, reason });
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every rank returned"))
        .collect())
}

/// Fails for a tag above [`crate::MAX_TAG`], as MPI would.
fn check_tag(op: &'static str, tag: u32) -> Result<()> {
    if tag > crate::MAX_TAG {
        return Err(Error::Invalid {
            op,
            reason: format!("tag {tag} is above {}", crate::MAX_TAG),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Values that differ by rank and do not add exactly in f32.
    fn values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((rank * 7919 + i * 104_729) % 1000) as f32 / 7.0 + 1e-3 * rank as f32)
            .collect()
    }

    #[test]
    fn the_mailbox_does_not_grow_with_the_collectives_a_run_makes() {
        let left = run(3, |c| {
            for _ in 0..500 {
                c.all_reduce(vec![1.0; 4], Reduce::Sum)?;
            }
            c.barrier()?;
            c.barrier()?;
            Ok::<_, Error>(c.world.lock().boxes.len())
        })
        .unwrap();
        // At most the last barrier's messages are still in flight.
        assert!(left.iter().all(|&n| n <= 6), "{left:?}");
    }

    #[test]
    fn bf16_reductions_move_half_the_bytes_and_round_once_each_way() {
        let round = |v: &[f32]| crate::bf16::unpack(&crate::bf16::pack(v), v.len());
        for ranks in 1..=4 {
            // 11 values: chunks are padded to whole packed words.
            let out = run(ranks, |c| {
                let group: Arc<dyn Communicator> = Arc::new(c);
                crate::all_reduce_bf16_start(&group, values(group.rank(), 11), Reduce::Mean)?.wait()
            })
            .unwrap();
            // The mean in f32 of the bf16-rounded values, rounded to bf16 again.
            let mut sum = round(&values(0, 11));
            for r in 1..ranks {
                for (s, v) in sum.iter_mut().zip(round(&values(r, 11))) {
                    *s += v;
                }
            }
            let want = round(&sum.iter().map(|s| s / ranks as f32).collect::<Vec<_>>());
            for got in &out {
                assert_eq!(got, &want, "{ranks} ranks");
            }
        }
        assert_eq!(crate::bf16::pack(&[1.0, 2.0, 3.0]).len(), 2);
        assert_eq!(
            crate::bf16::unpack(&crate::bf16::pack(&[1.5, -2.0, 3.0]), 3),
            vec![1.5, -2.0, 3.0]
        );
    }

    #[test]
    fn all_reduce_adds_in_rank_order_on_every_rank() {
        for ranks in 1..=4 {
            let out = run(ranks, |c| c.all_reduce(values(c.rank(), 10), Reduce::Sum)).unwrap();
            let mut want = values(0, 10);
            for r in 1..ranks {
                for (w, v) in want.iter_mut().zip(values(r, 10)) {
                    *w += v;
                }
            }
            for o in &out {
                assert_eq!(o, &want, "{ranks} ranks");
            }
            let mean = run(ranks, |c| c.all_reduce(values(c.rank(), 10), Reduce::Mean)).unwrap();
            let want_mean: Vec<f32> = want.iter().map(|w| w / ranks as f32).collect();
            assert_eq!(mean[0], want_mean);
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_the_all_reduce_bitwise() {
        let out = run(4, |c| {
            let full = c.all_reduce(values(c.rank(), 12), Reduce::Sum)?;
            let mine = c.reduce_scatter(values(c.rank(), 12), Reduce::Sum)?;
            assert_eq!(mine.len(), 3);
            let gathered = c.all_gather(mine)?;
            Ok::<_, Error>((full, gathered))
        })
        .unwrap();
        for (full, gathered) in out {
            assert_eq!(
                full.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                gathered.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn reduce_scatter_of_uneven_parts_is_the_all_reduce_bitwise() {
        // Parts of 5, 0, 4 and 3 values: each rank gets its part of the all-reduce, same bits,
        // sent as f32; sent as bf16, the reduction of the bf16-rounded values.
        let counts = [5, 0, 4, 3];
        let out = run(4, |c| {
            let full = c.all_reduce(values(c.rank(), 12), Reduce::Mean)?;
            let mine = c
                .reduce_scatter_v_start(values(c.rank(), 12), &counts, Reduce::Mean, false)?
                .wait()?;
            let half = c
                .reduce_scatter_v_start(values(c.rank(), 12), &counts, Reduce::Sum, true)?
                .wait()?;
            let bad = c.reduce_scatter_v_start(values(c.rank(), 12), &[6, 6], Reduce::Sum, false);
            assert!(matches!(bad, Err(Error::Invalid { .. })));
            Ok::<_, Error>((c.rank(), full, mine, half))
        })
        .unwrap();
        for (rank, full, mine, half) in out {
            let start: usize = counts[..rank].iter().sum();
            let want = &full[start..start + counts[rank]];
            assert_eq!(
                mine.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let rounded = |r: usize, i: usize| half::bf16::from_f32(values(r, 12)[i]).to_f32();
            for (k, got) in half.iter().enumerate() {
                let i = start + k;
                let sum = (0..4).fold(0.0f32, |s, r| s + rounded(r, i));
                assert_eq!(got.to_bits(), sum.to_bits(), "rank {rank} value {k}");
            }
        }
    }

    #[test]
    fn broadcast_all_to_all_and_point_to_point() {
        let out = run(3, |c| {
            let b = c.broadcast(vec![c.rank() as f32; 2], 1)?;
            let chunks = (0..3).map(|j| vec![(10 * c.rank() + j) as f32]).collect();
            let a2a = c.all_to_all(chunks)?;
            // A ring: each rank sends to the next, two tagged messages, received out of order.
            let next = (c.rank() + 1) % 3;
            c.send(vec![1.0, c.rank() as f32], next, 7)?;
            c.send(vec![2.0, c.rank() as f32], next, 9)?;
            let prev = (c.rank() + 2) % 3;
            let second = c.recv(prev, 9)?;
            let first = c.recv(prev, 7)?;
            c.barrier()?;
            Ok::<_, Error>((b, a2a, first, second))
        })
        .unwrap();
        for (r, (b, a2a, first, second)) in out.into_iter().enumerate() {
            assert_eq!(b, [1.0, 1.0]);
            let want: Vec<Vec<f32>> = (0..3).map(|i| vec![(10 * i + r) as f32]).collect();
            assert_eq!(a2a, want);
            let prev = ((r + 2) % 3) as f32;
            assert_eq!((first, second), (vec![1.0, prev], vec![2.0, prev]));
        }
    }

    #[test]
    fn pending_collectives_complete_in_any_order() {
        let out = run(2, |c| {
            let a = c.all_reduce_start(vec![c.rank() as f32 + 1.0], Reduce::Sum)?;
            let b = c.all_gather_start(vec![c.rank() as f32])?;
            let gathered = b.wait()?;
            let summed = a.wait()?;
            Ok::<_, Error>((summed, gathered))
        })
        .unwrap();
        assert!(out.iter().all(|(s, g)| s == &[3.0] && g == &[0.0, 1.0]));
    }

    #[test]
    fn split_makes_the_groups_of_a_mesh() {
        // 4 ranks as 2 data-parallel replicas × 2 shards: shard groups {0,1} and {2,3},
        // replica groups {0,2} and {1,3}.
        let out = run(4, |c| {
            let r = c.rank();
            let shard = c.split(r / 2, r)?;
            let replica = c.split(r % 2, r)?;
            let s = shard.all_reduce(vec![r as f32], Reduce::Sum)?;
            let d = replica.all_reduce(vec![r as f32], Reduce::Sum)?;
            Ok::<_, Error>((shard.rank(), shard.size(), s[0], replica.rank(), d[0]))
        })
        .unwrap();
        assert_eq!(out[0], (0, 2, 1.0, 0, 2.0));
        assert_eq!(out[1], (1, 2, 1.0, 0, 4.0));
        assert_eq!(out[2], (0, 2, 5.0, 1, 2.0));
        assert_eq!(out[3], (1, 2, 5.0, 1, 4.0));
        // A key orders the new group: reversed keys reverse the ranks.
        let out = run(3, |c| {
            let g = c.split(0, 10 - c.rank())?;
            g.all_gather(vec![c.rank() as f32])
        })
        .unwrap();
        assert_eq!(out[0], [2.0, 1.0, 0.0]);
    }

    #[test]
    fn a_failing_or_panicking_rank_ends_every_rank_with_its_error() {
        for panics in [false, true] {
            let started = Instant::now();
            let err = run(4, |c| {
                if c.rank() == 2 {
                    std::thread::sleep(Duration::from_millis(50));
                    if panics {
                        panic!("out of memory on rank 2");
                    }
                    return Err("out of memory on rank 2".to_string());
                }
                // The others wait in a collective rank 2 never joins.
                c.all_reduce(vec![1.0], Reduce::Sum)
                    .map_err(|e| e.to_string())
            })
            .unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2));
            match err {
                Error::PeerFailed { rank, reason } => {
                    assert_eq!(rank, 2);
                    assert!(reason.contains("out of memory on rank 2"), "{reason}");
                }
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn a_rank_that_returns_early_does_not_hang_the_others() {
        let err = run(2, |c| {
            if c.rank() == 1 {
                return Ok(vec![]);
            }
            c.all_reduce(vec![1.0], Reduce::Sum)
        })
        .unwrap_err();
        // The rank that returned early is the one named, not the one left waiting.
        assert!(
            matches!(&err, Error::PeerFailed { rank: 1, reason } if reason.contains("returned")),
            "{err}"
        );
    }

    #[test]
    fn mismatched_calls_are_named() {
        let err = run(3, |c| c.reduce_scatter(vec![0.0; 4], Reduce::Sum)).unwrap_err();
        assert!(err.to_string().contains("do not split into 3"), "{err}");
        let err = run(2, |c| c.all_reduce(vec![0.0; 2 + c.rank()], Reduce::Sum)).unwrap_err();
        assert!(
            err.to_string().contains("rank 1 contributed 3 values"),
            "{err}"
        );
        let err = run(2, |c| c.send(vec![], 5, 0)).unwrap_err();
        assert!(
            err.to_string().contains("rank 5 is not in a group of 2"),
            "{err}"
        );
    }
}
