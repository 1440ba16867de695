//! Per-document quality signals, attached to every kept document so that a mixture can be
//! re-weighted or re-thresholded later without reprocessing the corpus.
//!
//! Knowledge density:
//! - **compression ratio** c = |deflate(text)| / |text| (bytes, zlib level 6): repetitive or
//!   templated text compresses well (low c); dense prose and code sit near 0.3–0.5;
//! - **distinct-token ratio** = |distinct words| / |words| (type–token ratio, words
//!   lower-cased and whitespace-separated);
//! - **content-word share** = share of alphabetic words that are not function (stop) words;
//! - **entropy per byte** H = −Σ_b p(b) log₂ p(b) over the byte unigram distribution, in bits
//!   (0 for a single repeated byte, at most 8).
//!
//! Authenticity, as distribution match to a target sample the user gives:
//! - **n-gram Jensen–Shannon divergence** to the target, over hashed character n-grams:
//!   JSD(P ‖ Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = ½ (P + Q), in bits (0: same distribution, 1:
//!   disjoint). Computed over the document's n-grams only, using
//!   ½ Σ_{x∉P} q(x) = ½ (1 − Σ_{x∈P} q(x)) for the target mass the document lacks.
//!
//! Language: `whatlang`'s trigram detector (ISO 639-3 code and its confidence).

use std::collections::HashMap;
use std::io::Write;

/// Signals of one document.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Signals {
    /// Deflate size over raw size.
    pub compression_ratio: f64,
    /// Distinct words over words.
    pub distinct_token_ratio: f64,
    /// Share of alphabetic words that are not stop words.
    pub content_word_share: f64,
    /// Byte unigram entropy, bits.
    pub entropy_per_byte: f64,
    /// ISO 639-3 language code, when detected.
    pub language: Option<String>,
    /// Detector confidence in [0, 1].
    pub language_confidence: f64,
    /// Jensen–Shannon divergence to the target sample, when one is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_jsd: Option<f64>,
    /// Signals computed by callers (for example perplexity under a trained model), by name.
    #[serde(flatten, default)]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// English function words (a compact list in the spirit of common stop-word lists).
const FUNCTION_WORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are",
    "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but",
    "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for",
    "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his",
    "how", "i", "if", "in", "into", "is", "it", "its", "just", "me", "more", "most", "my", "no",
    "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "out", "over",
    "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "them",
    "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until",
    "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom",
    "why", "will", "with", "would", "you", "your",
];

/// Deflate size over raw size.
pub fn compression_ratio(text: &str) -> f64 {
    if text.is_empty() {
        return 0.0;
    }
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(text.as_bytes())
        .expect("in-memory writes succeed");
    let compressed = enc.finish().expect("in-memory writes succeed");
    compressed.len() as f64 / text.len() as f64
}

/// Byte unigram entropy in bits.
pub fn entropy_per_byte(text: &str) -> f64 {
    let mut counts = [0usize; 256];
    for &b in text.as_bytes() {
        counts[b as usize] += 1;
    }
    let n = text.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// A probability distribution over hashed character n-grams.
#[derive(Clone, Debug)]
pub struct NgramDistribution {
    n: usize,
    probs: HashMap<u64, f64>,
}

fn char_ngrams(text: &str, n: usize) -> HashMap<u64, usize> {
    let chars: Vec<char> = text.to_lowercase().chars().collect();
    let mut counts = HashMap::new();
    if chars.len() < n {
        return counts;
    }
    let mut buf = String::new();
    for w in chars.windows(n) {
        buf.clear();
        buf.extend(w);
        *counts
            .entry(xxhash_rust::xxh3::xxh3_64(buf.as_bytes()))
            .or_insert(0) += 1;
    }
    counts
}

impl NgramDistribution {
    /// The character `n`-gram distribution of a target sample (lower-cased).
    pub fn from_texts<'a>(texts: impl Iterator<Item = &'a str>, n: usize) -> NgramDistribution {
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for t in texts {
            for (k, c) in char_ngrams(t, n) {
                *counts.entry(k).or_insert(0) += c;
            }
        }
        let total = counts.values().sum::<usize>().max(1) as f64;
        NgramDistribution {
            n,
            probs: counts
                .into_iter()
                .map(|(k, c)| (k, c as f64 / total))
                .collect(),
        }
    }

    /// Jensen–Shannon divergence (bits) between `text`'s n-gram distribution and this one.
    pub fn jsd(&self, text: &str) -> f64 {
        let counts = char_ngrams(text, self.n);
        let total = counts.values().sum::<usize>();
        if total == 0 {
            return 1.0;
        }
        // A fixed summation order, so the same document always gets the same bits.
        let mut counts: Vec<(u64, usize)> = counts.into_iter().collect();
        counts.sort_unstable();
        let mut covered_q = 0.0;
        let mut sum = 0.0;
        for (k, c) in counts {
            let p = c as f64 / total as f64;
            let q = self.probs.get(&k).copied().unwrap_or(0.0);
            covered_q += q;
            let m = 0.5 * (p + q);
            sum += p * (p / m).log2();
            if q > 0.0 {
                sum += q * (q / m).log2();
            }
        }
        // Target n-grams absent from the document: q·log₂(q / (q/2)) = q each.
        (0.5 * (sum + (1.0 - covered_q).max(0.0))).clamp(0.0, 1.0)
    }
}

/// Every signal of `text`; `target` adds the divergence to a target sample.
pub fn compute(text: &str, target: Option<&NgramDistribution>) -> Signals {
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    let distinct = words.iter().collect::<std::collections::HashSet<_>>().len();
    let alphabetic: Vec<&String> = words
        .iter()
        .filter(|w| w.chars().all(|c| c.is_alphabetic()))
        .collect();
    let content = alphabetic
        .iter()
        .filter(|w| FUNCTION_WORDS.binary_search(&w.as_str()).is_err())
        .count();
    let lang = whatlang::detect(text);
    Signals {
        compression_ratio: compression_ratio(text),
        distinct_token_ratio: if words.is_empty() {
            0.0
        } else {
            distinct as f64 / words.len() as f64
        },
        content_word_share: if alphabetic.is_empty() {
            0.0
        } else {
            content as f64 / alphabetic.len() as f64
        },
        entropy_per_byte: entropy_per_byte(text),
        language: lang.as_ref().map(|l| l.lang().code().to_string()),
        language_confidence: lang.map_or(0.0, |l| l.confidence()),
        target_jsd: target.map(|t| t.jsd(text)),
        extra: Default::default(),
    }
}

/// Keeps documents in the given languages with enough detector confidence.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageFilter {
    /// ISO 639-3 codes to keep (`eng`, `fra`, `cmn`, …); empty keeps every language.
    pub languages: Vec<String>,
    /// Detector confidence below this fails (0.5).
    pub min_confidence: f64,
}

impl Default for LanguageFilter {
    fn default() -> Self {
        LanguageFilter {
            languages: vec!["eng".into()],
            min_confidence: 0.5,
        }
    }
}

impl LanguageFilter {
    /// Checks the detected language.
    pub fn check(&self, text: &str) -> crate::filters::Verdict {
        let Some(info) = whatlang::detect(text) else {
            return Err("language: not detected".into());
        };
        let code = info.lang().code();
        if !self.languages.is_empty() && !self.languages.iter().any(|l| l == code) {
            return Err(format!("language: {code}, not one of {:?}", self.languages));
        }
        if info.confidence() < self.min_confidence {
            return Err(format!(
                "language: {code} with confidence {:.2} (< {})",
                info.confidence(),
                self.min_confidence
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROSE: &str = crate::TEST_PROSE;

    #[test]
    fn function_words_are_sorted_for_binary_search() {
        assert!(FUNCTION_WORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn density_signals_separate_prose_from_repetition() {
        let prose = compute(PROSE, None);
        let spam = compute(&"buy now ".repeat(100), None);
        assert!(
            spam.compression_ratio < 0.1 && prose.compression_ratio > 0.4,
            "{prose:?} {spam:?}"
        );
        assert!(spam.distinct_token_ratio < 0.05 && prose.distinct_token_ratio > 0.7);
        assert!((0.4..0.8).contains(&prose.content_word_share), "{prose:?}");
        assert!(prose.entropy_per_byte > 3.5 && prose.entropy_per_byte < 5.0);
        assert_eq!(entropy_per_byte("aaaa"), 0.0);
        assert!((entropy_per_byte("abab") - 1.0).abs() < 1e-12);
        assert_eq!(prose.language.as_deref(), Some("eng"));
    }

    #[test]
    fn jensen_shannon_divergence_to_a_target() {
        let target = NgramDistribution::from_texts([PROSE].into_iter(), 3);
        assert!(target.jsd(PROSE) < 1e-9, "identical distributions");
        let french = "Le comité s'est réuni mardi pour discuter du budget de l'année prochaine.";
        let code = "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{v:?}\"); }";
        let near =
            "The members of the committee discussed the budget for the library and the park.";
        let (n, f, c) = (target.jsd(near), target.jsd(french), target.jsd(code));
        assert!(n < f && f < c && c <= 1.0, "{n} {f} {c}");
        let s = compute(near, Some(&target));
        assert_eq!(s.target_jsd, Some(n));
    }

    #[test]
    fn language_filter() {
        let f = LanguageFilter::default();
        assert_eq!(f.check(PROSE), Ok(()));
        let french = "Le comité s'est réuni mardi pour discuter du budget de l'année prochaine, et tous les membres étaient présents.";
        assert!(f.check(french).unwrap_err().contains("fra"));
        let any = LanguageFilter {
            languages: vec![],
            min_confidence: 0.0,
        };
        assert_eq!(any.check(french), Ok(()));
    }
}
