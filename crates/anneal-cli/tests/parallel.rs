//! `anneal pretrain --ranks N`: ranks as threads of one process train what one rank trains (data
//! parallel, ZeRO 1 to 3, hybrid ZeRO-3, tensor parallel beside data parallel, and a pipeline), a
//! run interrupted on several ranks resumes on one, and a layout that cannot run is refused before
//! anything is written.

mod common;

use common::*;

/// Every step's loss within `rel` of `want`'s, step for step.
fn assert_close(what: &str, got: &Curve, want: &Curve, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0, "{what}");
        assert!(
            (g.1 - w.1).abs() <= rel * w.1.abs(),
            "{what}: step {} loss {} vs {}",
            g.0,
            g.1,
            w.1
        );
    }
}

#[cfg(unix)]
#[test]
fn ranks_train_as_one_rank_does_and_resume_on_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let steps = 60;
    // Dropout is on and 2 micro-batches accumulate (common::settings).
    let one = dir.path().join("one");
    ok(pretrain(&data, &one, steps, &[]).output().unwrap());
    let (want_train, want_val) = losses(&one);
    for (name, extra) in [
        ("2 ranks", &["--ranks", "2"][..]),
        (
            "4 ranks, dp 2 × ZeRO-2 sharding 2",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.zero=2",
                "--set",
                "parallel.sharding=2",
            ][..],
        ),
        (
            "4 ranks, dp 2 × ZeRO-3 sharding 2",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.zero=3",
                "--set",
                "parallel.dp=2",
            ][..],
        ),
        (
            "4 ranks, dp 2 × tp 2, ZeRO-1",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.zero=1",
            ][..],
        ),
        (
            "4 ranks, ZeRO-3 over 2 × tp 2",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.zero=3",
            ][..],
        ),
        (
            "4 ranks, dp 2 × tp 2, ZeRO-2",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.zero=2",
            ][..],
        ),
        (
            "4 ranks, dp 2 × pp 2, 1F1B, ZeRO-1",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.pp=2",
                "--set",
                "parallel.zero=1",
            ][..],
        ),
        (
            "4 ranks, tp 2 × pp 2, 1F1B",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.pp=2",
            ][..],
        ),
        (
            "4 ranks, tp 2 with sequence parallelism × pp 2, 1F1B",
            &[
                "--ranks",
                "4",
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.sequence_parallel=true",
                "--set",
                "parallel.pp=2",
            ][..],
        ),
    ] {
        let out = dir.path().join(name.replace([' ', ','], "_"));
        ok(pretrain(&data, &out, steps, extra).output().unwrap());
        let (train, val) = losses(&out);
        assert_close(name, &train, &want_train, 1e-5);
        assert_close(name, &val, &want_val, 1e-5);
    }
    // Interrupted on 2 ranks under ZeRO-1, resumed on one.
    let moved = dir.path().join("moved");
    let mut child = pretrain(
        &data,
        &moved,
        steps,
        &["--ranks", "2", "--set", "parallel.zero=1"],
    )
    .spawn()
    .unwrap();
    wait_for_step(&mut child, &moved, 25);
    signal(&child, "-INT");
    assert_eq!(child.wait().unwrap().code(), Some(130), "saved and stopped");
    ok(pretrain(&data, &moved, steps, &["--resume"])
        .output()
        .unwrap());
    let (train, _) = losses(&moved);
    assert_close("resumed on one rank", &train, &want_train, 1e-4);
    // And the other way: a run of one rank, stopped at step 20, resumed on 2 ranks under ZeRO-2
    // (rank 0 reads the checkpoint and hands it to the other).
    let grown = dir.path().join("grown");
    let schedule = format!("train.decay_steps={steps}");
    ok(pretrain(&data, &grown, 20, &["--set", &schedule])
        .output()
        .unwrap());
    ok(pretrain(
        &data,
        &grown,
        steps,
        &["--resume", "--ranks", "2", "--set", "parallel.zero=2"],
    )
    .output()
    .unwrap());
    let (train, _) = losses(&grown);
    assert_close("resumed on two ranks", &train, &want_train, 1e-4);
}

#[test]
fn an_impossible_layout_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let out = dir.path().join("run");
    for (extra, words) in [
        (&["--ranks", "3"][..], "train.batch_size = 8"),
        (
            &["--ranks", "4", "--set", "parallel.dp=3"][..],
            "parallel.dp = 3",
        ),
        (
            &["--ranks", "2", "--set", "parallel.sharding=2"][..],
            "parallel.zero",
        ),
    ] {
        let o = pretrain(&data, &out, 10, extra).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(words), "{err}");
        assert!(!out.exists(), "nothing written for {extra:?}");
    }
}

#[test]
fn bench_zero_measures_each_stage_against_the_plan() {
    let out = ok(anneal(&[
        "bench", "zero", "--ranks", "2", "--layers", "1", "--width", "64", "--vocab", "128",
        "--seq", "8",
    ]));
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.split_whitespace().next().is_some_and(|w| w.len() == 1))
        .collect();
    assert_eq!(rows.len(), 6, "3 stages × 2 ranks:\n{out}");
    // The ratios of what a rank holds and of its peak to the plan's model states.
    let ratios = |row: &str| -> Vec<f64> {
        row.split_whitespace()
            .filter(|w| w.ends_with('x'))
            .map(|x| x.trim_end_matches('x').parse().unwrap())
            .collect()
    };
    for row in &rows {
        // Every stage holds what the plan says between steps (ZeRO-2: its shard of the
        // gradients).
        let r = ratios(row);
        assert_eq!(r.len(), 2, "{row}");
        assert!((0.95..1.05).contains(&r[0]), "{row}\n{out}");
    }
    // Under ZeRO-2 the peak adds the gradient buckets being filled and reduced (here the
    // process's peak: both ranks are its threads).
    assert!(ratios(rows[4])[1] > ratios(rows[4])[0], "{out}");
}

#[test]
fn plan_measures_this_machine_as_a_local_cluster() {
    let out = anneal(&[
        "plan",
        "--cluster",
        "local",
        "--ranks",
        "2",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--vocab",
        "64",
        "--seq",
        "32",
        "--batch",
        "8",
        "--dtype",
        "fp32",
        "--top",
        "3",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("local: 2 ranks") && stderr.contains("GB/s bus bandwidth"),
        "{stderr}"
    );
    assert!(stdout.contains("2 × CPU rank"), "{stdout}");
    let e = String::from_utf8_lossy(
        &anneal(&[
            "plan",
            "--cluster",
            "local",
            "--ranks",
            "0",
            "--layers",
            "2",
            "--hidden",
            "64",
            "--heads",
            "4",
            "--batch",
            "8",
        ])
        .stderr,
    )
    .into_owned();
    assert!(e.contains("--ranks 0"), "{e}");
}
