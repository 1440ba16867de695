//! The built-in ops. Each file holds forward and backward side by side.

pub mod attention;
pub mod cast;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub(crate) mod gemm_amx;
pub(crate) mod gemm_bf16;
pub(crate) mod matmul;
pub mod moe;
pub mod norm;
pub mod reduce;
pub(crate) mod shape;
pub mod softmax;
