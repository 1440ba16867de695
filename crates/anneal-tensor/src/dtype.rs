//! Element types a tensor can be stored in.

use std::fmt;

/// The storage type of a tensor's elements.
///
/// Arithmetic always runs in f32: half-precision tensors are widened as a kernel reads them and
/// narrowed as it writes, so `BF16`/`F16` save memory and bandwidth, not instructions (the CPUs we
/// target have no half-precision arithmetic worth using).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// bfloat16: f32's exponent range with an 8-bit mantissa.
    BF16,
    /// IEEE 754 half precision.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The lower-case name used in configs and checkpoints (`f32`, `bf16`, `f16`).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Parses `f32`, `bf16` or `f16`.
    pub fn parse(name: &str) -> Option<DType> {
        match name {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "float16" => Some(DType::F16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
