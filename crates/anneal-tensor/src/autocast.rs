//! The engine's mixed-precision policy (autocast), as one table: for each kind of op, the
//! precision its arithmetic runs in and the dtype its output is stored in when its input is
//! bf16 or f16. Every op accumulates in f32. Products and attention's blocks with bf16 operands
//! multiply in bf16 where the CPU has bf16 arithmetic (AMX tiles or AVX512-BF16, chosen by
//! [`crate::backend`]; an f32 operand beside them is rounded to bf16 as it is packed), and widen
//! to f32 elsewhere; every other op reads 16-bit values widened to f32. What differs is whether an
//! output is rounded back to the input's 16 bits, or kept in f32 because what follows needs its
//! range or precision (Micikevicius et al. 2018, "Mixed Precision Training", §3.3: reductions,
//! normalisation statistics and losses in f32).
//!
//! | kind | ops | arithmetic | output under 16-bit input | why |
//! |---|---|---|---|---|
//! | products | matmul, linear, gelu_linear, MoE expert products | bf16 products (bf16 kernels) or f32, f32 accumulation | 16-bit | the bulk of the bytes; one rounding per output |
//! | attention | fused attention | block products as above; f32 scores, softmax and log-sum-exp | 16-bit (log-sum-exp f32) | probabilities never stored |
//! | norms | layer_norm, rms_norm | f32 statistics (mean, 1/σ kept f32) | 16-bit | the input of a product |
//! | elementwise | add, mul, GELU, dropout, embedding | f32 | 16-bit | one rounding, as a store |
//! | softmax | softmax, log_softmax, logsumexp | f32 | f32 | probabilities near 0 and 1 lose their digits in 16 bits |
//! | losses | cross_entropy | f32, f64 sums | f32 | the value optimised and logged |
//! | reductions | sum, mean | f32 | f32 | sums of many 16-bit values exceed their precision |
//! | router | MoE router logits and probabilities | f32 (its input cast up) | f32 | top-k choices flip on rounding |
//!
//! The optimizer keeps an f32 master copy of 16-bit weights ([`crate::optim`]), or rounds
//! stochastically into bf16 when asked to keep none.

use crate::DType;

/// The kinds of op of the table above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Matrix products.
    Product,
    /// Fused attention.
    Attention,
    /// Normalisation layers.
    Norm,
    /// Elementwise ops and lookups.
    Elementwise,
    /// Softmax and its relatives.
    Softmax,
    /// Losses.
    Loss,
    /// Sums and means.
    Reduction,
    /// A Mixture-of-Experts router.
    Router,
}

/// Where an op's output is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// In its input's dtype.
    Input,
    /// In f32 whatever its input.
    F32,
}

/// The table: each kind's output storage.
pub const TABLE: [(Kind, Output); 8] = [
    (Kind::Product, Output::Input),
    (Kind::Attention, Output::Input),
    (Kind::Norm, Output::Input),
    (Kind::Elementwise, Output::Input),
    (Kind::Softmax, Output::F32),
    (Kind::Loss, Output::F32),
    (Kind::Reduction, Output::F32),
    (Kind::Router, Output::F32),
];

/// The dtype an op of `kind` stores its output in, given its input's.
pub fn output_dtype(kind: Kind, input: DType) -> DType {
    let (_, output) = TABLE
        .iter()
        .find(|(k, _)| *k == kind)
        .expect("every kind is in the table");
    match output {
        Output::Input => input,
        Output::F32 => DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    #[test]
    fn sixteen_bit_inputs_keep_softmax_losses_and_sums_in_f32_and_the_rest_in_sixteen_bits() {
        for dtype in [DType::BF16, DType::F16] {
            let x = Tensor::from_f32(vec![0.5, -1.0, 2.0, 0.25, 1.5, -0.75], &[2, 3])
                .unwrap()
                .to_dtype(dtype);
            let w = Tensor::ones(&[3], DType::F32).to_dtype(dtype);
            assert_eq!(x.softmax().unwrap().dtype(), DType::F32);
            assert_eq!(x.logsumexp().unwrap().dtype(), DType::F32);
            assert_eq!(x.sum_all().unwrap().dtype(), DType::F32);
            assert_eq!(x.mean_all().unwrap().dtype(), DType::F32);
            let ce = x.cross_entropy(&[0, 2], Default::default()).unwrap();
            assert_eq!(ce.dtype(), DType::F32);
            assert_eq!(x.layer_norm(&w, None, 1e-5).unwrap().dtype(), dtype);
            assert_eq!(
                x.matmul(&x.transpose(0, 1).unwrap()).unwrap().dtype(),
                dtype
            );
            assert_eq!(x.add(&x).unwrap().dtype(), dtype);
            for (kind, _) in TABLE {
                assert_eq!(output_dtype(kind, DType::F32), DType::F32, "{kind:?}");
            }
        }
    }
}
