//! Block-wise dynamic 8-bit quantisation against bitsandbytes' `quantize_blockwise` and
//! `dequantize_blockwise` ops (blocks of 2,048), from `tests/fixtures/quant8.safetensors`
//! (written by `tests/fixtures/make_quant8_fixture.py`): the same map to the bit, the same block
//! maxima and codes as its nearest-code path, the same dequantised values. Its f32 CPU kernel's
//! codes differ where its search cannot reach the codes nearest zero: the fixture holds them too,
//! and the test shows ours reconstruct the input better.

use std::path::Path;

use anneal_tensor::io::load_safetensors;
use anneal_tensor::quant8::{dequantize_blockwise, dynamic_map, quantize_blockwise, BLOCK};

#[test]
fn quantisation_matches_bitsandbytes() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant8.safetensors");
    let fx = load_safetensors(&path).expect("fixture loads");
    let get = |name: &str| fx[name].to_vec_f32();
    let map = dynamic_map();
    let want_map = get("map");
    for (i, (a, b)) in map.iter().zip(&want_map).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "map[{i}]: {a} vs {b}");
    }
    let input = get("input");
    let (codes, absmax) = quantize_blockwise(&input, BLOCK);
    assert_eq!(absmax, get("absmax"));
    let want: Vec<u8> = get("codes").iter().map(|&c| c as u8).collect();
    let differ: Vec<usize> = (0..want.len()).filter(|&i| codes[i] != want[i]).collect();
    assert!(
        differ.is_empty(),
        "{} of {} codes differ, first at {:?}: value {} gives {} vs {}",
        differ.len(),
        want.len(),
        differ.first(),
        differ.first().map_or(0.0, |&i| input[i]),
        differ.first().map_or(0, |&i| codes[i]),
        differ.first().map_or(0, |&i| want[i]),
    );
    let back = dequantize_blockwise(&codes, &absmax, BLOCK);
    let want_back = get("dequantized");
    for (i, (a, b)) in back.iter().zip(&want_back).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "value {i}: {a} vs {b}");
    }
    // The f32 kernel's codes: never closer to the input than the nearest code.
    let kernel: Vec<u8> = get("kernel_codes").iter().map(|&c| c as u8).collect();
    let theirs = dequantize_blockwise(&kernel, &absmax, BLOCK);
    let error = |v: &[f32]| -> f64 {
        v.iter()
            .zip(&input)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum()
    };
    assert!(error(&back) < error(&theirs));
    for ((ours, theirs), x) in back.iter().zip(&theirs).zip(&input) {
        assert!(
            (ours - x).abs() <= (theirs - x).abs(),
            "{x}: {ours} vs {theirs}"
        );
    }
}
