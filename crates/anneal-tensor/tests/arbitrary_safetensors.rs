//! Arbitrary and mutated safetensors bytes (flipped bytes, truncations, forged header lengths,
//! forged shapes and offsets) never panic and never allocate beyond a bound set by their own
//! size: each ends in `Ok` or an error naming the file.

use anneal_tensor::io::{decode_safetensors, encode_safetensors};
use anneal_tensor::{memory_stats, reset_peak_memory, DType, Tensor};
use proptest::prelude::*;

const FILE: &str = "weights.safetensors";

fn valid() -> Vec<u8> {
    let a = Tensor::from_f32((0..12).map(|i| i as f32).collect(), &[3, 4]).unwrap();
    let b = Tensor::from_f32(vec![0.5; 6], &[2, 3])
        .unwrap()
        .to_dtype(DType::BF16);
    encode_safetensors(&[("a".into(), a), ("b.weight".into(), b)]).unwrap()
}

/// Tensor memory is counted process-wide: cases hold this while they run, so that one test's
/// allocations are not counted in another's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes `bytes`, checking the outcome and that tensor memory stayed within four bytes per
/// byte of input (u8 tensors widen to f32).
fn decode_within_bounds(bytes: &[u8]) -> Result<(), TestCaseError> {
    reset_peak_memory();
    let before = memory_stats().live_bytes;
    let result = decode_safetensors(bytes, FILE);
    let grew = memory_stats().peak_bytes.saturating_sub(before);
    prop_assert!(
        grew <= 4 * bytes.len() + 64,
        "{grew} bytes from {} bytes",
        bytes.len()
    );
    if let Err(e) = result {
        prop_assert!(e.to_string().contains(FILE), "{}", e);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_files_end_in_ok_or_an_error_naming_the_file(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let _serial = serial();
        let mut bytes = valid();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        decode_within_bounds(&bytes)?;
    }

    #[test]
    fn forged_headers_end_in_ok_or_an_error_naming_the_file(
        header_len in prop_oneof![any::<u64>(), 0u64..200],
        dtype in prop::sample::select(vec!["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "Q4"]),
        shape in proptest::collection::vec(prop_oneof![0u64..5, any::<u64>()], 0..4),
        start in prop_oneof![0u64..64, any::<u64>()],
        end in prop_oneof![0u64..64, any::<u64>()],
        data_len in 0usize..64,
    ) {
        let _serial = serial();
        let header = format!(
            "{{\"t\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{start},{end}]}}}}"
        );
        let mut bytes = header_len.to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(7u8, data_len));
        decode_within_bounds(&bytes)?;
        // The header's real length, with the forged contents.
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(7u8, data_len));
        decode_within_bounds(&bytes)?;
    }
}
