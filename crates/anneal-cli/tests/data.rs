//! `anneal data minhash` and `anneal data dedup` end to end: two shards signed by separate
//! processes and merged remove exactly what one process removes.

mod common;

use common::anneal as run;

/// Runs anneal, asserting success; its standard output.
fn anneal(args: &[&str]) -> String {
    common::ok(run(args))
}

#[test]
fn sharded_minhash_then_merge_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let story = |i: usize| {
        (0..60)
            .map(|w| format!("w{}", (w * 31 + i * 7919) % 997))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for f in 0..6 {
        let mut body = String::new();
        for d in 0..5 {
            // Documents 0 and 1 of every file repeat file 0's with one word changed.
            let text = if d < 2 {
                story(d).replacen("w", &format!("changed{f} w"), 1)
            } else {
                story(100 * f + d)
            };
            body += &serde_json::json!({ "text": text }).to_string();
            body += "\n";
        }
        std::fs::write(src.join(format!("part{f}.jsonl")), body).unwrap();
    }
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let sigs = dir.path().join("sigs");
    for shard in ["0/2", "1/2"] {
        let out = anneal(&[
            "data",
            "minhash",
            "--input",
            &s(&src),
            "--shard",
            shard,
            "--out",
            &s(&sigs),
        ]);
        assert!(
            out.contains("bands") && out.contains("documents signed"),
            "{out}"
        );
    }
    let merged = dir.path().join("merged");
    let out = anneal(&[
        "data",
        "dedup",
        "--signatures",
        &s(&sigs),
        "--out",
        &s(&merged),
    ]);
    assert!(out.contains("30 documents from 2 shard(s)"), "{out}");
    let single = dir.path().join("single");
    anneal(&["data", "dedup", "--input", &s(&src), "--out", &s(&single)]);
    let removed = |d: &std::path::Path| std::fs::read_to_string(d.join("removed.jsonl")).unwrap();
    assert_eq!(removed(&merged), removed(&single));
    // Files 1–5 each hold two near-copies of file 0's first two documents: ten removals.
    assert_eq!(removed(&merged).lines().count(), 10, "{}", removed(&merged));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("dedup.json")).unwrap()).unwrap();
    assert_eq!(summary["kept"], 20);
    assert_eq!(summary["largest_clusters"][0], 6);
}

#[test]
fn pipeline_from_flags_keeps_or_rejects_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let prose = "The committee met on Tuesday to discuss the budget for the coming year. After a \
        long debate, the members agreed that the library should receive new funds, and that the \
        park near the river would be repaired before the summer. Several residents spoke with \
        passion about the value of public spaces to the town.";
    std::fs::write(src.join("a.txt"), prose).unwrap();
    std::fs::write(src.join("b.txt"), prose).unwrap();
    std::fs::write(src.join("c.txt"), "tiny").unwrap();
    let out = dir.path().join("out");
    let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
    let pipeline = |stages: &'static str| {
        [
            "data", "pipeline", "--input", src_s, "--out", out_s, "--stages", stages,
        ]
    };
    let mut args = pipeline("normalize,exact_dedup,gopher_quality,signals").to_vec();
    args.push("--quiet");
    let text = anneal(&args);
    assert!(text.contains("kept 1 of 3 documents"), "{text}");
    let kept = std::fs::read_to_string(out.join("kept-00000.jsonl")).unwrap();
    let rejected = std::fs::read_to_string(out.join("rejected-00000.jsonl")).unwrap();
    assert_eq!(kept.lines().count() + rejected.lines().count(), 3);
    assert!(
        rejected.contains("\"stage\":\"exact_dedup\"")
            && rejected.contains("\"stage\":\"gopher_quality\"")
    );
    // The report of that run: one self-contained page.
    anneal(&["data", "report", out_s]);
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        page.contains("exact_dedup") && page.contains("<html"),
        "{page:.200}"
    );
    let bad = run(&pipeline("gopher"));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("gopher_quality"),
        "{err}"
    );
    // --set reaches any key of the pipeline, switching its stage on, on the one pool --threads
    // gives; a wrong key is named with the keys its section allows.
    let mut args = pipeline("normalize").to_vec();
    args.extend([
        "--set",
        "filters.length.min_chars=10",
        "--threads",
        "1",
        "--quiet",
    ]);
    let text = anneal(&args);
    assert!(text.contains("kept 2 of 3 documents"), "{text}");
    let rejected = std::fs::read_to_string(out.join("rejected-00000.jsonl")).unwrap();
    assert!(rejected.contains("\"stage\":\"length\""), "{rejected}");
    // An input with no text says so (not that the tokenizer is not allowed).
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("a.txt"), "").unwrap();
    let out_tok = dir.path().join("tok");
    let none = run(&[
        "data",
        "tokenize",
        "--input",
        empty.to_str().unwrap(),
        "--tokenizer",
        "chars",
        "--out",
        out_tok.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(!none.status.success() && err.contains("no text"), "{err}");
    let huge = run(&[
        "data",
        "tokenize",
        "--input",
        src_s,
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "4000000000",
        "--out",
        out_tok.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&huge.stderr);
    assert!(
        !huge.status.success() && err.contains("--vocab-size 4000000000"),
        "{err}"
    );
    // Sizes from flags are checked before anything is allocated.
    let huge = run(&[
        "data", "minhash", "--input", src_s, "--out", out_s, "--bands", "100000", "--rows",
        "100000",
    ]);
    let err = String::from_utf8_lossy(&huge.stderr);
    assert!(
        !huge.status.success() && err.contains("bands × rows = \"100000 × 100000\""),
        "{err}"
    );
    let mut args = pipeline("normalize").to_vec();
    args.extend(["--set", "near_dedup.num_perm=0"]);
    let bad = run(&args);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("near_dedup.num_perm"),
        "{err}"
    );
    let mut args = pipeline("normalize").to_vec();
    args.extend(["--set", "filters.length.min_char=10"]);
    let bad = run(&args);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("[filters.length] allows max_chars, min_chars"),
        "{err}"
    );
}

/// A one-line document is tokenized in bounded pieces: 20 MB and 200 MB of one line take about
/// the same memory (before, a 20 MB line took 2.8 GB and a 200 MB one was killed at 24 GB).
#[test]
fn tokenizing_a_long_line_takes_memory_independent_of_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let out = anneal(&[
        "--threads",
        "2",
        "bench",
        "tokenize",
        "--mb",
        "20,200",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let peaks: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("| 20"))
        .map(|l| l.split('|').nth(2).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(peaks.len(), 2, "{out}");
    assert!(peaks.iter().all(|&p| p > 0.0 && p < 1024.0), "{out}");
    assert!(
        peaks[1] <= peaks[0] * 1.1 && peaks[0] <= peaks[1] * 1.1,
        "peaks of the 20 MB and 200 MB lines differ by more than 10%:\n{out}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "the documents and datasets are removed"
    );
}

/// A corpus too small for the default document split gets no validation documents: tokenize
/// says so (pretraining would need them) and names the ways out.
#[test]
fn an_empty_validation_split_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..3 {
        std::fs::write(src.join(format!("{i}.txt")), format!("document {i}\n")).unwrap();
    }
    let out = run(&[
        "data",
        "tokenize",
        "--input",
        src.to_str().unwrap(),
        "--tokenizer",
        "chars",
        "--quiet",
        "--out",
        dir.path().join("data").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("validation split is empty") && err.contains("--split tail"),
        "{err}"
    );
}
