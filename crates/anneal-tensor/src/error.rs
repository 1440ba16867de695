//! The engine's error type.

use crate::DType;

/// What went wrong in a tensor operation. Each variant carries the offending values so the message
/// says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that had to agree did not.
    #[error("{op}: shape mismatch, {lhs:?} vs {rhs:?}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
    },
    /// A shape was not valid for this operation.
    #[error("{op}: invalid shape {shape:?}: {reason}")]
    BadShape {
        op: &'static str,
        shape: Vec<usize>,
        reason: String,
    },
    /// An axis index was out of range.
    #[error("{op}: axis {axis} out of range for a tensor of rank {rank}")]
    BadAxis {
        op: &'static str,
        axis: isize,
        rank: usize,
    },
    /// Two tensors that had to share a dtype did not.
    #[error("{op}: dtype mismatch, {lhs} vs {rhs}")]
    DTypeMismatch {
        op: &'static str,
        lhs: DType,
        rhs: DType,
    },
    /// An index tensor held a value outside the indexed range.
    #[error("{op}: index {index} out of range 0..{limit}")]
    IndexOutOfRange {
        op: &'static str,
        index: i64,
        limit: usize,
    },
    /// A misuse of autograd, such as calling backward twice through the same graph.
    #[error("autograd: {0}")]
    Autograd(String),
    /// Any other invalid argument.
    #[error("{op}: {reason}")]
    Invalid { op: &'static str, reason: String },
    /// Reading or writing a safetensors file failed.
    #[error("safetensors: {0}")]
    SafeTensors(String),
    /// Reading a GGUF file failed: the message names the file and the field or tensor.
    #[error("gguf: {0}")]
    Gguf(String),
    /// File-system error with the path it concerned.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Result with the engine's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        op,
        reason: reason.into(),
    }
}
