//! Preference data from real conversations: ChatterBot's English corpus, each prompt's human
//! reply preferred over a reply sampled from the chat model, the two matched in length (the
//! model's reply within ±20% of the human one's tokens), so a reward model cannot win by
//! counting tokens.
//!
//! Prompts are split by a hash of their text, so a prompt (ChatterBot repeats many, with
//! different replies) lands in one split only: SFT conversations, reward-model training pairs,
//! its held-out pairs, a second (judge) reward model's pairs, RL prompts and evaluation prompts
//! are disjoint.

use crate::align::policy::ChatPolicy;
use crate::align::prefs::{write_preferences, PreferencePair};
use anneal_data::dialogue::read_chatterbot;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Where a prompt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ChatSplit {
    /// Supervised fine-tuning on the human reply (2 in 10).
    Sft,
    /// The reward model's training pairs (2 in 10).
    RewardTrain,
    /// The reward model's held-out pairs (1 in 10).
    RewardTest,
    /// The judge's training pairs: a second reward model, for win rates (2 in 10).
    Judge,
    /// RL prompts (2 in 10).
    Rl,
    /// Evaluation prompts (1 in 10).
    Eval,
}

impl ChatSplit {
    /// Every split with its file name.
    pub const ALL: [(ChatSplit, &'static str); 6] = [
        (ChatSplit::Sft, "sft.jsonl"),
        (ChatSplit::RewardTrain, "rm-train.jsonl"),
        (ChatSplit::RewardTest, "rm-test.jsonl"),
        (ChatSplit::Judge, "judge-train.jsonl"),
        (ChatSplit::Rl, "rl-prompts.jsonl"),
        (ChatSplit::Eval, "eval-prompts.jsonl"),
    ];

    /// The split of `prompt`: FNV-1a of its text, modulo 10.
    pub fn of(prompt: &str) -> ChatSplit {
        let h = prompt.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        match h % 10 {
            0 | 1 => ChatSplit::Sft,
            2 | 3 => ChatSplit::RewardTrain,
            4 => ChatSplit::RewardTest,
            5 | 6 => ChatSplit::Judge,
            7 | 8 => ChatSplit::Rl,
            _ => ChatSplit::Eval,
        }
    }

    fn pairs(self) -> bool {
        matches!(
            self,
            ChatSplit::RewardTrain | ChatSplit::RewardTest | ChatSplit::Judge
        )
    }
}

/// What building the chat data found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatDataReport {
    /// Conversations read (first user turn and its reply each).
    pub conversations: usize,
    /// Records written per file.
    pub written: Vec<(String, usize)>,
    /// Prompts dropped because the human reply is shorter than the minimum.
    pub short: usize,
    /// Pairs dropped because no sampled reply came within ±20% of the human reply's length.
    pub unmatched: usize,
    /// Kept model replies that were cut at the length limit rather than ended by the model.
    pub truncated: usize,
    /// Malformed conversations or files skipped.
    pub skipped: usize,
}

/// Builds the splits from the ChatterBot corpus at `corpus` into `out`: `min_tokens` is the
/// shortest human reply kept (in the model's tokens), `tries` the samples drawn per prompt to
/// find a length-matched reply, `batch` the prompts sampled at once.
pub fn build(
    policy: &ChatPolicy,
    corpus: &Path,
    out: &Path,
    min_tokens: usize,
    tries: usize,
    batch: usize,
    seed: u64,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<ChatDataReport> {
    let (convs, read) = read_chatterbot(corpus)?;
    let mut report = ChatDataReport {
        conversations: convs.len(),
        skipped: read.bad_files.len() + read.bad_conversations.len(),
        ..ChatDataReport::default()
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut by_split: Vec<Vec<(String, String)>> = vec![Vec::new(); ChatSplit::ALL.len()];
    for c in &convs {
        let (prompt, reply) = (c.turns[0].trim(), c.turns[1].trim());
        if prompt.is_empty() || reply.is_empty() {
            report.skipped += 1;
            continue;
        }
        let n = policy.lm.tokenizer.encode(reply)?.len();
        if n < min_tokens {
            report.short += 1;
            continue;
        }
        let s = ChatSplit::of(prompt);
        let k = ChatSplit::ALL
            .iter()
            .position(|(x, _)| *x == s)
            .unwrap_or(0);
        by_split[k].push((prompt.to_string(), reply.to_string()));
    }
    let total_pairs: usize = ChatSplit::ALL
        .iter()
        .zip(&by_split)
        .filter(|((s, _), _)| s.pairs())
        .map(|(_, v)| v.len())
        .sum();
    let mut done = 0;
    for ((split, name), items) in ChatSplit::ALL.iter().zip(&by_split) {
        let path = out.join(name);
        if split.pairs() {
            let mut pairs = Vec::new();
            for chunk in items.chunks(batch.max(1)) {
                let (found, truncated) = matched_replies(policy, chunk, tries, seed + done as u64)?;
                for ((prompt, human), model) in chunk.iter().zip(found) {
                    match model {
                        Some(m) if m != *human => pairs.push(PreferencePair {
                            prompt: prompt.clone(),
                            chosen: human.clone(),
                            rejected: m,
                        }),
                        _ => report.unmatched += 1,
                    }
                }
                report.truncated += truncated;
                done += chunk.len();
                on_progress(done, total_pairs);
            }
            write_preferences(&path, &pairs)?;
            report.written.push((name.to_string(), pairs.len()));
        } else {
            let mut text = String::new();
            for (prompt, reply) in items {
                let line = match split {
                    ChatSplit::Sft => serde_json::json!({"prompt": prompt, "reply": reply}),
                    _ => serde_json::json!({"prompt": prompt, "reference": reply}),
                };
                text.push_str(&line.to_string());
                text.push('\n');
            }
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            report.written.push((name.to_string(), items.len()));
        }
    }
    Ok(report)
}

/// For each `(prompt, human reply)`, a reply sampled from the model (temperature 1) whose token
/// count is within ±20% of the human reply's, from up to `tries` draws (`None` if none was):
/// a reply the model ended itself, or on the last draw one cut at the limit; and how many of
/// those kept were cut.
fn matched_replies(
    policy: &ChatPolicy,
    items: &[(String, String)],
    tries: usize,
    seed: u64,
) -> Result<(Vec<Option<String>>, usize)> {
    let mut found: Vec<Option<String>> = vec![None; items.len()];
    let mut truncated = 0;
    let lengths = items
        .iter()
        .map(|(_, h)| Ok(policy.lm.tokenizer.encode(h)?.len()))
        .collect::<Result<Vec<usize>>>()?;
    let prompts = items
        .iter()
        .map(|(p, _)| policy.prompt_ids(p))
        .collect::<Result<Vec<_>>>()?;
    for t in 0..tries {
        let open: Vec<usize> = (0..items.len()).filter(|&i| found[i].is_none()).collect();
        if open.is_empty() {
            break;
        }
        let max = open
            .iter()
            .map(|&i| (lengths[i] as f64 * 1.2).floor() as usize)
            .max()
            .unwrap_or(1)
            .max(1);
        let batch: Vec<Vec<u32>> = open.iter().map(|&i| prompts[i].clone()).collect();
        let replies = anneal_tensor::no_grad(|| {
            policy.sample(
                &batch,
                1.0,
                max,
                seed.wrapping_mul(31).wrapping_add(t as u64),
            )
        })?;
        for (&i, r) in open.iter().zip(&replies) {
            let ended = r.last().is_some_and(|t| policy.lm.stop_tokens.contains(t));
            let body = if ended { &r[..r.len() - 1] } else { &r[..] };
            let limit = (lengths[i] as f64 * 1.2).floor() as usize;
            let (lo, hi) = ((lengths[i] as f64 * 0.8).ceil() as usize, limit);
            // A row may run past its own limit while longer ones in the batch go on: cut it.
            let (body, cut) = if body.len() > hi {
                (&body[..hi], true)
            } else {
                (body, !ended)
            };
            // Complete replies are preferred: a cut one is taken only on the last draw.
            if cut && t + 1 < tries {
                continue;
            }
            if body.len() >= lo && !body.is_empty() {
                let text = policy.lm.tokenizer.decode(body)?.trim().to_string();
                if !text.is_empty() {
                    found[i] = Some(text);
                    truncated += usize::from(cut);
                }
            }
        }
    }
    Ok((found, truncated))
}
