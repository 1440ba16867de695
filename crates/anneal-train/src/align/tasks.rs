//! Verifiable tasks: problems generated with their answers, so a reply's reward is exact (1 for
//! the right final answer, 0 otherwise) and no human rating is needed. Three kinds:
//! arithmetic word problems, unit conversions and sorting a list.
//!
//! Held-out problems are new in both numbers and wording: training problems draw every number
//! from the values that are not 3 modulo 4 and use the first templates of each kind; held-out
//! problems draw every number from the values that are 3 modulo 4 and use templates training
//! never saw. A model that scores on held-out problems has learnt the task, not the examples.

use anneal_tensor::Rng;

/// A kind of verifiable task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Two-number word problems: sums, differences and products.
    Arithmetic,
    /// Whole-number conversions between units (kilometres to metres, hours to minutes …).
    Units,
    /// Sorting three to five numbers in ascending order.
    Sorting,
}

impl TaskKind {
    /// Every kind, by its name.
    pub const ALL: [(&'static str, TaskKind); 3] = [
        ("arithmetic", TaskKind::Arithmetic),
        ("units", TaskKind::Units),
        ("sorting", TaskKind::Sorting),
    ];

    /// The kind's name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

/// Which problems to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training numbers (not 3 modulo 4) and templates.
    Train,
    /// Numbers that are 3 modulo 4 and templates training never uses.
    HeldOut,
}

/// One problem with its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Its kind.
    pub kind: TaskKind,
    /// The question as the model sees it.
    pub prompt: String,
    /// The exact final answer ("42", or "3, 8, 15" for a sorted list).
    pub answer: String,
    /// Which template worded it (`usize::MAX` for a problem read back from JSONL).
    pub template: usize,
}

impl Problem {
    /// A correct reply in the form the rewards read: the answer at the end.
    pub fn gold_reply(&self) -> String {
        format!("The answer is {}.", self.answer)
    }

    /// 1 when `reply`'s final answer is this problem's, else 0.
    pub fn reward(&self, reply: &str) -> f32 {
        let got = match self.kind {
            TaskKind::Sorting => final_list(reply),
            _ => final_number(reply),
        };
        f32::from(got.as_deref() == Some(self.answer.as_str()))
    }
}

const ARITHMETIC: [&str; 6] = [
    "Anna has {a} apples and buys {b} more. How many apples does she have now?",
    "A train carries {a} passengers. At the next stop {b} more get on. How many passengers are on the train?",
    "A shop had {a} books and sold {b} of them. How many books are left?",
    "Each box holds {a} pens. How many pens are in {b} boxes?",
    // Held out: wordings training never sees.
    "A farmer plants {a} rows of trees with {b} trees in each row. How many trees did he plant?",
    "There were {a} birds on a roof. Then {b} flew away. How many birds are still on the roof?",
];

/// The operation of each arithmetic template.
const ARITHMETIC_OP: [char; 6] = ['+', '+', '-', '*', '*', '-'];

const UNITS: [(&str, &str, u32, &str); 6] = [
    (
        "kilometres",
        "metres",
        1000,
        "How many {to} are in {a} {from}?",
    ),
    ("hours", "minutes", 60, "How many {to} are in {a} {from}?"),
    ("kilograms", "grams", 1000, "Convert {a} {from} to {to}."),
    ("minutes", "seconds", 60, "Convert {a} {from} to {to}."),
    // Held out.
    (
        "days",
        "hours",
        24,
        "A trip lasts {a} {from}. How long is it in {to}?",
    ),
    (
        "metres",
        "centimetres",
        100,
        "A rope is {a} {from} long. What is its length in {to}?",
    ),
];

const SORTING: [&str; 4] = [
    "Sort these numbers from smallest to largest: {list}.",
    "Put in ascending order: {list}.",
    // Held out.
    "Arrange {list} in increasing order.",
    "List {list} from the lowest to the highest.",
];

/// Templates of each kind training uses; the rest are held out.
fn train_templates(kind: TaskKind) -> usize {
    match kind {
        TaskKind::Arithmetic | TaskKind::Units => 4,
        TaskKind::Sorting => 2,
    }
}

fn templates(kind: TaskKind) -> usize {
    match kind {
        TaskKind::Arithmetic => ARITHMETIC.len(),
        TaskKind::Units => UNITS.len(),
        TaskKind::Sorting => SORTING.len(),
    }
}

/// A number in `lo..=hi` from `split`'s numbers.
fn number(rng: &mut Rng, split: Split, lo: u64, hi: u64) -> u64 {
    loop {
        let n = lo + rng.next_u64() % (hi - lo + 1);
        if (n % 4 == 3) == (split == Split::HeldOut) {
            return n;
        }
    }
}

/// `n` problems of `kind` from `split`, drawn from `seed`.
pub fn generate(kind: TaskKind, split: Split, n: usize, seed: u64) -> Vec<Problem> {
    let mut rng = Rng::new(seed ^ (kind as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (first, count) = match split {
        Split::Train => (0, train_templates(kind)),
        Split::HeldOut => (
            train_templates(kind),
            templates(kind) - train_templates(kind),
        ),
    };
    (0..n)
        .map(|_| {
            let template = first + (rng.next_u64() % count as u64) as usize;
            problem(kind, template, split, &mut rng)
        })
        .collect()
}

fn problem(kind: TaskKind, template: usize, split: Split, rng: &mut Rng) -> Problem {
    let (prompt, answer) = match kind {
        TaskKind::Arithmetic => {
            let op = ARITHMETIC_OP[template];
            let (a, b) = match op {
                '*' => (number(rng, split, 2, 40), number(rng, split, 2, 40)),
                _ => (number(rng, split, 10, 99), number(rng, split, 2, 49)),
            };
            // Differences stay positive: the larger number first.
            let (a, b) = if op == '-' && b > a { (b, a) } else { (a, b) };
            let answer = match op {
                '+' => a + b,
                '-' => a - b,
                _ => a * b,
            };
            let text = ARITHMETIC[template]
                .replace("{a}", &a.to_string())
                .replace("{b}", &b.to_string());
            (text, answer.to_string())
        }
        TaskKind::Units => {
            let (from, to, factor, text) = UNITS[template];
            let a = number(rng, split, 2, 999);
            let text = text
                .replace("{a}", &a.to_string())
                .replace("{from}", from)
                .replace("{to}", to);
            (text, (a * factor as u64).to_string())
        }
        TaskKind::Sorting => {
            let len = 3 + (rng.next_u64() % 3) as usize;
            let mut list: Vec<u64> = Vec::with_capacity(len);
            while list.len() < len {
                let n = number(rng, split, 1, 99);
                if !list.contains(&n) {
                    list.push(n);
                }
            }
            let shown = join(&list);
            list.sort_unstable();
            (SORTING[template].replace("{list}", &shown), join(&list))
        }
    };
    Problem {
        kind,
        prompt,
        answer,
        template,
    }
}

/// A wrong reply in the gold reply's form, made by a rule: a number off by 1 to 10, or a
/// sorted list with two neighbours swapped (the rejected side of a rule-ranked preference pair).
pub fn wrong_reply(p: &Problem, rng: &mut Rng) -> String {
    let wrong = match p.kind {
        TaskKind::Sorting => {
            let mut items: Vec<&str> = p.answer.split(", ").collect();
            let i = (rng.next_u64() % (items.len() as u64 - 1)) as usize;
            items.swap(i, i + 1);
            items.join(", ")
        }
        _ => {
            let n: i64 = p.answer.parse().unwrap_or(0);
            let off = 1 + (rng.next_u64() % 10) as i64;
            let off = if rng.next_u64().is_multiple_of(2) || n - off < 0 {
                off
            } else {
                -off
            };
            (n + off).to_string()
        }
    };
    format!("The answer is {wrong}.")
}

/// The sizes of the disjoint sets [`task_data`] draws.
#[derive(Clone, Copy, Debug)]
pub struct TaskDataSizes {
    /// Supervised fine-tuning problems (prompt and gold reply).
    pub sft: usize,
    /// Rule-ranked preference pairs (gold reply over a wrong one), for reward models and DPO.
    pub preferences: usize,
    /// Prompts for reinforcement learning (rewarded by the answer).
    pub rl: usize,
    /// Held-out evaluation problems (new numbers and templates).
    pub eval: usize,
}

/// Problems of the training split for the SFT, preference and RL sets (no prompt in two of
/// them) and held-out problems for evaluation, spread evenly over `kinds`.
pub struct TaskData {
    /// SFT problems.
    pub sft: Vec<Problem>,
    /// Preference pairs with the problem each came from.
    pub preferences: Vec<(Problem, crate::align::prefs::PreferencePair)>,
    /// RL prompts.
    pub rl: Vec<Problem>,
    /// Held-out problems.
    pub eval: Vec<Problem>,
}

/// Draws [`TaskData`] from `seed`. Training problems repeat (a few thousand prompts cover the
/// templates and numbers many times), so a prompt drawn for one set is skipped for the others.
pub fn task_data(kinds: &[TaskKind], sizes: TaskDataSizes, seed: u64) -> TaskData {
    let mut seen = std::collections::HashSet::new();
    let mut rng = Rng::new(seed);
    let take = |split: Split, n: usize, salt: u64, seen: &mut std::collections::HashSet<String>| {
        let mut out = Vec::with_capacity(n);
        let mut round = 0u64;
        while out.len() < n && round < 64 {
            for (k, &kind) in kinds.iter().enumerate() {
                let want = (n - out.len()).div_ceil(kinds.len() - k).max(1);
                let batch = generate(
                    kind,
                    split,
                    4 * want,
                    seed ^ (salt << 32) ^ (round << 8) ^ k as u64,
                );
                let mut got = 0;
                for p in batch {
                    if got == want || out.len() == n {
                        break;
                    }
                    if seen.insert(p.prompt.clone()) {
                        out.push(p);
                        got += 1;
                    }
                }
            }
            round += 1;
        }
        out
    };
    let eval = take(Split::HeldOut, sizes.eval, 1, &mut seen);
    let sft = take(Split::Train, sizes.sft, 2, &mut seen);
    let preferences = take(Split::Train, sizes.preferences, 3, &mut seen)
        .into_iter()
        .map(|p| {
            let pair = crate::align::prefs::PreferencePair {
                prompt: p.prompt.clone(),
                chosen: p.gold_reply(),
                rejected: wrong_reply(&p, &mut rng),
            };
            (p, pair)
        })
        .collect();
    let rl = take(Split::Train, sizes.rl, 4, &mut seen);
    TaskData {
        sft,
        preferences,
        rl,
        eval,
    }
}

/// A problem as one JSONL record: its kind, prompt and answer, and the gold reply.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record<'a> {
    task: &'a str,
    prompt: &'a str,
    answer: &'a str,
    reply: String,
}

/// Writes `data` into `dir` as JSONL (`sft.jsonl`, `preferences.jsonl`, `rl-prompts.jsonl`,
/// `eval.jsonl`; problems as `task`, `prompt`, `answer`, `reply` records, preference pairs as
/// `prompt`, `chosen`, `rejected`) and the SFT set as a ChatterBot corpus (`sft/tasks.yml`), and
/// returns each file with its record count.
pub fn write_task_data(
    dir: &std::path::Path,
    data: &TaskData,
) -> anyhow::Result<Vec<(std::path::PathBuf, usize)>> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let problems = |ps: &[Problem]| -> anyhow::Result<String> {
        let mut out = String::new();
        for p in ps {
            out.push_str(&serde_json::to_string(&Record {
                task: p.kind.name(),
                prompt: &p.prompt,
                answer: &p.answer,
                reply: p.gold_reply(),
            })?);
            out.push('\n');
        }
        Ok(out)
    };
    let mut written = Vec::new();
    for (name, text, n) in [
        ("sft.jsonl", problems(&data.sft)?, data.sft.len()),
        ("rl-prompts.jsonl", problems(&data.rl)?, data.rl.len()),
        ("eval.jsonl", problems(&data.eval)?, data.eval.len()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push((path, n));
    }
    let path = dir.join("preferences.jsonl");
    let pairs: Vec<_> = data
        .preferences
        .iter()
        .map(|(_, pair)| pair.clone())
        .collect();
    crate::align::prefs::write_preferences(&path, &pairs)?;
    written.push((path, pairs.len()));
    // The SFT set again as a ChatterBot corpus (one user turn, one assistant turn each), which
    // `anneal finetune`'s chat fine-tuning reads.
    let sft = dir.join("sft");
    std::fs::create_dir_all(&sft).with_context(|| format!("creating {}", sft.display()))?;
    let mut yaml = String::from("categories:\n- tasks\nconversations:\n");
    for p in &data.sft {
        yaml.push_str(&format!(
            "- - {}\n  - {}\n",
            yaml_string(&p.prompt),
            yaml_string(&p.gold_reply())
        ));
    }
    let path = sft.join("tasks.yml");
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    written.push((path, data.sft.len()));
    Ok(written)
}

/// `s` as a double-quoted YAML scalar.
fn yaml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn join(list: &[u64]) -> String {
    list.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads problem JSONL (`task`, `prompt`, `answer`; what [`write_task_data`] writes): the
/// problems and the lines skipped (unknown task, missing or empty field, bad UTF-8 or JSON),
/// each with its file and line.
pub fn read_problems(
    paths: &[std::path::PathBuf],
) -> anyhow::Result<(Vec<Problem>, Vec<anneal_data::BadInput>)> {
    use crate::align::prefs::string_field;
    crate::align::prefs::read_jsonl(paths, |value| {
        let task = string_field(value, "task")?;
        let Some(&(_, kind)) = TaskKind::ALL.iter().find(|(n, _)| *n == task) else {
            let names: Vec<&str> = TaskKind::ALL.iter().map(|(n, _)| *n).collect();
            return Err(format!("task {task:?} is not one of {}", names.join(", ")));
        };
        Ok(Problem {
            kind,
            prompt: string_field(value, "prompt")?,
            answer: string_field(value, "answer")?,
            template: usize::MAX,
        })
    })
}

/// The last whole number in `reply` (its final answer), with a leading minus sign kept.
pub fn final_number(reply: &str) -> Option<String> {
    numbers(reply).pop().map(|(n, _)| n)
}

/// The last run of numbers in `reply` separated only by commas and spaces, as "a, b, c".
pub fn final_list(reply: &str) -> Option<String> {
    let found = numbers(reply);
    let (_, mut end) = *found.last()?;
    let mut run = Vec::new();
    for (n, span_end) in found.into_iter().rev() {
        let gap = &reply[span_end..end];
        if !run.is_empty() && !gap.chars().all(|c| c == ',' || c == ' ') {
            break;
        }
        end = span_end - n.len();
        run.push(n);
    }
    run.reverse();
    Some(run.join(", "))
}

/// Every whole number in `text` with the byte offset just past it.
fn numbers(text: &str) -> Vec<(String, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let negative = start > 0
                && bytes[start - 1] == b'-'
                && (start < 2 || !bytes[start - 2].is_ascii_alphanumeric());
            let digits = &text[start..i];
            let trimmed = digits.trim_start_matches('0');
            let value = if trimmed.is_empty() { "0" } else { trimmed };
            let value = if negative {
                format!("-{value}")
            } else {
                value.to_string()
            };
            out.push((value, i));
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_problems_share_no_number_or_template_with_training() {
        for (_, kind) in TaskKind::ALL {
            let train = generate(kind, Split::Train, 300, 1);
            let held = generate(kind, Split::HeldOut, 300, 2);
            let templates = |ps: &[Problem]| {
                let mut t: Vec<usize> = ps.iter().map(|p| p.template).collect();
                t.sort_unstable();
                t.dedup();
                t
            };
            let (a, b) = (templates(&train), templates(&held));
            assert!(a.iter().all(|t| !b.contains(t)), "{kind:?}: {a:?} {b:?}");
            assert!(a.len() >= 2 && !b.is_empty());
            let operands = |p: &Problem| -> Vec<u64> {
                let mut n: Vec<u64> = numbers(&p.prompt)
                    .into_iter()
                    .map(|(n, _)| n.parse().unwrap())
                    .collect();
                if kind == TaskKind::Units {
                    n.truncate(1);
                }
                n
            };
            for p in &train {
                assert!(operands(p).iter().all(|n| n % 4 != 3), "{p:?}");
                assert_eq!(p.reward(&p.gold_reply()), 1.0);
            }
            for p in &held {
                assert!(operands(p).iter().all(|n| n % 4 == 3), "{p:?}");
                assert_eq!(p.reward(&p.gold_reply()), 1.0);
            }
            // Deterministic in the seed.
            assert_eq!(generate(kind, Split::Train, 5, 1), train[..5].to_vec());
        }
    }

    #[test]
    fn the_sets_are_disjoint_and_rule_ranked_pairs_prefer_the_right_answer() {
        let kinds: Vec<TaskKind> = TaskKind::ALL.iter().map(|(_, k)| *k).collect();
        let sizes = TaskDataSizes {
            sft: 300,
            preferences: 200,
            rl: 100,
            eval: 90,
        };
        let d = task_data(&kinds, sizes, 7);
        assert_eq!(
            (d.sft.len(), d.preferences.len(), d.rl.len(), d.eval.len()),
            (300, 200, 100, 90)
        );
        let mut prompts: Vec<&str> = d.sft.iter().map(|p| p.prompt.as_str()).collect();
        prompts.extend(d.preferences.iter().map(|(p, _)| p.prompt.as_str()));
        prompts.extend(d.rl.iter().map(|p| p.prompt.as_str()));
        prompts.extend(d.eval.iter().map(|p| p.prompt.as_str()));
        let n = prompts.len();
        prompts.sort_unstable();
        prompts.dedup();
        assert_eq!(prompts.len(), n, "no prompt in two sets");
        for kind in &kinds {
            assert!(
                d.eval.iter().filter(|p| p.kind == *kind).count() >= 25,
                "{kind:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let files = write_task_data(dir.path(), &d).unwrap();
        assert_eq!(files.iter().map(|(_, n)| n).sum::<usize>(), 990);
        let (convs, report) =
            anneal_data::dialogue::read_chatterbot(&dir.path().join("sft")).unwrap();
        assert!(report.bad_conversations.is_empty() && report.bad_files.is_empty());
        assert_eq!(convs.len(), 300);
        assert_eq!(
            convs[7].turns,
            [d.sft[7].prompt.clone(), d.sft[7].gold_reply()]
        );
        assert_eq!(yaml_string("a \"b\" \\ c\nd"), r#""a \"b\" \\ c\nd""#);
        let back =
            crate::align::prefs::read_preferences(&[dir.path().join("preferences.jsonl")]).unwrap();
        assert_eq!((back.pairs.len(), back.bad.len()), (200, 0));
        let eval = std::fs::read_to_string(dir.path().join("eval.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(eval.lines().next().unwrap()).unwrap();
        assert_eq!(first["answer"], d.eval[0].answer.as_str());
        for (p, pair) in &d.preferences {
            assert_eq!(p.reward(&pair.chosen), 1.0);
            assert_eq!(p.reward(&pair.rejected), 0.0, "{pair:?}");
            assert_ne!(pair.chosen, pair.rejected);
        }
    }

    #[test]
    fn answers_are_right_and_rewards_read_the_final_answer() {
        let p = &generate(TaskKind::Arithmetic, Split::Train, 50, 3)
            .into_iter()
            .find(|p| p.template == 0)
            .unwrap();
        let n: Vec<u64> = numbers(&p.prompt)
            .iter()
            .map(|(n, _)| n.parse().unwrap())
            .collect();
        assert_eq!(p.answer, (n[0] + n[1]).to_string());
        let right = format!("{} + {} = {}", n[0], n[1], p.answer);
        assert_eq!(p.reward(&right), 1.0);
        assert_eq!(
            p.reward(&format!("{} then 1", p.answer)),
            0.0,
            "the last number counts"
        );
        assert_eq!(p.reward("I do not know."), 0.0);
        let s = Problem {
            kind: TaskKind::Sorting,
            prompt: String::new(),
            answer: "3, 8, 15".into(),
            template: 0,
        };
        assert_eq!(s.reward("Sorted: 3, 8, 15."), 1.0);
        assert_eq!(s.reward("From 15, 3 and 8 I get 3, 8, 15"), 1.0);
        assert_eq!(s.reward("3, 15, 8"), 0.0);
        assert_eq!(s.reward("8, 15"), 0.0);
        assert_eq!(final_number("it is -7 or x-3"), Some("3".into()));
        assert_eq!(final_number("-7"), Some("-7".into()));
        assert_eq!(final_number("007"), Some("7".into()));
        let u = generate(TaskKind::Units, Split::HeldOut, 20, 4);
        assert!(u
            .iter()
            .any(|p| p.prompt.contains("days") && p.answer.parse::<u64>().unwrap() % 24 == 0));
    }
}
