//! Outside input to the data pipeline never panics: arbitrary JSONL lines are documents or
//! counted bad lines, text of any shape is handed on whole in bounded parts, and mutated shard
//! manifests end in a dataset or an error naming the file; pipeline settings of any value run or
//! are refused naming the key.

use anneal_data::pipeline::PipelineConfig;
use anneal_data::{
    tokenize, Corpus, CorpusOptions, Manifest, ShardSet, TokenizeOptions, Tokenizer,
};
use proptest::prelude::*;

fn read(
    dir: &std::path::Path,
    options: CorpusOptions,
) -> (Vec<anneal_data::Document>, anneal_data::CorpusReport) {
    let corpus = Corpus::new(&[dir.to_path_buf()], options).unwrap();
    let mut docs = Vec::new();
    let report = corpus
        .for_each(|d| {
            docs.push(d);
            true
        })
        .unwrap();
    (docs, report)
}

/// A JSONL line: a document, a document whose text is not a string, or arbitrary bytes.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        ".{0,40}".prop_map(|t| serde_json::json!({ "text": t }).to_string().into_bytes()),
        any::<i64>().prop_map(|n| format!("{{\"text\": {n}}}").into_bytes()),
        proptest::collection::vec(
            any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
            0..40
        ),
    ]
}

/// Text with runs of spaces, tabs and newlines between words of any script.
fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            "[a-z]{1,12}",
            "[ \t\n]{1,3}",
            "[日本語éü→]{1,6}",
            "[a-z]{40,120}",
        ],
        0..60,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn jsonl_lines_are_documents_or_counted(lines in proptest::collection::vec(line(), 0..20)) {
        let dir = tempfile::tempdir().unwrap();
        let mut body = lines.join(&b'\n');
        body.push(b'\n');
        std::fs::write(dir.path().join("a.jsonl"), &body).unwrap();
        let (docs, report) = read(dir.path(), CorpusOptions::default());
        let nonblank = lines
            .iter()
            .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
            .count() as u64;
        prop_assert!(report.documents + report.bad_count <= nonblank);
        prop_assert_eq!(docs.len() as u64, report.documents);
        for bad in &report.bad {
            prop_assert!(bad.path.ends_with("a.jsonl") && bad.line.is_some(), "{}", bad);
        }
    }

    #[test]
    fn text_is_handed_on_whole_in_bounded_parts(body in text(), max in 64usize..200) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), &body).unwrap();
        let options = CorpusOptions { max_document_bytes: max, ..Default::default() };
        let (docs, report) = read(dir.path(), options);
        prop_assert_eq!(docs.iter().map(|d| d.text.as_str()).collect::<String>(), body.clone());
        prop_assert!(docs.iter().all(|d| d.text.len() <= max && !d.text.is_empty()));
        prop_assert!(docs.iter().skip(1).all(|d| d.continued));
        prop_assert!(docs.first().is_none_or(|d| !d.continued));
        prop_assert_eq!(report.documents, u64::from(!body.is_empty()));
    }

    #[test]
    fn mutated_manifests_end_in_a_dataset_or_an_error_naming_the_file(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a.txt"), "some text to tokenize, and more of it").unwrap();
        let corpus = Corpus::new(&[src.path().to_path_buf()], CorpusOptions::default()).unwrap();
        let tok = Tokenizer::train_chars(["some text to tokenize, and more of it"].iter()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = TokenizeOptions { val_fraction: 0.0, shard_tokens: 8, ..Default::default() };
        tokenize(&corpus, &tok, out.path(), &opts, &mut |_| {}).unwrap();
        let path = out.path().join("manifest.json");
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        std::fs::write(&path, &bytes).unwrap();
        let dir = out.path().display().to_string();
        let opened = Manifest::load(out.path()).and_then(|m| {
            ShardSet::open(out.path(), &m, "train")?;
            ShardSet::open(out.path(), &m, "val")
        });
        if let Err(e) = opened {
            prop_assert!(e.to_string().contains(&dir), "{}", e);
        }
    }

    #[test]
    fn arbitrary_pipeline_settings_run_or_are_refused_by_key(
        sets in proptest::collection::vec(
            (prop::sample::select(PIPELINE_KEYS.to_vec()), setting()),
            1..4,
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..4 {
            let text = format!("The river town held its spring market, stall {i} of many. ");
            std::fs::write(src.join(format!("{i}.txt")), text.repeat(30)).unwrap();
        }
        let mut overrides: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        overrides.push(format!("input.paths=[{:?}]", src.display().to_string()));
        overrides.push(format!("output.dir={:?}", dir.path().join("out").display().to_string()));
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs/pipeline-web.toml");
        let result = PipelineConfig::load(Some(&file), &overrides)
            .and_then(|c| anneal_data::pipeline::run(&c, |_, _| {}).map(|_| ()));
        if let Err(e) = result {
            let e = e.to_string();
            prop_assert!(
                sets.iter().any(|(k, _)| e.contains(k) || e.contains(k.rsplit('.').next().unwrap()))
                    || e.contains("pipeline-web.toml"),
                "{}: {}", overrides.join(" "), e
            );
        }
    }
}

const PIPELINE_KEYS: [&str; 12] = [
    "near_dedup.threshold",
    "near_dedup.num_perm",
    "near_dedup.ngram",
    "filters.length.min_chars",
    "filters.length.max_chars",
    "filters.language.min_confidence",
    "filters.language.languages",
    "filters.gopher_quality.min_words",
    "filters.gopher_quality.max_symbol_word_ratio",
    "filters.gopher_repetition.max_duplicate_lines",
    "signals.ngram",
    "output.shard_documents",
];

fn setting() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        (0i64..20).prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        prop::sample::select(vec![
            "nan",
            "inf",
            "-1",
            "0",
            "1.5",
            "1e308",
            "\"xx\"",
            "[\"eng\"]",
            "[]",
            "true",
            "",
        ])
        .prop_map(String::from),
    ]
}
