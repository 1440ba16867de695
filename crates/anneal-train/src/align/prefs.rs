//! Preference pairs: one JSON object per line with a `prompt`, the `chosen` reply and the
//! `rejected` one (the layout most preference sets use):
//!
//! ```text
//! {"prompt": "What is 7 + 5?", "chosen": "12", "rejected": "13"}
//! ```
//!
//! A line that is not valid UTF-8 or JSON, lacks one of the three strings, has an empty prompt
//! or reply, or whose replies are the same, is skipped and reported with its file and line;
//! blank lines are ignored. Reading never fails on the content, only on a file that cannot be
//! read.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anneal_data::BadInput;
use anyhow::{Context, Result};

/// One preference: a prompt and two replies, the first preferred.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreferencePair {
    /// The conversation so far.
    pub prompt: String,
    /// The preferred reply.
    pub chosen: String,
    /// The other reply.
    pub rejected: String,
}

/// The pairs of one or more files and the lines skipped.
#[derive(Clone, Debug, Default)]
pub struct PreferenceSet {
    /// The pairs read, in file and line order.
    pub pairs: Vec<PreferencePair>,
    /// Lines skipped, with the reason.
    pub bad: Vec<BadInput>,
}

impl PreferenceSet {
    /// One line for a log: how many pairs, how many lines skipped and the first few reasons.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} preference pairs, {} lines skipped",
            self.pairs.len(),
            self.bad.len()
        );
        for b in self.bad.iter().take(3) {
            s.push_str(&format!("; {b}"));
        }
        if self.bad.len() > 3 {
            s.push_str("; …");
        }
        s
    }
}

/// Reads the preference pairs of `paths`, in order.
pub fn read_preferences(paths: &[PathBuf]) -> Result<PreferenceSet> {
    let (pairs, bad) = read_jsonl(paths, |value| {
        let pair = PreferencePair {
            prompt: string_field(value, "prompt")?,
            chosen: string_field(value, "chosen")?,
            rejected: string_field(value, "rejected")?,
        };
        if pair.chosen == pair.rejected {
            return Err("\"chosen\" and \"rejected\" are the same reply".into());
        }
        Ok(pair)
    })?;
    Ok(PreferenceSet { pairs, bad })
}

/// The records of JSONL files, each line's JSON object read by `parse`; lines that are not
/// valid UTF-8 or JSON, or that `parse` refuses (saying why), are skipped and returned with
/// their file and line. Blank lines are ignored. Fails only on a file that cannot be read.
pub fn read_jsonl<T>(
    paths: &[PathBuf],
    parse: impl Fn(&serde_json::Value) -> std::result::Result<T, String>,
) -> Result<(Vec<T>, Vec<BadInput>)> {
    let (mut records, mut bad) = (Vec::new(), Vec::new());
    for path in paths {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = std::io::BufReader::new(file);
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let record = std::str::from_utf8(line)
                .map_err(|e| format!("invalid UTF-8: {e}"))
                .and_then(|text| {
                    serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))
                })
                .and_then(|value| parse(&value));
            match record {
                Ok(r) => records.push(r),
                Err(reason) => bad.push(BadInput {
                    path: path.to_path_buf(),
                    line: Some(i as u64 + 1),
                    reason,
                }),
            }
        }
    }
    Ok((records, bad))
}

/// The non-empty string `name` of a JSON object, or why not.
pub fn string_field(value: &serde_json::Value, name: &str) -> std::result::Result<String, String> {
    match value.get(name) {
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Err(format!("empty {name:?}")),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{name:?} is not a string")),
        None => Err(format!("no {name:?}")),
    }
}

/// Writes `pairs` as preference JSONL (the layout [`read_preferences`] reads).
pub fn write_preferences(path: &Path, pairs: &[PreferencePair]) -> Result<()> {
    let mut out = String::new();
    for p in pairs {
        out.push_str(&serde_json::to_string(p)?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_counted_with_file_and_line_and_good_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        let mut bytes = Vec::new();
        bytes
            .extend_from_slice(b"{\"prompt\": \"2+2?\", \"chosen\": \"4\", \"rejected\": \"5\"}\n");
        bytes.extend_from_slice(b"{\"prompt\": \"hi\", \"rejected\": \"no\"}\n");
        bytes.extend_from_slice(b"\n");
        bytes.extend_from_slice(b"{\"prompt\": \" \", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
        bytes
            .extend_from_slice(b"{\"prompt\": \"x\", \"chosen\": \"\xff\", \"rejected\": \"b\"}\n");
        bytes.extend_from_slice(b"{not json\r\n");
        bytes.extend_from_slice(b"{\"prompt\": \"p\", \"chosen\": 3, \"rejected\": \"b\"}\n");
        bytes.extend_from_slice(
            b"{\"prompt\": \"p\", \"chosen\": \"same\", \"rejected\": \"same\"}\n",
        );
        bytes.extend_from_slice(b"{\"prompt\": \"3+4?\", \"chosen\": \"7\", \"rejected\": \"8\"}");
        std::fs::write(&path, bytes).unwrap();
        let set = read_preferences(std::slice::from_ref(&path)).unwrap();
        assert_eq!(set.pairs.len(), 2);
        assert_eq!(set.pairs[1].chosen, "7");
        let lines: Vec<u64> = set.bad.iter().map(|b| b.line.unwrap()).collect();
        assert_eq!(lines, [2, 4, 5, 6, 7, 8]);
        let reasons: Vec<&str> = set.bad.iter().map(|b| b.reason.as_str()).collect();
        assert!(reasons[0].contains("no \"chosen\""), "{reasons:?}");
        assert!(reasons[1].contains("empty \"prompt\""), "{reasons:?}");
        assert!(reasons[2].contains("invalid UTF-8"), "{reasons:?}");
        assert!(reasons[3].contains("malformed JSON"), "{reasons:?}");
        assert!(reasons[4].contains("not a string"), "{reasons:?}");
        assert!(reasons[5].contains("same reply"), "{reasons:?}");
        assert!(set.bad[0]
            .to_string()
            .starts_with(&format!("{}:2:", path.display())));
        assert!(set
            .summary()
            .starts_with("2 preference pairs, 6 lines skipped"));
        // What is written reads back the same.
        let again = dir.path().join("again.jsonl");
        write_preferences(&again, &set.pairs).unwrap();
        assert_eq!(read_preferences(&[again]).unwrap().pairs, set.pairs);
        assert!(read_preferences(&[dir.path().join("missing.jsonl")]).is_err());
    }
}
