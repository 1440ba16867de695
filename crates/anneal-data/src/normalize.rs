//! Text normalisation before deduplication and filtering, safe for source code (indentation and
//! spacing inside a line are kept):
//!
//! - line endings: `\r\n` and `\r` become `\n`;
//! - control characters other than newline and tab are removed;
//! - exotic spaces (no-break, en/em/thin spaces, ideographic space, …) become a plain space and
//!   zero-width characters and the byte-order mark are removed;
//! - trailing whitespace is trimmed from every line and runs of more than one blank line shrink
//!   to one;
//! - Unicode canonical composition (NFC, Unicode Standard Annex #15), so that "é" typed as one
//!   code point or as "e" + combining accent compares equal.

use unicode_normalization::UnicodeNormalization;

/// Which normalisations run (all by default).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Normalize {
    /// Unicode NFC.
    pub nfc: bool,
    /// Line endings, exotic spaces, trailing whitespace, blank-line runs.
    pub whitespace: bool,
    /// Remove control characters (except newline and tab) and zero-width characters.
    pub control: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize {
            nfc: true,
            whitespace: true,
            control: true,
        }
    }
}

fn is_exotic_space(c: char) -> bool {
    matches!(
        c,
        '\u{00A0}' | '\u{1680}' | '\u{2000}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}'
    )
}

fn is_zero_width(c: char) -> bool {
    matches!(
        c,
        '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}'
    )
}

impl Normalize {
    /// The normalised text.
    pub fn apply(&self, text: &str) -> String {
        let mut s: String = if self.whitespace || self.control {
            let text = text.replace("\r\n", "\n").replace('\r', "\n");
            text.chars()
                .filter_map(|c| {
                    if self.control
                        && ((c.is_control() && c != '\n' && c != '\t') || is_zero_width(c))
                    {
                        None
                    } else if self.whitespace && is_exotic_space(c) {
                        Some(' ')
                    } else {
                        Some(c)
                    }
                })
                .collect()
        } else {
            text.to_string()
        };
        if self.whitespace {
            let mut out = String::with_capacity(s.len());
            let mut blank_run = 0;
            for line in s.split('\n') {
                let line = line.trim_end();
                if line.is_empty() {
                    blank_run += 1;
                    if blank_run > 1 {
                        continue;
                    }
                } else {
                    blank_run = 0;
                }
                out.push_str(line);
                out.push('\n');
            }
            // No trailing newline added beyond what the text had; no leading/trailing blank lines.
            s = out.trim_matches('\n').to_string();
            if text.ends_with('\n') && !s.is_empty() {
                s.push('\n');
            }
        }
        if self.nfc {
            s = s.nfc().collect();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_spaces_controls_lines_and_composition() {
        let n = Normalize::default();
        let text = "caf\u{0065}\u{0301}\u{00A0}ok\r\nline two   \r\n\n\n\nfn x() {\n    y\u{200B}\u{0007}\n}\n";
        let out = n.apply(text);
        assert_eq!(out, "café ok\nline two\n\nfn x() {\n    y\n}\n");
        assert_eq!(
            out.chars().filter(|&c| c == 'é').count(),
            1,
            "composed to one code point"
        );
        assert_eq!(n.apply(&out), out, "idempotent");
        let off = Normalize {
            nfc: false,
            whitespace: false,
            control: false,
        };
        assert_eq!(off.apply(text), text);
    }
}
