//! Document quality filters, each a plain struct with the published defaults, checkable on its
//! own: a filter returns `Ok(())` to keep a document or `Err(reason)` naming the rule and the
//! measured value that removed it, so every removal can be audited.
//!
//! - [`GopherQuality`] and [`GopherRepetition`]: the rules of Rae et al. 2021, "Scaling Language
//!   Models: Methods, Analysis & Insights from Training Gopher", Appendix A (MassiveText quality
//!   filters, Table A1 for repetition).
//! - [`C4Lines`]: the line rules of Raffel et al. 2020, "Exploring the Limits of Transfer
//!   Learning with a Unified Text-to-Text Transformer", §2.2 (C4); this one rewrites the document
//!   (drops lines) before judging it.
//! - [`LengthBounds`]: characters and words.
//! - [`CodeRules`]: source files (auto-generated markers, line lengths, alphanumeric share), in the
//!   spirit of the StarCoder data filters (Li et al. 2023, §3).
//!
//! Words are whitespace-separated tokens throughout, as in the Gopher rules.

use std::collections::HashMap;

/// The outcome of one filter on one document: `Err` carries the reason.
pub type Verdict = std::result::Result<(), String>;

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// Gopher quality rules. Defaults are the paper's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GopherQuality {
    /// Fewer words than this fails (50).
    pub min_words: usize,
    /// More words than this fails (100,000).
    pub max_words: usize,
    /// Mean word length below this fails (3 characters).
    pub min_mean_word_length: f64,
    /// Mean word length above this fails (10 characters).
    pub max_mean_word_length: f64,
    /// Ratio of `#` and ellipsis (`...`, `…`) occurrences to words above this fails (0.1).
    pub max_symbol_word_ratio: f64,
    /// Share of lines starting with a bullet above this fails (0.9).
    pub max_bullet_lines: f64,
    /// Share of lines ending with an ellipsis above this fails (0.3).
    pub max_ellipsis_lines: f64,
    /// Share of words with at least one alphabetic character below this fails (0.8).
    pub min_alpha_words: f64,
    /// Fewer distinct stop words (the, be, to, of, and, that, have, with) than this fails (2).
    pub min_stop_words: usize,
}

impl Default for GopherQuality {
    fn default() -> Self {
        GopherQuality {
            min_words: 50,
            max_words: 100_000,
            min_mean_word_length: 3.0,
            max_mean_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_bullet_lines: 0.9,
            max_ellipsis_lines: 0.3,
            min_alpha_words: 0.8,
            min_stop_words: 2,
        }
    }
}

const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
const BULLETS: [&str; 6] = ["•", "●", "○", "■", "-", "*"];

impl GopherQuality {
    /// Applies every rule, reporting the first that fails.
    pub fn check(&self, text: &str) -> Verdict {
        let w = words(text);
        let n = w.len();
        if n < self.min_words || n > self.max_words {
            return Err(format!(
                "gopher_quality: {n} words, outside [{}, {}]",
                self.min_words, self.max_words
            ));
        }
        let mean = w.iter().map(|x| x.chars().count()).sum::<usize>() as f64 / n as f64;
        if mean < self.min_mean_word_length || mean > self.max_mean_word_length {
            return Err(format!(
                "gopher_quality: mean word length {mean:.2}, outside [{}, {}]",
                self.min_mean_word_length, self.max_mean_word_length
            ));
        }
        let symbols =
            text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
        let ratio = symbols as f64 / n as f64;
        if ratio > self.max_symbol_word_ratio {
            return Err(format!(
                "gopher_quality: symbol-to-word ratio {ratio:.3} > {}",
                self.max_symbol_word_ratio
            ));
        }
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if !lines.is_empty() {
            let bullets = lines
                .iter()
                .filter(|l| BULLETS.iter().any(|b| l.trim_start().starts_with(b)))
                .count() as f64
                / lines.len() as f64;
            if bullets > self.max_bullet_lines {
                return Err(format!(
                    "gopher_quality: {:.0}% of lines start with a bullet (> {:.0}%)",
                    100.0 * bullets,
                    100.0 * self.max_bullet_lines
                ));
            }
            let ellipsis = lines
                .iter()
                .filter(|l| {
                    let t = l.trim_end();
                    t.ends_with("...") || t.ends_with('…')
                })
                .count() as f64
                / lines.len() as f64;
            if ellipsis > self.max_ellipsis_lines {
                return Err(format!(
                    "gopher_quality: {:.0}% of lines end with an ellipsis (> {:.0}%)",
                    100.0 * ellipsis,
                    100.0 * self.max_ellipsis_lines
                ));
            }
        }
        let alpha = w
            .iter()
            .filter(|x| x.chars().any(char::is_alphabetic))
            .count() as f64
            / n as f64;
        if alpha < self.min_alpha_words {
            return Err(format!(
                "gopher_quality: {:.0}% of words have a letter (< {:.0}%)",
                100.0 * alpha,
                100.0 * self.min_alpha_words
            ));
        }
        let mut seen = [false; STOP_WORDS.len()];
        for x in &w {
            let lower = x.to_lowercase();
            if let Some(i) = STOP_WORDS.iter().position(|s| *s == lower) {
                seen[i] = true;
            }
        }
        let stop = seen.iter().filter(|&&s| s).count();
        if stop < self.min_stop_words {
            return Err(format!(
                "gopher_quality: {stop} distinct stop words (< {})",
                self.min_stop_words
            ));
        }
        Ok(())
    }
}

/// Gopher repetition rules (Table A1). Defaults are the paper's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GopherRepetition {
    /// Share of lines that duplicate an earlier line, above which the document fails (0.30).
    pub max_duplicate_lines: f64,
    /// Share of paragraphs (blocks split by blank lines) that duplicate an earlier one (0.30).
    pub max_duplicate_paragraphs: f64,
    /// Share of characters in duplicated lines (0.20).
    pub max_duplicate_line_chars: f64,
    /// Share of characters in duplicated paragraphs (0.20).
    pub max_duplicate_paragraph_chars: f64,
    /// For n = 2, 3, 4: the most frequent n-gram's characters (times its count) as a share of
    /// all word characters, above which the document fails (0.20, 0.18, 0.16).
    pub max_top_ngram_chars: [f64; 3],
    /// For n = 5 … 10: characters covered by n-grams occurring more than once, as a share of all
    /// word characters (0.15, 0.14, 0.13, 0.12, 0.11, 0.10).
    pub max_duplicate_ngram_chars: [f64; 6],
}

impl Default for GopherRepetition {
    fn default() -> Self {
        GopherRepetition {
            max_duplicate_lines: 0.30,
            max_duplicate_paragraphs: 0.30,
            max_duplicate_line_chars: 0.20,
            max_duplicate_paragraph_chars: 0.20,
            max_top_ngram_chars: [0.20, 0.18, 0.16],
            max_duplicate_ngram_chars: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        }
    }
}

/// (share of items that repeat an earlier item, share of characters in those repeats).
fn duplicate_shares<'a>(items: impl Iterator<Item = &'a str>) -> (f64, f64) {
    let mut seen = std::collections::HashSet::new();
    let (mut n, mut dup, mut chars, mut dup_chars) = (0usize, 0usize, 0usize, 0usize);
    for item in items {
        n += 1;
        chars += item.len();
        if !seen.insert(item) {
            dup += 1;
            dup_chars += item.len();
        }
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    (
        dup as f64 / n as f64,
        dup_chars as f64 / chars.max(1) as f64,
    )
}

impl GopherRepetition {
    /// Applies every rule, reporting the first that fails.
    pub fn check(&self, text: &str) -> Verdict {
        let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let (dup_lines, dup_line_chars) = duplicate_shares(lines);
        if dup_lines > self.max_duplicate_lines {
            return Err(format!(
                "gopher_repetition: {:.0}% duplicate lines (> {:.0}%)",
                100.0 * dup_lines,
                100.0 * self.max_duplicate_lines
            ));
        }
        let paragraphs = text.split("\n\n").map(str::trim).filter(|p| !p.is_empty());
        let (dup_par, dup_par_chars) = duplicate_shares(paragraphs);
        if dup_par > self.max_duplicate_paragraphs {
            return Err(format!(
                "gopher_repetition: {:.0}% duplicate paragraphs (> {:.0}%)",
                100.0 * dup_par,
                100.0 * self.max_duplicate_paragraphs
            ));
        }
        if dup_line_chars > self.max_duplicate_line_chars {
            return Err(format!(
                "gopher_repetition: {:.0}% of characters in duplicate lines (> {:.0}%)",
                100.0 * dup_line_chars,
                100.0 * self.max_duplicate_line_chars
            ));
        }
        if dup_par_chars > self.max_duplicate_paragraph_chars {
            return Err(format!(
                "gopher_repetition: {:.0}% of characters in duplicate paragraphs (> {:.0}%)",
                100.0 * dup_par_chars,
                100.0 * self.max_duplicate_paragraph_chars
            ));
        }
        let w = words(text);
        let total: usize = w.iter().map(|x| x.len()).sum();
        if total == 0 {
            return Ok(());
        }
        for (k, &limit) in self.max_top_ngram_chars.iter().enumerate() {
            let n = k + 2;
            if w.len() < n {
                break;
            }
            let mut counts: HashMap<&[&str], usize> = HashMap::new();
            for g in w.windows(n) {
                *counts.entry(g).or_default() += 1;
            }
            if let Some((gram, count)) = counts
                .iter()
                .max_by_key(|(g, c)| (**c, std::cmp::Reverse(*g)))
            {
                if *count > 1 {
                    let chars: usize = gram.iter().map(|x| x.len()).sum::<usize>() * count;
                    let share = chars as f64 / total as f64;
                    if share > limit {
                        return Err(format!(
                            "gopher_repetition: the most frequent {n}-gram covers {:.0}% of characters (> {:.0}%)",
                            100.0 * share,
                            100.0 * limit
                        ));
                    }
                }
            }
        }
        for (k, &limit) in self.max_duplicate_ngram_chars.iter().enumerate() {
            let n = k + 5;
            if w.len() < n {
                break;
            }
            let mut counts: HashMap<&[&str], usize> = HashMap::new();
            for g in w.windows(n) {
                *counts.entry(g).or_default() += 1;
            }
            // Characters of the words covered by some n-gram that occurs more than once.
            let mut covered = vec![false; w.len()];
            for (i, g) in w.windows(n).enumerate() {
                if counts[g] > 1 {
                    covered[i..i + n].iter_mut().for_each(|c| *c = true);
                }
            }
            let chars: usize = w
                .iter()
                .zip(&covered)
                .filter(|(_, &c)| c)
                .map(|(x, _)| x.len())
                .sum();
            let share = chars as f64 / total as f64;
            if share > limit {
                return Err(format!(
                    "gopher_repetition: duplicated {n}-grams cover {:.0}% of characters (> {:.0}%)",
                    100.0 * share,
                    100.0 * limit
                ));
            }
        }
        Ok(())
    }
}

/// C4's line rules: keep only lines that end in terminal punctuation and have enough words, drop
/// lines mentioning javascript or boilerplate policy phrases; reject pages with "lorem ipsum",
/// a curly brace, or too few sentences left.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct C4Lines {
    /// Words a line needs to be kept (3).
    pub min_words_per_line: usize,
    /// Sentences (`.`, `!`, `?` endings) the kept text needs (5).
    pub min_sentences: usize,
    /// Reject pages containing `{` (C4 does, to remove code; off for code corpora).
    pub reject_curly_braces: bool,
}

impl Default for C4Lines {
    fn default() -> Self {
        C4Lines {
            min_words_per_line: 3,
            min_sentences: 5,
            reject_curly_braces: true,
        }
    }
}

const BOILERPLATE: [&str; 6] = [
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
];

impl C4Lines {
    /// The document with C4's line rules applied, or the reason it is rejected.
    pub fn apply(&self, text: &str) -> std::result::Result<String, String> {
        let lower = text.to_lowercase();
        if lower.contains("lorem ipsum") {
            return Err("c4: contains \"lorem ipsum\"".into());
        }
        if self.reject_curly_braces && text.contains('{') {
            return Err("c4: contains a curly brace".into());
        }
        let mut kept = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            let terminal =
                t.ends_with('.') || t.ends_with('!') || t.ends_with('?') || t.ends_with('"');
            let l = t.to_lowercase();
            if !terminal
                || words(t).len() < self.min_words_per_line
                || l.contains("javascript")
                || BOILERPLATE.iter().any(|b| l.contains(b))
            {
                continue;
            }
            kept.push(t);
        }
        let out = kept.join("\n");
        let sentences = out.matches(['.', '!', '?']).count();
        if sentences < self.min_sentences {
            return Err(format!(
                "c4: {sentences} sentences left after line filtering (< {})",
                self.min_sentences
            ));
        }
        Ok(out)
    }
}

/// Bounds on a document's size.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LengthBounds {
    /// Fewest characters (0).
    pub min_chars: usize,
    /// Most characters (unbounded: 2⁶³ − 1, the largest integer a TOML file holds).
    pub max_chars: usize,
}

impl Default for LengthBounds {
    fn default() -> Self {
        LengthBounds {
            min_chars: 0,
            max_chars: i64::MAX as usize,
        }
    }
}

impl LengthBounds {
    /// Checks the character count.
    pub fn check(&self, text: &str) -> Verdict {
        let n = text.chars().count();
        if n < self.min_chars || n > self.max_chars {
            return Err(format!(
                "length: {n} characters, outside [{}, {}]",
                self.min_chars, self.max_chars
            ));
        }
        Ok(())
    }
}

/// Rules for source files.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodeRules {
    /// Longest line allowed (1,000 characters: minified or data files).
    pub max_line_length: usize,
    /// Largest mean line length allowed (100).
    pub max_mean_line_length: f64,
    /// Smallest share of alphanumeric characters (0.25: binary-like or data-heavy files).
    pub min_alphanumeric: f64,
    /// Phrases in the first lines that mark generated code.
    pub generated_markers: Vec<String>,
    /// How many leading lines are searched for the markers (10).
    pub marker_lines: usize,
}

impl Default for CodeRules {
    fn default() -> Self {
        CodeRules {
            max_line_length: 1000,
            max_mean_line_length: 100.0,
            min_alphanumeric: 0.25,
            generated_markers: [
                "auto-generated",
                "autogenerated",
                "automatically generated",
                "generated by",
                "do not edit",
            ]
            .map(String::from)
            .to_vec(),
            marker_lines: 10,
        }
    }
}

impl CodeRules {
    /// Applies every rule, reporting the first that fails.
    pub fn check(&self, text: &str) -> Verdict {
        let head: String = text
            .lines()
            .take(self.marker_lines)
            .collect::<Vec<_>>()
            .join("\n")
            .to_lowercase();
        if let Some(m) = self
            .generated_markers
            .iter()
            .find(|m| head.contains(&m.to_lowercase()))
        {
            return Err(format!(
                "code: generated-code marker {m:?} in the first lines"
            ));
        }
        let lines: Vec<&str> = text.lines().collect();
        if let Some(longest) = lines.iter().map(|l| l.chars().count()).max() {
            if longest > self.max_line_length {
                return Err(format!(
                    "code: a line of {longest} characters (> {})",
                    self.max_line_length
                ));
            }
            let mean =
                lines.iter().map(|l| l.chars().count()).sum::<usize>() as f64 / lines.len() as f64;
            if mean > self.max_mean_line_length {
                return Err(format!(
                    "code: mean line length {mean:.0} (> {})",
                    self.max_mean_line_length
                ));
            }
        }
        let total = text.chars().count();
        if total > 0 {
            let alnum = text.chars().filter(|c| c.is_alphanumeric()).count() as f64 / total as f64;
            if alnum < self.min_alphanumeric {
                return Err(format!(
                    "code: {:.0}% alphanumeric characters (< {:.0}%)",
                    100.0 * alnum,
                    100.0 * self.min_alphanumeric
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROSE: &str = crate::TEST_PROSE;

    #[test]
    fn gopher_quality_keeps_prose_and_names_each_failure() {
        let g = GopherQuality::default();
        assert_eq!(g.check(PROSE), Ok(()));
        let short = "The cat sat on the mat.";
        assert!(g.check(short).unwrap_err().contains("6 words"));
        let long_words = "internationalisation ".repeat(60) + " the and";
        assert!(g
            .check(&long_words)
            .unwrap_err()
            .contains("mean word length"));
        let hashes = format!("{PROSE} {}", "#tag ".repeat(20));
        assert!(g.check(&hashes).unwrap_err().contains("symbol-to-word"));
        let bullets = "- the item and one more thing here\n".repeat(20);
        assert!(g.check(&bullets).unwrap_err().contains("bullet"));
        let ellipses = "the story goes on and on with more to tell...\n".repeat(12);
        assert!(g.check(&ellipses).unwrap_err().contains("ellipsis"));
        let numbers = format!("{} the and with", "123 456 7.89 ".repeat(30));
        assert!(g.check(&numbers).unwrap_err().contains("have a letter"));
        let no_stop = "Quick brown foxes jump over lazy dogs while zebras run fast ".repeat(6);
        assert!(g.check(&no_stop).unwrap_err().contains("stop words"));
    }

    #[test]
    fn gopher_repetition_catches_repeated_lines_paragraphs_and_ngrams() {
        let r = GopherRepetition::default();
        assert_eq!(r.check(PROSE), Ok(()));
        let lines = "buy now and save big today\n".repeat(5) + PROSE;
        assert!(
            r.check(&lines).unwrap_err().contains("duplicate lines"),
            "{:?}",
            r.check(&lines)
        );
        let spam = format!("{PROSE} {}", "click here now ".repeat(30));
        let e = r.check(&spam).unwrap_err();
        assert!(e.contains("gram"), "{e}");
        let long_repeat = format!("{PROSE}\n{}", PROSE.replace(". ", ".\n"));
        assert!(r.check(&long_repeat).is_err());
    }

    #[test]
    fn c4_line_rules_drop_lines_and_reject_pages() {
        let c = C4Lines::default();
        let page = format!(
            "Home | About | Contact\nThis site uses cookies to improve your experience.\n{}\nPlease enable JavaScript to view this page.\nShare",
            PROSE.replace(". ", ".\n")
        );
        let kept = c.apply(&page).unwrap();
        assert!(
            !kept.contains("Home") && !kept.contains("cookies") && !kept.contains("JavaScript")
        );
        assert!(kept.starts_with("The committee met"));
        assert!(c
            .apply("Lorem ipsum dolor sit amet.")
            .unwrap_err()
            .contains("lorem"));
        assert!(c.apply("fn main() { }").unwrap_err().contains("curly"));
        assert!(c
            .apply("One good sentence here.")
            .unwrap_err()
            .contains("sentences"));
    }

    #[test]
    fn length_bounds_and_code_rules() {
        let l = LengthBounds {
            min_chars: 10,
            max_chars: 20,
        };
        assert!(l.check("short").is_err() && l.check("just right here").is_ok());
        let code = CodeRules::default();
        let rust = "fn main() {\n    let x = 1;\n    println!(\"{x}\");\n}\n";
        assert_eq!(code.check(rust), Ok(()));
        let generated =
            "// This file is automatically generated by build.rs. Do not edit.\nfn x() {}\n";
        assert!(code.check(generated).unwrap_err().contains("generated"));
        let minified = format!("var a={};\n", "x".repeat(2000));
        assert!(code.check(&minified).unwrap_err().contains("a line of"));
        let data = "0, 0, 0, 0, 0, 0, 0, 0,\n".repeat(10).replace('0', "-");
        assert!(code.check(&data).unwrap_err().contains("alphanumeric"));
    }
}
