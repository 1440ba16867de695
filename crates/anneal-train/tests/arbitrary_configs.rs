//! Run configurations with arbitrary values for their keys (as files or `--set` overrides give
//! them) end in a configuration whose memory bound can be computed, or an error naming the key
//! or the file; nothing panics or overflows, however large the sizes.

use anneal_train::RunConfig;
use proptest::prelude::*;

const KEYS: [&str; 14] = [
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.block_size",
    "model.dropout",
    "model.dtype",
    "train.batch_size",
    "train.grad_accum",
    "train.max_steps",
    "train.lr",
    "train.warmup_steps",
    "train.eval_interval",
    "train.threads",
    "train.grad_clip",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        (0i64..100).prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        prop::sample::select(vec![
            "nan",
            "inf",
            "-inf",
            "0",
            "-1",
            "1e308",
            "9223372036854775807",
            "\"bf16\"",
            "\"q4\"",
            "true",
            "[1, 2]",
            "{ a = 1 }",
            "",
        ])
        .prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_overrides_end_in_a_bounded_config_or_an_error_naming_the_key(
        sets in proptest::collection::vec((prop::sample::select(KEYS.to_vec()), value()), 1..4),
        vocab in prop_oneof![1usize..100, any::<usize>()],
    ) {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs/shakespeare-char.toml");
        let overrides: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        match RunConfig::load(Some(&file), &overrides) {
            Ok(config) => {
                if let Ok(bound) = anneal_train::memory::lower_bound(&config, vocab) {
                    prop_assert!(bound.total() > 0.0 && !bound.total().is_nan(), "{:?}", overrides);
                }
            }
            Err(e) => {
                let e = format!("{e:#}");
                prop_assert!(
                    sets.iter().any(|(k, _)| e.contains(k) || e.contains(k.rsplit('.').next().unwrap()))
                        || e.contains("shakespeare-char.toml"),
                    "{}: {}", overrides.join(" "), e
                );
            }
        }
    }
}
