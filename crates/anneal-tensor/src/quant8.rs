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

/// The 8-bit format of AdamW's moments ([`crate::optim::MomentDType::Int8`]): the dynamic map
/// over blocks of [`BLOCK`], with two changes from [`quantize_blockwise`] that make it a lossless
/// store for a checkpoint and safe for a second moment:
///
/// - each block's scale is its largest-magnitude value *with its sign*, so that value is the code
///   1.0 exactly (the map has no −1.0) and quantising a block's decoded values gives back the same
///   codes and scale: a checkpoint holds the decoded f32 values and a resumed run re-quantises
///   them into the very state it saved;
/// - with `keep_nonzero` (the second moment), a non-zero value never takes the zero code but the
///   smallest one of its sign, as a second moment read back as 0 beside a non-zero first moment
///   would turn an update into m/ε.
///
/// The nearest code is the number of midpoints between neighbouring codes that lie below the
/// value. A table indexed by the value's top 16 bits holds that count for the least value with
/// those bits; the midpoints are at least 1% apart and such a bucket 0.4% wide, so at most one
/// more midpoint lies below the value: one comparison, no search.
pub struct Quantizer {
    map: [f32; 256],
    /// The largest value taking each code rather than the next (+∞ for the last).
    mids: [f32; 256],
    /// Per top-16-bit pattern of a scaled value, the midpoints below the least value with that
    /// pattern.
    below: Vec<u8>,
    zero: u8,
}

/// The one [`Quantizer`], built on first use.
pub fn quantizer() -> &'static Quantizer {
    static Q: std::sync::OnceLock<Quantizer> = std::sync::OnceLock::new();
    Q.get_or_init(Quantizer::new)
}

impl Default for Quantizer {
    fn default() -> Self {
        Quantizer::new()
    }
}

impl Quantizer {
    /// The signed dynamic map and its lookup table.
    pub fn new() -> Quantizer {
        let map = dynamic_map();
        let mut mids = [f32::INFINITY; 256];
        for (m, pair) in mids.iter_mut().zip(map.windows(2)) {
            // Halfway takes the lower code: the largest x with x − lower <= upper − x in f32 (a
            // monotone test, so a step or two from the computed middle finds it).
            let (lo, hi) = (pair[0], pair[1]);
            let lower_wins = |x: f32| x - lo <= hi - x;
            let mut mid = lo + (hi - lo) / 2.0;
            while !lower_wins(mid) {
                mid = mid.next_down();
            }
            while lower_wins(mid.next_up()) {
                mid = mid.next_up();
            }
            *m = mid;
        }
        let below = (0..=u16::MAX)
            .map(|h| {
                // The least value whose top 16 bits are `h`: the pattern itself when positive,
                // the next pattern's magnitude when negative.
                let least = if h & 0x8000 == 0 {
                    f32::from_bits((h as u32) << 16)
                } else {
                    -f32::from_bits(((h as u32 & 0x7fff) + 1) << 16)
                };
                if least.is_nan() {
                    return 255;
                }
                mids.partition_point(|&m| m < least).min(255) as u8
            })
            .collect();
        let zero = map
            .iter()
            .position(|&c| c == 0.0)
            .expect("the map holds zero") as u8;
        Quantizer {
            map,
            mids,
            below,
            zero,
        }
    }

    /// The code nearest `x` in [-1, 1] (halfway takes the lower), as a binary search would find.
    #[inline(always)]
    fn nearest(&self, x: f32) -> u8 {
        // SAFETY: the table has an entry for every 16-bit pattern, each at most 255.
        unsafe {
            let c = *self.below.get_unchecked((x.to_bits() >> 16) as usize);
            c + u8::from(*self.mids.get_unchecked(c as usize) < x)
        }
    }

    /// Quantises one block of `values` into `codes` and returns its scale.
    pub fn encode(&self, values: &[f32], codes: &mut [u8], keep_nonzero: bool) -> f32 {
        // The largest magnitude in a pass that vectorises, then the first value holding it.
        let max = values
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m { v.abs() } else { m });
        let scale = values
            .iter()
            .copied()
            .find(|v| v.abs() == max)
            .unwrap_or(0.0);
        if scale == 0.0 {
            codes.fill(self.zero);
            return 0.0;
        }
        let inv = 1.0 / scale;
        if inv.is_finite() {
            for (q, &v) in codes.iter_mut().zip(values) {
                *q = self.nearest((v * inv).clamp(-1.0, 1.0));
            }
        } else {
            // A subnormal scale: divide instead.
            for (q, &v) in codes.iter_mut().zip(values) {
                *q = self.nearest((v / scale).clamp(-1.0, 1.0));
            }
        }
        if keep_nonzero {
            let (below, above) = (self.zero - 1, self.zero + 1);
            for (q, &v) in codes.iter_mut().zip(values) {
                if *q == self.zero && v != 0.0 {
                    *q = if (v > 0.0) == (scale > 0.0) {
                        above
                    } else {
                        below
                    };
                }
            }
        }
        scale
    }

    /// The values one block's `codes` stand for at `scale`.
    pub fn decode(&self, codes: &[u8], scale: f32, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(codes) {
            *o = self.map[q as usize] * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_finds_the_code_a_binary_search_finds() {
        let q = Quantizer::new();
        let map = dynamic_map();
        let mut x = 0x1234_5678u32;
        for i in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = match i % 3 {
                0 => (x as f32 / u32::MAX as f32) * 2.0 - 1.0,
                1 => ((x as f32 / u32::MAX as f32) - 0.5) * 1e-4,
                _ => map[(x % 256) as usize] + ((x >> 8) as f32 / u32::MAX as f32 - 0.5) * 1e-7,
            }
            .clamp(-1.0, 1.0);
            let upper = map.partition_point(|&c| c < v).min(255);
            let want = if upper == 0 {
                0
            } else if v - map[upper - 1] <= map[upper] - v {
                upper - 1
            } else {
                upper
            };
            assert_eq!(q.nearest(v) as usize, want, "{v}");
        }
    }

    #[test]
    fn decoded_blocks_quantise_back_to_the_same_codes_and_scale() {
        let q = Quantizer::new();
        let mut x = 99u32;
        for keep in [false, true] {
            let values: Vec<f32> = (0..BLOCK)
                .map(|i| {
                    x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                    let u = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                    let v = u * 10f32.powi(-((i % 9) as i32));
                    if keep {
                        v * v
                    } else if i == 7 {
                        -3.0
                    } else {
                        v
                    }
                })
                .collect();
            let mut codes = vec![0u8; BLOCK];
            let scale = q.encode(&values, &mut codes, keep);
            assert_eq!(
                scale,
                if keep {
                    values.iter().fold(0.0, |m: f32, &v| m.max(v))
                } else {
                    -3.0
                }
            );
            let mut back = vec![0.0; BLOCK];
            q.decode(&codes, scale, &mut back);
            if keep {
                assert!(values
                    .iter()
                    .zip(&back)
                    .all(|(&v, &b)| (v == 0.0) == (b == 0.0)));
            }
            let mut again = vec![0u8; BLOCK];
            assert_eq!(q.encode(&back, &mut again, keep), scale);
            assert_eq!(again, codes);
        }
    }

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
