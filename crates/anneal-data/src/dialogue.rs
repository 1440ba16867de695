//! Conversations for chat fine-tuning, read from the ChatterBot corpus's YAML files
//! (`chatterbot_corpus/data/<language>/*.yml`: a `conversations` list, each a list of turns that
//! alternate user, assistant, user, …).
//!
//! A file that does not parse, or a conversation that is not a list of at least two strings, is
//! counted and reported with its file, never fatal: the rest of the corpus is read.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// One conversation: turns alternating user and assistant, the user first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// The file it came from.
    pub file: PathBuf,
    /// Its turns.
    pub turns: Vec<String>,
}

/// What could not be read, by file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DialogueReport {
    /// Files read.
    pub files: usize,
    /// Files that did not parse, with the reason.
    pub bad_files: Vec<(PathBuf, String)>,
    /// Conversations skipped (not a list of at least two strings), with their file.
    pub bad_conversations: Vec<(PathBuf, usize)>,
}

/// Every conversation of the `*.yml` files in `dir` (sorted by file name, in file order).
pub fn read_chatterbot(dir: &Path) -> Result<(Vec<Conversation>, DialogueReport)> {
    let io = |e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Invalid {
            key: "data.dir".into(),
            value: dir.display().to_string(),
            allowed: "a directory of ChatterBot .yml files".into(),
        });
    }
    let mut out = Vec::new();
    let mut report = DialogueReport::default();
    for file in files {
        report.files += 1;
        let text = match std::fs::read(&file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                report.bad_files.push((file, e.to_string()));
                continue;
            }
        };
        let docs = match YamlLoader::load_from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                report.bad_files.push((file, e.to_string()));
                continue;
            }
        };
        let Some(conversations) = docs.first().and_then(|d| d["conversations"].as_vec()) else {
            report
                .bad_files
                .push((file, "no `conversations` list".to_string()));
            continue;
        };
        for (i, c) in conversations.iter().enumerate() {
            let turns: Option<Vec<String>> = c.as_vec().and_then(|turns| {
                turns
                    .iter()
                    .map(|t| match t {
                        Yaml::String(s) => Some(s.trim().to_string()),
                        // Unquoted numbers and booleans are text too ("42", "yes").
                        Yaml::Integer(n) => Some(n.to_string()),
                        Yaml::Real(r) => Some(r.clone()),
                        Yaml::Boolean(b) => Some(b.to_string()),
                        _ => None,
                    })
                    .collect()
            });
            match turns {
                Some(t) if t.len() >= 2 && t.iter().all(|s| !s.is_empty()) => {
                    out.push(Conversation {
                        file: file.clone(),
                        turns: t,
                    })
                }
                _ => report.bad_conversations.push((file.clone(), i)),
            }
        }
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_conversations_and_reports_what_it_skips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yml"),
            "categories:\n- ai\nconversations:\n- - What is AI?\n  - A field of study.\n- - Hi\n  \
             - Hello!\n  - How are you?\n  - Fine.\n- - alone\n- - 42\n  - true\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("b.yml"), "conversations: [unclosed\n").unwrap();
        std::fs::write(dir.path().join("c.yml"), "categories: [x]\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let (convs, report) = read_chatterbot(dir.path()).unwrap();
        assert_eq!(convs.len(), 3);
        assert_eq!(convs[0].turns, vec!["What is AI?", "A field of study."]);
        assert_eq!(convs[1].turns.len(), 4);
        assert_eq!(convs[2].turns, vec!["42", "true"]);
        assert_eq!(report.files, 3);
        assert_eq!(
            report.bad_conversations,
            vec![(dir.path().join("a.yml"), 2)]
        );
        let bad: Vec<&Path> = report.bad_files.iter().map(|(p, _)| p.as_path()).collect();
        assert_eq!(
            bad,
            vec![dir.path().join("b.yml"), dir.path().join("c.yml")]
        );
        assert!(read_chatterbot(&dir.path().join("none")).is_err());
    }
}
