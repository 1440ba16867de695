//! Whatever a configuration file or an override holds, loading ends in a value or an error that
//! names the file or the key; it never panics.

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Stage {
    threshold: f64,
    name: String,
    steps: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    train: Stage,
    filter: Option<Stage>,
    flag: bool,
}

fn loader() -> anneal_config::Loader {
    anneal_config::Loader::new(&Config::default()).allow(&Config {
        filter: Some(Stage::default()),
        ..Config::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_file_text_loads_or_is_named(text in "(\\[[a-z.]{0,12}\\]\\n|[a-z_.]{1,10} = [-0-9a-z\\[\\]\"{}.,]{0,12}\\n|[ -~]{0,20}\\n){0,8}") {
        let path = std::path::Path::new("arbitrary.toml");
        match loader().load_text::<Config>(Some((&text, path)), &[]) {
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty());
                if matches!(e, anneal_config::Error::Key { .. } | anneal_config::Error::Syntax { .. }) {
                    prop_assert!(msg.contains("arbitrary.toml"), "{msg}");
                }
            }
        }
    }

    #[test]
    fn any_override_loads_or_is_named(key in "[a-z_.]{0,16}", value in "[ -~]{0,16}") {
        let o = format!("{key}={value}");
        if let Err(e) = loader().load::<Config>(None, &[o]) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
