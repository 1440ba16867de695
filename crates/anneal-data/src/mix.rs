//! Mixtures by domain: draw several sources by weight to a target token count, with a cap on how
//! many times one source may be repeated.
//!
//! Planning is water-filling. Each source i holds aᵢ tokens and asks for a share wᵢ / Σw of the
//! target N; it can give at most cᵢ = aᵢ · max_repeat. Sources whose share exceeds their cap are
//! fixed at the cap and the rest of N is shared again among the others by weight, until every
//! share fits (or the caps together fall short of N, which is an error naming the most that can
//! be drawn). A source planned at tᵢ tokens is written ⌊tᵢ / aᵢ⌋ times whole, then each of its
//! documents once more with probability (tᵢ mod aᵢ) / aᵢ (seeded per source and document), so
//! the realised count is close to tᵢ and exactly reported.

use crate::corpus::{Corpus, CorpusOptions};
use crate::{io_err, Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One source of a mixture.
#[derive(Clone, Debug, PartialEq)]
pub struct MixSource {
    /// Its name in the output.
    pub name: String,
    /// Files or directories.
    pub paths: Vec<PathBuf>,
    /// Relative weight.
    pub weight: f64,
}

impl std::str::FromStr for MixSource {
    type Err = Error;
    /// `NAME=PATH:WEIGHT`.
    fn from_str(s: &str) -> Result<MixSource> {
        let bad = || Error::Invalid {
            key: "source".into(),
            value: s.into(),
            allowed: "NAME=PATH:WEIGHT, for example web=data/web:0.7".into(),
        };
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        let (path, weight) = rest.rsplit_once(':').ok_or_else(bad)?;
        let weight: f64 = weight.parse().map_err(|_| bad())?;
        if name.is_empty() || path.is_empty() || !(weight > 0.0 && weight.is_finite()) {
            return Err(bad());
        }
        Ok(MixSource {
            name: name.into(),
            paths: vec![PathBuf::from(path)],
            weight,
        })
    }
}

/// What was drawn from one source.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Realised {
    /// The source.
    pub name: String,
    /// Its weight.
    pub weight: f64,
    /// Share of the target its weight asks for.
    pub requested_share: f64,
    /// Tokens it holds.
    pub available_tokens: u64,
    /// Tokens planned from it.
    pub planned_tokens: u64,
    /// Tokens written.
    pub written_tokens: u64,
    /// Documents written (repeats included).
    pub written_documents: u64,
    /// Share of all written tokens.
    pub realised_share: f64,
    /// Times its data was used: written / available.
    pub repeats: f64,
}

/// Water-filling plan: tokens to draw from each source (see the module comment).
pub fn plan(available: &[u64], weights: &[f64], target: u64, max_repeat: f64) -> Result<Vec<u64>> {
    let caps: Vec<f64> = available.iter().map(|&a| a as f64 * max_repeat).collect();
    let most: f64 = caps.iter().sum();
    if most < target as f64 {
        return Err(Error::Invalid {
            key: "tokens".into(),
            value: target.to_string(),
            allowed: format!(
                "at most {} with max_repeat {max_repeat} (the sources hold {} tokens)",
                most.floor() as u64,
                available.iter().sum::<u64>()
            ),
        });
    }
    let mut fixed: Vec<Option<f64>> = vec![None; available.len()];
    loop {
        let left = target as f64 - fixed.iter().flatten().sum::<f64>();
        let free_weight: f64 = weights
            .iter()
            .zip(&fixed)
            .filter(|(_, f)| f.is_none())
            .map(|(w, _)| w)
            .sum();
        let mut changed = false;
        for i in 0..available.len() {
            if fixed[i].is_none() && left * weights[i] / free_weight > caps[i] {
                fixed[i] = Some(caps[i]);
                changed = true;
            }
        }
        if !changed {
            return Ok((0..available.len())
                .map(|i| match fixed[i] {
                    Some(c) => c.floor() as u64,
                    None => (left * weights[i] / free_weight).round() as u64,
                })
                .collect());
        }
    }
}

/// Counts tokens per source, plans, and writes the mixture into `out_dir`: `mix-NAME.jsonl` per
/// source (`{"text", "source", "mix_source", "pass"}`) and `mixture.json` (the [`Realised`]
/// rows). `count` gives a text's tokens.
pub fn mix(
    sources: &[MixSource],
    options: &CorpusOptions,
    target: u64,
    max_repeat: f64,
    seed: u64,
    count: &(dyn Fn(&str) -> u64 + Sync),
    out_dir: &Path,
) -> Result<Vec<Realised>> {
    if sources.is_empty() {
        return Err(Error::Invalid {
            key: "source".into(),
            value: String::new(),
            allowed: "at least one NAME=PATH:WEIGHT".into(),
        });
    }
    let corpora: Vec<Corpus> = sources
        .iter()
        .map(|s| Corpus::new(&s.paths, options.clone()))
        .collect::<Result<_>>()?;
    let mut available = Vec::new();
    for c in &corpora {
        let mut tokens = 0u64;
        c.for_each(|d| {
            tokens += count(&d.text);
            true
        })?;
        available.push(tokens);
    }
    let weights: Vec<f64> = sources.iter().map(|s| s.weight).collect();
    let planned = plan(&available, &weights, target, max_repeat)?;
    // The outputs replace an earlier mixture's whole, or not at all.
    let staged = crate::Staged::new(out_dir, "mix-tmp", |name| {
        name == "mixture.json" || (name.starts_with("mix-") && name.ends_with(".jsonl"))
    })?;
    let out_dir = staged.path();
    let total_weight: f64 = weights.iter().sum();
    let mut rows = Vec::new();
    for (i, (source, corpus)) in sources.iter().zip(&corpora).enumerate() {
        let path = out_dir.join(format!("mix-{}.jsonl", source.name));
        let mut w = BufWriter::new(File::create(&path).map_err(io_err(&path))?);
        let a = available[i].max(1);
        let whole = planned[i] / a;
        let fraction = (planned[i] % a) as f64 / a as f64;
        let (mut tokens, mut docs) = (0u64, 0u64);
        let mut failure = None;
        for pass in 0..=whole {
            if pass == whole && fraction == 0.0 {
                break;
            }
            let mut index = 0u64;
            corpus.for_each(|d| {
                index += 1;
                if pass == whole {
                    let h = xxhash_rust::xxh3::xxh3_64_with_seed(
                        &[i as u64, index].map(u64::to_le_bytes).concat(),
                        seed,
                    );
                    if h as f64 / u64::MAX as f64 >= fraction {
                        return true;
                    }
                }
                tokens += count(&d.text);
                docs += 1;
                let line = serde_json::json!({
                    "text": d.text, "source": d.source, "mix_source": source.name, "pass": pass,
                });
                if let Err(e) = writeln!(w, "{line}") {
                    failure = Some(io_err(&path)(e));
                    return false;
                }
                true
            })?;
            if let Some(e) = failure.take() {
                return Err(e);
            }
        }
        w.flush().map_err(io_err(&path))?;
        rows.push(Realised {
            name: source.name.clone(),
            weight: source.weight,
            requested_share: source.weight / total_weight,
            available_tokens: available[i],
            planned_tokens: planned[i],
            written_tokens: tokens,
            written_documents: docs,
            realised_share: 0.0,
            repeats: tokens as f64 / a as f64,
        });
    }
    let written: u64 = rows.iter().map(|r| r.written_tokens).sum();
    for r in &mut rows {
        r.realised_share = r.written_tokens as f64 / written.max(1) as f64;
    }
    let path = out_dir.join("mixture.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&rows).expect("serialises"),
    )
    .map_err(io_err(&path))?;
    staged.commit()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_filling_respects_weights_and_caps() {
        assert_eq!(
            plan(&[1000, 1000], &[3.0, 1.0], 400, 1.0).unwrap(),
            [300, 100]
        );
        // The small source is capped at 2 × 50; the rest goes to the large one.
        assert_eq!(
            plan(&[50, 10_000], &[1.0, 1.0], 1000, 2.0).unwrap(),
            [100, 900]
        );
        let err = plan(&[50, 60], &[1.0, 1.0], 1000, 2.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 220"), "{err}");
    }

    #[test]
    fn mixes_to_the_target_with_repeats_reported() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        let large = dir.path().join("large");
        std::fs::create_dir_all(&small).unwrap();
        std::fs::create_dir_all(&large).unwrap();
        for i in 0..10 {
            std::fs::write(small.join(format!("{i}.txt")), "one two three four five").unwrap();
        }
        for i in 0..200 {
            std::fs::write(large.join(format!("{i}.txt")), "a b c d e f g h i j").unwrap();
        }
        let sources: Vec<MixSource> = [
            format!("small={}:1", small.display()),
            format!("large={}:1", large.display()),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let words = |t: &str| t.split_whitespace().count() as u64;
        let out = dir.path().join("mix");
        let rows = mix(
            &sources,
            &CorpusOptions::default(),
            1000,
            3.0,
            7,
            &words,
            &out,
        )
        .unwrap();
        // small holds 50 tokens: capped at 150 (3 passes), large gives the other 850.
        assert_eq!(rows[0].planned_tokens, 150);
        assert_eq!(rows[0].written_tokens, 150);
        assert!((rows[0].repeats - 3.0).abs() < 1e-9);
        assert_eq!(rows[1].planned_tokens, 850);
        assert!(
            (rows[1].written_tokens as i64 - 850).abs() <= 150,
            "{:?}",
            rows[1]
        );
        let lines = std::fs::read_to_string(out.join("mix-small.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 30);
        assert!(out.join("mixture.json").is_file());
        assert!("bad".parse::<MixSource>().is_err());
        assert!("x=/a:b:0".parse::<MixSource>().is_err());
        assert_eq!(
            "x=/a:b:0.5".parse::<MixSource>().unwrap().paths[0],
            PathBuf::from("/a:b")
        );
    }
}
