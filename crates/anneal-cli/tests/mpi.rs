//! `anneal pretrain` under `mpirun` (built with `--features mpi`): MPI processes train what one
//! process trains; a rank that fails or dies ends the whole job, the failing rank named; SIGTERM
//! or Ctrl-C on the launcher saves one checkpoint, written once every rank has stopped at the same
//! step, which resumes in one process, and then on MPI processes again. Skipped, saying so, where `mpirun` is missing, unless
//! `ANNEAL_REQUIRE_MPI` is set (CI sets it).
#![cfg(all(feature = "mpi", unix))]

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `mpirun` is here; fails when it must be.
fn have_mpirun() -> bool {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("ANNEAL_REQUIRE_MPI").is_none(),
            "mpirun is missing (install openmpi-bin and libopenmpi-dev)"
        );
        eprintln!("SKIPPED: mpirun is not installed");
    }
    found
}

/// `mpirun` on this machine: `ranks` processes sharing its cores, over shared memory.
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "--mca",
        "btl",
        "self,vader",
        "-np",
        &ranks.to_string(),
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// The `pretrain` arguments of common::pretrain, after the binary.
fn run_args(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        env!("CARGO_BIN_EXE_anneal").to_string(),
        "pretrain".into(),
        "--quiet".into(),
    ];
    args.extend(settings(data, out, steps));
    args.extend(["--set".into(), "train.threads=1".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn assert_close(what: &str, got: &Curve, want: &Curve) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.0 == w.0 && (g.1 - w.1).abs() <= 1e-5 * w.1.abs(),
            "{what}: step {} loss {} vs {}",
            g.0,
            g.1,
            w.1
        );
    }
}

#[test]
fn mpi_processes_train_as_one_process_does() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let one = dir.path().join("one");
    ok(pretrain(&data, &one, 40, &[]).output().unwrap());
    let want = losses(&one);
    for (ranks, layout) in [(2, "parallel.zero=0"), (4, "parallel.zero=2")] {
        let out = dir.path().join(format!("mpi{ranks}"));
        let args = run_args(&data, &out, 40, &["--set", layout]);
        ok(mpirun(ranks).args(&args).output().unwrap());
        let got = losses(&out);
        assert_close(&format!("{ranks} MPI ranks, {layout}"), &got.0, &want.0);
        assert_close(&format!("{ranks} MPI ranks, {layout}"), &got.1, &want.1);
    }
}

#[test]
fn a_failing_rank_ends_the_job_naming_itself() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let out = dir.path().join("run");
    // Rank 1 is given a corpus that does not exist; rank 0 waits for it in a collective.
    let good = run_args(&data, &out, 1000, &[]);
    let bad = run_args(&dir.path().join("nowhere"), &out, 1000, &[]);
    let began = Instant::now();
    let o = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["--mca", "btl", "self,vader", "-np", "1"])
        .args(&good)
        .arg(":")
        .args(["-np", "1"])
        .args(&bad)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let took = began.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("rank 1 of 2") && err.contains("no tokenized corpus"),
        "{err}"
    );
    eprintln!("the job ended {:.2} s after launch", took.as_secs_f64());
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// The ranks' pids (children of `mpirun`).
fn ranks_of(launcher: u32) -> Vec<u32> {
    let o = Command::new("pgrep")
        .args(["-P", &launcher.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_killed_rank_ends_the_job() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let out = dir.path().join("run");
    let mut job = mpirun(2)
        .args(run_args(&data, &out, 100_000, &[]))
        .spawn()
        .unwrap();
    wait_for_step(&mut job, &out, 5);
    let ranks = ranks_of(job.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let killed = Instant::now();
    kill("-KILL", ranks[1]);
    let status = job.wait().unwrap();
    let took = killed.elapsed();
    assert!(!status.success());
    eprintln!(
        "the job ended {:.2} s after a rank was killed",
        took.as_secs_f64()
    );
    // Open MPI's launcher waits its sigkill timeout (1 s) twice before it kills the others.
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn sigterm_on_the_launcher_saves_one_checkpoint_that_resumes() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let out = dir.path().join("run");
    let steps = 100_000;
    let args = run_args(
        &data,
        &out,
        steps,
        &[
            "--set",
            "train.checkpoint_interval=0",
            "--set",
            "parallel.zero=2",
        ],
    );
    let mut job = mpirun(2).args(&args).spawn().unwrap();
    wait_for_step(&mut job, &out, 10);
    kill("-TERM", job.id());
    job.wait().unwrap();
    let saved: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(saved.len(), 1, "one checkpoint: {saved:?}");
    let logged = losses(&out).0.last().unwrap().0;
    assert_eq!(
        saved[0],
        format!("step-{logged:06}"),
        "at the step all stopped"
    );
    // It resumes in one process.
    let more = logged + 3;
    let o = pretrain(
        &data,
        &out,
        more,
        &["--resume", "--set", "train.checkpoint_interval=0"],
    )
    .output()
    .unwrap();
    ok(o);
    assert_eq!(losses(&out).0.last().unwrap().0, more);
    // And back on 2 MPI processes: rank 0 reads that checkpoint and hands it to rank 1.
    let again = more + 3;
    let args = run_args(
        &data,
        &out,
        again,
        &["--resume", "--set", "train.checkpoint_interval=0"],
    );
    ok(mpirun(2).args(&args).output().unwrap());
    assert_eq!(losses(&out).0.last().unwrap().0, again);
}
