//! The fault suite: each command that writes outputs is killed with SIGKILL (through the
//! `failpoints` feature, `anneal_data::failpoint`) at every point where part of its outputs is
//! on disk (after each shard, signature file or checkpoint, once all are written, and between
//! the two renames that put them in place) and at a few seeded random moments. Afterwards the
//! directory must hold the previous outputs intact or the new ones complete, never a mix, with
//! the user's own files kept; a rerun must complete and leave nothing behind.
//!
//! ```text
//! cargo test -p anneal-cli --features failpoints --test faults
//! ```
#![cfg(all(unix, feature = "failpoints"))]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

type Files = BTreeMap<String, Vec<u8>>;

/// A command writing its outputs into the given directory, killed at the failpoint if one is
/// given.
type Writer<'a> = &'a dyn Fn(&Path) -> Command;

fn run(command: &mut Command, fail: Option<&str>) -> Output {
    command.env("RUST_LOG", "warn");
    if let Some(point) = fail {
        command.env("ANNEAL_FAILPOINT", point);
    }
    command.output().expect("the anneal binary runs")
}

fn anneal_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_anneal"));
    c.args(args);
    c
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The regular files directly in `dir` (hidden ones aside), with run times taken out of JSON
/// summaries, which is all that differs between two runs on the same input.
fn files(dir: &Path) -> Files {
    let mut out = Files::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.path().is_file() || name.starts_with('.') {
            continue;
        }
        let mut bytes = std::fs::read(e.path()).unwrap();
        if name.ends_with(".json") {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                if let Some(o) = v.as_object_mut() {
                    o.remove("seconds");
                }
                bytes = serde_json::to_vec(&v).unwrap();
            }
        }
        out.insert(name, bytes);
    }
    out
}

/// Names and sizes, for messages.
fn summary(files: &Files) -> String {
    let parts: Vec<String> = files
        .iter()
        .map(|(n, b)| format!("{n} ({} bytes)", b.len()))
        .collect();
    parts.join(", ")
}

fn restore(from: &Files, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in from {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The outputs a reader finds next (a reader first finishes a replacement a kill interrupted:
/// the old version, when the new is not yet in place), without the user's file, which the next
/// run carries over.
fn outputs_seen(dir: &Path) -> Files {
    let old = dir.with_file_name(format!(
        ".{}.old",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let mut f = if dir.exists() {
        files(dir)
    } else {
        files(&old)
    };
    f.remove(USER_FILE);
    f
}

const USER_FILE: &str = "notes.txt";

/// Hidden work directories left beside `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let name = format!(".{}.", dir.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name))
        .collect()
}

/// Kills `write` at each of `points` (each must be reached) and after `timed` seeded delays,
/// starting each time from the `old` outputs (plus a file of the user's when `user_file`), and
/// checks the outcome as the module says.
fn kill_everywhere(
    dir: &Path,
    old: Files,
    write: Writer,
    points: &[&str],
    timed: u64,
    user_file: bool,
) {
    let fresh = dir.join("fresh");
    ok(run(&mut write(&fresh), None));
    let (mut old, mut new) = (old, files(&fresh));
    assert!(old != new, "the new outputs differ from the old");
    let (old_outputs, new_outputs) = (old.clone(), new.clone());
    if user_file {
        old.insert(USER_FILE.into(), b"my notes".to_vec());
        new.insert(USER_FILE.into(), b"my notes".to_vec());
    }
    let out = dir.join("out");
    let check = |what: &str, result: &Output| {
        let killed = result.status.signal() == Some(9);
        assert!(
            killed || result.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let now = outputs_seen(&out);
        assert!(
            now == old_outputs || now == new_outputs,
            "{what}: neither the old outputs nor the new: {}",
            summary(&now)
        );
        // A rerun completes, cleans up, and gives the new outputs.
        ok(run(&mut write(&out), None));
        let again = files(&out);
        assert!(
            again == new,
            "{what}: the rerun gave {}, not {}",
            summary(&again),
            summary(&new)
        );
        assert!(leftovers(&out).is_empty(), "{what}: {:?}", leftovers(&out));
        killed
    };
    for point in points {
        restore(&old, &out);
        let result = run(&mut write(&out), Some(point));
        assert!(check(point, &result), "{point} was never reached");
    }
    // Seeded random moments within an uninterrupted run's duration.
    let started = Instant::now();
    ok(run(&mut write(&dir.join("timing")), None));
    let span = started.elapsed().as_micros() as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..timed {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_micros((state >> 33) % span.max(1));
        restore(&old, &out);
        let child = write(&out)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        signal(&child, "-KILL");
        let result = child.wait_with_output().unwrap();
        check(&format!("kill after {delay:?}"), &result);
    }
}

/// `count` text files of seeded words, different for each `seed`.
fn texts(dir: &Path, seed: u64, count: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let words = [
        "river", "town", "spring", "stone", "light", "field", "bread", "song",
    ];
    for f in 0..count {
        let text: String = (0..400)
            .map(|i| words[(i * 7 + f * 3 + seed as usize * 5 + i / 11) % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(dir.join(format!("{seed}-{f}.txt")), text + "\n").unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn data_tokenize_leaves_the_old_dataset_or_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let tokenize = |src: PathBuf| {
        move |out: &Path| {
            anneal_cmd(&[
                "data",
                "tokenize",
                "--input",
                arg(&src),
                "--tokenizer",
                "chars",
                "--split",
                "tail",
                "--val-fraction",
                "0.1",
                "--quiet",
                "--out",
                arg(out),
            ])
        }
    };
    let (a, b) = (
        texts(&dir.path().join("a"), 1, 3),
        texts(&dir.path().join("b"), 2, 12),
    );
    let old = dir.path().join("old");
    ok(run(&mut tokenize(a)(&old), None));
    let points = ["shard:1", "shard:2", "commit:1", "replace:1", "replace:2"];
    kill_everywhere(dir.path(), files(&old), &tokenize(b), &points, 4, true);
}

#[test]
fn data_pipeline_leaves_the_old_outputs_or_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |src: PathBuf| {
        move |out: &Path| {
            anneal_cmd(&[
                "data",
                "pipeline",
                "--input",
                arg(&src),
                "--stages",
                "normalize,exact_dedup",
                "--set",
                "output.shard_documents=3",
                "--quiet",
                "--out",
                arg(out),
            ])
        }
    };
    let (a, b) = (
        texts(&dir.path().join("a"), 1, 2),
        texts(&dir.path().join("b"), 2, 10),
    );
    let old = dir.path().join("old");
    ok(run(&mut pipeline(a)(&old), None));
    let points = ["shard:1", "shard:3", "commit:1", "replace:1", "replace:2"];
    kill_everywhere(dir.path(), files(&old), &pipeline(b), &points, 3, true);
}

#[test]
fn data_minhash_and_dedup_leave_old_outputs_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        texts(&dir.path().join("a"), 1, 4),
        texts(&dir.path().join("b"), 2, 8),
    );
    let minhash = |src: PathBuf| {
        move |out: &Path| anneal_cmd(&["data", "minhash", "--input", arg(&src), "--out", arg(out)])
    };
    let old_sigs = dir.path().join("old-sigs");
    ok(run(&mut minhash(a.clone())(&old_sigs), None));
    let signing = dir.path().join("signing");
    std::fs::create_dir_all(&signing).unwrap();
    kill_everywhere(
        &signing,
        files(&old_sigs),
        &minhash(b.clone()),
        &["signatures:1"],
        2,
        true,
    );

    let new_sigs = signing.join("fresh");
    let dedup = |sigs: &Path| {
        let sigs = sigs.to_path_buf();
        move |out: &Path| {
            anneal_cmd(&[
                "data",
                "dedup",
                "--signatures",
                arg(&sigs),
                "--out",
                arg(out),
            ])
        }
    };
    let old = dir.path().join("old-dedup");
    ok(run(&mut dedup(&old_sigs)(&old), None));
    let deduping = dir.path().join("deduping");
    std::fs::create_dir_all(&deduping).unwrap();
    let points = ["commit:1", "replace:1"];
    kill_everywhere(&deduping, files(&old), &dedup(&new_sigs), &points, 2, true);
}

#[test]
fn export_leaves_the_old_export_or_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let run_dir = dir.path().join("run");
    ok(pretrain(&data, &run_dir, 40, &[]).output().unwrap());
    let step = |s: u64| run_dir.join(format!("checkpoints/step-{s:06}"));
    let export = |from: PathBuf| {
        move |out: &Path| anneal_cmd(&["export", arg(&from), "--force", "--out", arg(out)])
    };
    let old = dir.path().join("old");
    ok(run(&mut export(step(20))(&old), None));
    let exporting = dir.path().join("exporting");
    std::fs::create_dir_all(&exporting).unwrap();
    // --force replaces the whole directory: no file of the user's to keep.
    let points = ["export:1", "replace:1", "replace:2"];
    kill_everywhere(
        &exporting,
        files(&old),
        &export(step(40)),
        &points,
        2,
        false,
    );
}

#[test]
fn pretraining_killed_while_checkpointing_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let steps = 60;
    let straight = dir.path().join("straight");
    ok(pretrain(&data, &straight, steps, &[]).output().unwrap());
    let want = losses(&straight).0;
    assert_eq!(want.len(), steps as usize);
    for point in ["checkpoint:1", "checkpoint:2", "checkpoint:3"] {
        let out = dir.path().join(point.replace(':', "-"));
        let killed = run(&mut pretrain(&data, &out, steps, &[]), Some(point));
        assert_eq!(killed.status.signal(), Some(9), "{point} was never reached");
        ok(run(&mut pretrain(&data, &out, steps, &["--resume"]), None));
        let got = losses(&out).0;
        assert_eq!(
            got.iter().map(|l| (l.0, l.1.to_bits())).collect::<Vec<_>>(),
            want.iter()
                .map(|l| (l.0, l.1.to_bits()))
                .collect::<Vec<_>>(),
            "killed at {point}, then resumed"
        );
        let hidden: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{point}: left {hidden:?}");
    }
}
