//! Block-wise dynamic 8-bit quantisation, the format of 8-bit optimizer states (Dettmers et al.
//! 2022, "8-bit Optimizers via Block-wise Quantization", §2): values are cut into blocks (2,048
//! for the optimizer states), each block is scaled by its largest magnitude into [-1, 1], and each
//! scaled value is stored as the index of the nearest of 256 code values.
//!
//! The code values are the signed dynamic tree map (Dettmers 2016, "8-Bit Approximations for
//! Parallelism in Deep Learning"): after the sign, a run of zero bits gives a decimal exponent
//! from 10⁻⁶ to 10⁰ and the remaining bits a linear fraction in [0.1, 1], so small magnitudes keep
//! relative precision (optimizer moments span many orders of magnitude within a block) while the
//! largest keep 6 bits of fraction. Exactly 0 and 1 are codes, so a block's maximum and zeros are
//! kept exactly.
//!
//! Quantisation matches bitsandbytes' `quantize_blockwise` (its nearest-code path) code for code,
//! and dequantisation its `dequantize_blockwise` bit for bit, on the fixture in
//! `tests/fixtures/quant8.safetensors`.

/// Values per block of the optimizer states (8-bit Adam's).
pub const BLOCK: usize = 2048;

/// The 256 code values of the signed dynamic map, ascending.
pub fn dynamic_map() -> [f32; 256] {
    let mut values = Vec::with_capacity(256);
    // Exponent 10^(i−6) carries 2^i fraction steps (one more bit of fraction per larger exponent).
    for i in 0..7 {
        let bounds = linspace(0.1, 1.0, (1 << i) + 1);
        let scale = 10f64.powi(i - 6) as f32;
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            values.push(-(scale * mean));
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    values.try_into().expect("254 fraction codes, zero and one")
}

/// `steps` values from `start` to `end` in f32, each from the nearer end with one rounding (a
/// fused multiply-add, as `torch.linspace` computes them, so the map's values are bitsandbytes'
/// to the bit).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The index of the code nearest `x` (in [-1, 1]); a value halfway between two codes takes the
/// lower one.
fn nearest(map: &[f32; 256], x: f64) -> u8 {
    let upper = map.partition_point(|&c| (c as f64) < x).min(255);
    if upper == 0 {
        return 0;
    }
    let lower = upper - 1;
    if (x - map[lower] as f64).abs() <= (map[upper] as f64 - x).abs() {
        lower as u8
    } else {
        upper as u8
    }
}

/// `values` quantised in blocks of `block`: one code per value and each block's largest
/// magnitude (the last block may be shorter). Each value is scaled by its block's maximum in f64
/// and takes the nearest code (bitsandbytes' definition; its f32 CPU kernel, whose search never
/// reaches the codes nearest zero, differs). A block of zeros is stored as zeros.
pub fn quantize_blockwise(values: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let map = dynamic_map();
    let zero = nearest(&map, 0.0);
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block.max(1)) {
        let max = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        if max == 0.0 {
            codes.extend(std::iter::repeat_n(zero, chunk.len()));
            continue;
        }
        let inv = 1.0 / max as f64;
        codes.extend(
            chunk
                .iter()
                .map(|&v| nearest(&map, (v as f64 * inv).clamp(-1.0, 1.0))),
        );
    }
    (codes, absmax)
}

/// The values `codes` stand for: each code's map value times its block's `absmax`.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], block: usize) -> Vec<f32> {
    let map = dynamic_map();
    codes
        .chunks(block.max(1))
        .zip(absmax)
        .flat_map(|(chunk, &max)| chunk.iter().map(move |&q| map[q as usize] * max))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_ascends_through_zero_to_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert!(map.contains(&0.0) && map.contains(&1.0));
        // The smallest magnitude is the middle of 10⁻⁶'s single fraction step, [0.1, 1].
        let smallest = map
            .iter()
            .filter(|&&c| c > 0.0)
            .fold(1.0f32, |m, &c| m.min(c));
        assert!((smallest - 0.55e-6).abs() < 1e-12, "{smallest}");
    }

    #[test]
    fn maxima_zeros_and_zero_blocks_come_back_exactly_and_the_rest_within_the_map_s_step() {
        let mut values: Vec<f32> = (0..5000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        values[10] = 3.0;
        values[2 * BLOCK..].fill(0.0);
        let (codes, absmax) = quantize_blockwise(&values, BLOCK);
        assert_eq!(absmax, vec![3.0, 0.05, 0.0]);
        let back = dequantize_blockwise(&codes, &absmax, BLOCK);
        assert_eq!(back[10], 3.0);
        assert!(back[2 * BLOCK..].iter().all(|&v| v == 0.0));
        for (i, (b, v)) in back.iter().zip(&values).enumerate() {
            // The widest gap between codes, near the top, is 0.9/64 of the block's maximum.
            let max = absmax[i / BLOCK];
            assert!((b - v).abs() <= 0.0075 * max, "{v} came back as {b}");
        }
    }
}
