//! # anneal-config
//!
//! The one configuration loader every anneal command uses: **defaults ← TOML file ←
//! `--set section.key=value`**, each key checked against a schema of the allowed keys:
//!
//! * an unknown key is named with the keys its section allows;
//! * a value of the wrong type is named with the type expected;
//! * a section the defaults leave out but the schema allows (an optional pipeline stage, say)
//!   comes into being with its default keys when a file or an override names it.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize, Default, Debug)]
//! struct Train { lr: f64, steps: u64 }
//! #[derive(serde::Serialize, serde::Deserialize, Default, Debug)]
//! struct Run { train: Train }
//!
//! let run: Run = anneal_config::Loader::new(&Run::default())
//!     .load(None, &["train.lr=3e-4".to_string()])
//!     .unwrap();
//! assert_eq!(run.train.lr, 3e-4);
//! let err = anneal_config::Loader::new(&Run::default())
//!     .load::<Run>(None, &["train.lr_max=1".to_string()])
//!     .unwrap_err();
//! assert!(err.to_string().contains("[train] allows lr, steps"));
//! ```
//!
//! Range checks belong to the configuration type itself (its own `validate`), which names the
//! key, the value and the allowed range the same way.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What went wrong while loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: not valid TOML: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A key, section or value is not allowed.
    #[error("{location}{message}")]
    Key {
        /// `in FILE: ` when the key came from a file, empty for an override.
        location: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The merged table does not fit the configuration type.
    #[error("{0}")]
    Shape(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Loads configurations of one type from defaults, a file and overrides.
#[derive(Clone, Debug)]
pub struct Loader {
    defaults: toml::Table,
    schema: toml::Table,
}

fn table_of<T: Serialize>(value: &T) -> toml::Table {
    toml::Table::try_from(value).expect("configuration defaults serialise to a TOML table")
}

/// Adds every key of `extra` that `into` lacks, recursively.
fn merge_missing(into: &mut toml::Table, extra: &toml::Table) {
    for (k, v) in extra {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_missing(a, b),
            (Some(_), _) => {}
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Parses the right side of `key=value` as a TOML value, or as a bare string when it is not one.
pub fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn key_error(message: String) -> Error {
    Error::Key {
        location: String::new(),
        message,
    }
}

/// `value` converted to the type of `schema`'s value at `key`, or an error naming both.
fn coerce(key: &str, schema: &toml::Value, value: toml::Value) -> Result<toml::Value> {
    let value = match (schema, value) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (toml::Value::String(_), v @ toml::Value::String(_)) => v,
        // A path or name given bare on the command line parses as something else; keep its text.
        (toml::Value::String(_), v)
            if !matches!(v, toml::Value::Table(_) | toml::Value::Array(_)) =>
        {
            toml::Value::String(match v {
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => other.to_string(),
            })
        }
        (d, v) if std::mem::discriminant(d) == std::mem::discriminant(&v) => v,
        (d, v) => {
            return Err(key_error(format!(
                "config key {key} = {v} is not allowed: expected {}",
                type_name(d)
            )))
        }
    };
    if let toml::Value::Integer(i) = value {
        if i < 0 {
            return Err(key_error(format!(
                "config key {key} = {i} is not allowed: expected a non-negative integer"
            )));
        }
    }
    Ok(value)
}

impl Loader {
    /// A loader whose defaults, and whose allowed keys, are those of `defaults`.
    pub fn new<T: Serialize>(defaults: &T) -> Loader {
        let defaults = table_of(defaults);
        Loader {
            schema: defaults.clone(),
            defaults,
        }
    }

    /// Also allows the keys of `example` that the defaults leave out (optional sections and
    /// optional keys, which serialise to nothing when absent); a section named in a file or an
    /// override starts from `example`'s values for it.
    pub fn allow<T: Serialize>(mut self, example: &T) -> Loader {
        merge_missing(&mut self.schema, &table_of(example));
        self
    }

    /// Puts `value` at the dotted `key` of `table`.
    fn set(&self, table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
        // A section with keys is its keys, each checked.
        if let toml::Value::Table(body) = &value {
            if !body.is_empty() {
                let mut keys = Vec::new();
                flatten(key, body.clone(), &mut keys);
                for (k, v) in keys {
                    self.set(table, &k, v)?;
                }
                return Ok(());
            }
        }
        let parts: Vec<&str> = key.split('.').collect();
        let (mut here, mut schema) = (table, &self.schema);
        for (depth, part) in parts.iter().enumerate() {
            let allowed = || {
                let keys: Vec<&str> = schema.keys().map(|k| k.as_str()).collect();
                let section = parts[..depth].join(".");
                if section.is_empty() {
                    format!("the top level allows {}", keys.join(", "))
                } else {
                    format!("[{section}] allows {}", keys.join(", "))
                }
            };
            let Some(expected) = schema.get(*part) else {
                return Err(key_error(format!(
                    "unknown config key {key:?}; {}",
                    allowed()
                )));
            };
            let last = depth + 1 == parts.len();
            match (expected, last) {
                (toml::Value::Table(sub), false) => {
                    let entry = here
                        .entry(part.to_string())
                        .or_insert_with(|| toml::Value::Table(sub.clone()));
                    let toml::Value::Table(next) = entry else {
                        unreachable!("a section of the schema is a table")
                    };
                    here = next;
                    schema = sub;
                }
                (_, false) => {
                    return Err(key_error(format!(
                        "config key {key:?}: {} is a value, not a section",
                        parts[..=depth].join(".")
                    )))
                }
                (toml::Value::Table(sub), true) => {
                    // A section named without keys: switched on with its defaults.
                    if !matches!(value, toml::Value::Table(_)) {
                        return Err(key_error(format!(
                            "config key {key} must be a [{key}] section"
                        )));
                    }
                    here.entry(part.to_string())
                        .or_insert_with(|| toml::Value::Table(sub.clone()));
                    return Ok(());
                }
                (expected, true) => {
                    here.insert(part.to_string(), coerce(key, expected, value)?);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The defaults, then the TOML file at `file` (if any), then each `section.key=value`
    /// override, deserialised into `T`.
    pub fn load<T: DeserializeOwned>(
        &self,
        file: Option<&Path>,
        overrides: &[String],
    ) -> Result<T> {
        let text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?),
            None => None,
        };
        self.load_text(text.as_deref().zip(file), overrides)
    }

    /// As [`Loader::load`], with the file's text given (a recipe built into the binary) and the
    /// path errors name it by.
    pub fn load_text<T: DeserializeOwned>(
        &self,
        file: Option<(&str, &Path)>,
        overrides: &[String],
    ) -> Result<T> {
        let mut table = self.defaults.clone();
        if let Some((text, path)) = file {
            let body: toml::Table = toml::from_str(text).map_err(|e| Error::Syntax {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            // Each top-level entry; `set` takes a section apart into its keys.
            for (key, value) in body {
                self.set(&mut table, &key, value).map_err(|e| match e {
                    Error::Key { message, .. } => Error::Key {
                        location: format!("in {}: ", path.display()),
                        message,
                    },
                    other => other,
                })?;
            }
        }
        for o in overrides {
            let Some((key, value)) = o.split_once('=') else {
                return Err(key_error(format!(
                    "override {o:?} must be section.key=value, for example train.lr=3e-4"
                )));
            };
            self.set(&mut table, key.trim(), parse_value(value.trim()))?;
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                Error::Shape(format!("config does not fit the expected shape: {e}"))
            })
    }
}

/// Every leaf of `table` as (dotted key, value); empty tables stay as themselves (a section that
/// only switches something on).
fn flatten(prefix: &str, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if !t.is_empty() => flatten(&key, t, out),
            other => out.push((key, other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Stage {
        threshold: f64,
        name: String,
    }

    impl Default for Stage {
        fn default() -> Self {
            Stage {
                threshold: 0.5,
                name: "x".into(),
            }
        }
    }

    #[derive(Serialize, Deserialize, Debug, Default, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Filters {
        c4: Option<Stage>,
        length: Option<Stage>,
    }

    #[derive(Serialize, Deserialize, Debug, Default, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Config {
        steps: u64,
        limit: Option<u64>,
        filters: Filters,
    }

    fn loader() -> Loader {
        Loader::new(&Config::default()).allow(&Config {
            limit: Some(0),
            filters: Filters {
                c4: Some(Stage::default()),
                length: Some(Stage::default()),
            },
            ..Config::default()
        })
    }

    fn set(overrides: &[&str]) -> Result<Config> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        loader().load(None, &o)
    }

    #[test]
    fn defaults_then_file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "steps = 5\n[filters.c4]\nthreshold = 0.9\n[filters.length]\n",
        )
        .unwrap();
        let c: Config = loader().load(Some(&path), &["steps=7".into()]).unwrap();
        assert_eq!(c.steps, 7);
        assert_eq!(c.limit, None);
        assert_eq!(c.filters.c4.unwrap().threshold, 0.9);
        assert_eq!(
            c.filters.length,
            Some(Stage::default()),
            "a bare section switches on"
        );
        let c = set(&[
            "filters.length.name=long",
            "limit=3",
            "filters.c4.threshold=1",
        ])
        .unwrap();
        assert_eq!(c.filters.length.unwrap().name, "long");
        assert_eq!(c.limit, Some(3));
        assert_eq!(
            c.filters.c4.unwrap().threshold,
            1.0,
            "an integer where a number goes"
        );
        assert_eq!(set(&[]).unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_key_and_what_is_allowed() {
        let msg = |o: &[&str]| set(o).unwrap_err().to_string();
        assert!(
            msg(&["stepz=1"]).contains("the top level allows filters, limit, steps"),
            "{}",
            msg(&["stepz=1"])
        );
        assert!(msg(&["filters.c5.threshold=1"]).contains("[filters] allows c4, length"));
        assert!(msg(&["filters.c4.treshold=1"]).contains("[filters.c4] allows name, threshold"));
        assert!(
            msg(&["steps=fast"]).contains("steps = \"fast\" is not allowed: expected an integer")
        );
        assert!(msg(&["steps=-1"]).contains("expected a non-negative integer"));
        assert!(msg(&["steps.x=1"]).contains("steps is a value, not a section"));
        assert!(msg(&["steps"]).contains("must be section.key=value"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[filters.c4]\nthreshold = \"high\"\n").unwrap();
        let e = loader()
            .load::<Config>(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("in {}: ", path.display())) && e.contains("expected a number"),
            "{e}"
        );
        std::fs::write(&path, "steps = [").unwrap();
        let e = loader()
            .load::<Config>(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }
}
