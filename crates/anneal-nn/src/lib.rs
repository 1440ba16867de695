//! # anneal-nn
//!
//! Models built on `anneal-tensor`, written to be read top to bottom. Parameter names follow the
//! Hugging Face checkpoints of each architecture, so weights load and export without renaming.
//!
//! * [`gpt`]: GPT-2 (Radford et al. 2019): learned positions, pre-norm blocks, GELU MLP, tied or
//!   untied output head.

pub mod gpt;

pub use gpt::{Gpt, GptConfig, KvCache};
