//! Seeded image augmentations for the image objectives, on `[channels, height, width]` images
//! with values in [0, 1] (0 is the background of MNIST and Fashion-MNIST).
//!
//! Every augmentation draws from an [`AugmentRng`] the caller seeds (from the run's seed, the
//! step and the example's place in the batch), so a run draws the same views whatever its
//! layout, and a resumed run draws the views the uninterrupted run would have.
//!
//! * [`Pipeline::weak`]: FixMatch's weak view (Sohn et al. 2020 §2.3): a horizontal flip (where
//!   the data allows one) and a translation by up to 12.5% of the side.
//! * [`Pipeline::strong`]: FixMatch's strong view: the weak one, then RandAugment (Cubuk et al.
//!   2020) with two operations at a magnitude drawn at random for each (FixMatch's variant, §2.3
//!   and appendix D), then Cutout (DeVries & Taylor 2017).
//! * [`Pipeline::contrastive`]: a MoCo v3 view (Chen, Xie & He 2021, after BYOL's
//!   augmentations), kept to what a grey-level image has: random resized crop (scale 0.2–1),
//!   flip, brightness and contrast jitter, Gaussian blur, solarisation.
//! * [`Pipeline::supervised`]: random crop with padding and flip, with random erasing (Zhong
//!   et al. 2020).
//!
//! The deterministic transforms that test robustness to distribution shift (ObjectNet's rotated,
//! occluded and re-framed objects; Barbu et al. 2019) are [`rotate`], [`occlude`] and
//! [`reframe`].

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The shape of one image: channels, rows, columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Channels.
    pub c: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
}

impl Dims {
    /// Values per image.
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Whether an image of this shape holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The random numbers an augmentation draws, from a seed.
pub struct AugmentRng(ChaCha8Rng);

impl AugmentRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> AugmentRng {
        AugmentRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u = self.unit().max(1e-7);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }

    /// +1 or −1 with equal chance.
    pub fn sign(&mut self) -> f32 {
        if self.chance(0.5) {
            1.0
        } else {
            -1.0
        }
    }
}

/// One augmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augment {
    /// Mirrors left to right with probability `p`.
    Flip {
        /// Probability.
        p: f32,
    },
    /// Pads by `pad` zero pixels on every side and crops the original size back at a random
    /// offset: a translation by up to `pad` pixels each way.
    CropPad {
        /// Pixels of padding.
        pad: usize,
    },
    /// Crops a random box of `scale` × the area with aspect ratio in `ratio` (drawn
    /// log-uniformly) and resizes it back to the full image (Szegedy et al. 2015, as
    /// torchvision's `RandomResizedCrop`).
    ResizedCrop {
        /// Share of the area, lowest and highest.
        scale: (f32, f32),
        /// Aspect ratio (width / height), lowest and highest.
        ratio: (f32, f32),
    },
    /// Adds Normal(0, std²) noise to every value, then clamps to [0, 1].
    Noise {
        /// Standard deviation.
        std: f32,
    },
    /// With probability `p`, fills a random box of `scale` × the area (aspect ratio in 0.3–3.3)
    /// with uniform noise (random erasing, Zhong et al. 2020).
    Erase {
        /// Probability.
        p: f32,
        /// Share of the area, lowest and highest.
        scale: (f32, f32),
    },
    /// With probability `p`, scales brightness and contrast by factors in 1 ± `brightness`
    /// and 1 ± `contrast`.
    Jitter {
        /// Probability.
        p: f32,
        /// Largest brightness change.
        brightness: f32,
        /// Largest contrast change.
        contrast: f32,
    },
    /// With probability `p`, a Gaussian blur with σ (in pixels) drawn from `sigma`.
    Blur {
        /// Probability.
        p: f32,
        /// σ, lowest and highest.
        sigma: (f32, f32),
    },
    /// With probability `p`, inverts every value at or above 0.5.
    Solarize {
        /// Probability.
        p: f32,
    },
    /// RandAugment: `n` operations drawn uniformly from [`RAND_AUGMENT_OPS`], each at a magnitude
    /// drawn uniformly in (0, 1] (FixMatch's variant).
    RandAugment {
        /// Operations applied.
        n: usize,
    },
    /// Cutout: a square of side up to `max_side` × the image side, at a random centre, filled
    /// with grey (0.5).
    Cutout {
        /// Largest side, as a share of the image side.
        max_side: f32,
    },
}

/// The operations RandAugment draws from (FixMatch's list, less those that need colour).
pub const RAND_AUGMENT_OPS: [&str; 13] = [
    "identity",
    "autocontrast",
    "brightness",
    "contrast",
    "equalize",
    "posterize",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
];

/// A sequence of augmentations applied in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline {
    /// The augmentations.
    pub ops: Vec<Augment>,
}

impl Pipeline {
    /// No augmentation.
    pub fn none() -> Pipeline {
        Pipeline::default()
    }

    /// FixMatch's weak view: a flip (when `flip`; a mirrored digit is another glyph) and a
    /// translation by up to 12.5% of the side.
    pub fn weak(dims: Dims, flip: bool) -> Pipeline {
        Pipeline::weak_padded(Pipeline::paper_pad(dims), flip)
    }

    /// The paper's crop padding for a weak view: 12.5% of the side (4 pixels on CIFAR's 32).
    pub fn paper_pad(dims: Dims) -> usize {
        (dims.h.max(dims.w) as f32 * 0.125).round() as usize
    }

    /// A weak view with crop padding `pad`: flip where allowed, then the shifted crop.
    pub fn weak_padded(pad: usize, flip: bool) -> Pipeline {
        let mut ops = Vec::new();
        if flip {
            ops.push(Augment::Flip { p: 0.5 });
        }
        ops.push(Augment::CropPad { pad });
        Pipeline { ops }
    }

    /// FixMatch's strong view: the weak view, RandAugment with two operations, Cutout of up to
    /// half the side.
    pub fn strong(dims: Dims, flip: bool) -> Pipeline {
        Pipeline::strong_from(Pipeline::weak(dims, flip), 0.5)
    }

    /// A strong view built on `weak`: RandAugment with two operations, then Cutout of up to
    /// `cutout` × the side.
    pub fn strong_from(weak: Pipeline, cutout: f32) -> Pipeline {
        let mut p = weak;
        p.ops.push(Augment::RandAugment { n: 2 });
        p.ops.push(Augment::Cutout { max_side: cutout });
        p
    }

    /// A contrastive view (MoCo v3's augmentations for grey-level images).
    pub fn contrastive(flip: bool) -> Pipeline {
        let mut ops = vec![Augment::ResizedCrop {
            scale: (0.2, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        }];
        if flip {
            ops.push(Augment::Flip { p: 0.5 });
        }
        ops.extend([
            Augment::Jitter {
                p: 0.8,
                brightness: 0.4,
                contrast: 0.4,
            },
            Augment::Blur {
                p: 0.5,
                sigma: (0.1, 1.0),
            },
            Augment::Solarize { p: 0.2 },
        ]);
        Pipeline { ops }
    }

    /// Supervised training's augmentation: crop with padding 2, flip (when `flip`), random
    /// erasing with probability 0.25.
    pub fn supervised(flip: bool) -> Pipeline {
        let mut ops = vec![Augment::CropPad { pad: 2 }];
        if flip {
            ops.push(Augment::Flip { p: 0.5 });
        }
        ops.push(Augment::Erase {
            p: 0.25,
            scale: (0.02, 0.2),
        });
        Pipeline { ops }
    }

    /// Applies the pipeline to `image` in place.
    pub fn apply(&self, image: &mut [f32], dims: Dims, rng: &mut AugmentRng) {
        debug_assert_eq!(image.len(), dims.len());
        for op in &self.ops {
            apply_one(*op, image, dims, rng);
        }
    }
}

fn apply_one(op: Augment, image: &mut [f32], d: Dims, rng: &mut AugmentRng) {
    match op {
        Augment::Flip { p } => {
            if rng.chance(p) {
                for row in image.chunks_mut(d.w) {
                    row.reverse();
                }
            }
        }
        Augment::CropPad { pad } => {
            let dx = rng.below(2 * pad + 1) as f32 - pad as f32;
            let dy = rng.below(2 * pad + 1) as f32 - pad as f32;
            warp(image, d, [1.0, 0.0, dx, 0.0, 1.0, dy], Sampling::Nearest);
        }
        Augment::ResizedCrop { scale, ratio } => {
            let (bw, bh) = random_box(d, scale, ratio, rng);
            let x0 = rng.uniform(0.0, (d.w as f32 - bw).max(0.0));
            let y0 = rng.uniform(0.0, (d.h as f32 - bh).max(0.0));
            // Output pixel centre (x + ½) maps to x0 + (x + ½)·bw/W inside the box.
            let (sx, sy) = (bw / d.w as f32, bh / d.h as f32);
            let m = [sx, 0.0, x0 + 0.5 * sx - 0.5, 0.0, sy, y0 + 0.5 * sy - 0.5];
            warp(image, d, m, Sampling::Bilinear);
        }
        Augment::Noise { std } => {
            for v in image.iter_mut() {
                *v = (*v + std * rng.normal()).clamp(0.0, 1.0);
            }
        }
        Augment::Erase { p, scale } => {
            if rng.chance(p) {
                let (bw, bh) = random_box(d, scale, (0.3, 3.3), rng);
                let (bw, bh) = (bw.round() as usize, bh.round() as usize);
                let x0 = rng.below(d.w - bw.min(d.w) + 1);
                let y0 = rng.below(d.h - bh.min(d.h) + 1);
                for c in 0..d.c {
                    for y in y0..(y0 + bh).min(d.h) {
                        for x in x0..(x0 + bw).min(d.w) {
                            image[(c * d.h + y) * d.w + x] = rng.unit();
                        }
                    }
                }
            }
        }
        Augment::Jitter {
            p,
            brightness,
            contrast,
        } => {
            if rng.chance(p) {
                let b = 1.0 + rng.uniform(-brightness, brightness);
                let c = 1.0 + rng.uniform(-contrast, contrast);
                scale_brightness(image, b);
                scale_contrast(image, c);
            }
        }
        Augment::Blur { p, sigma } => {
            if rng.chance(p) {
                gaussian_blur(image, d, rng.uniform(sigma.0, sigma.1));
            }
        }
        Augment::Solarize { p } => {
            if rng.chance(p) {
                solarize(image, 0.5);
            }
        }
        Augment::RandAugment { n } => {
            for _ in 0..n {
                let op = rng.below(RAND_AUGMENT_OPS.len());
                let m = 1.0 - rng.unit(); // (0, 1]
                rand_augment_op(op, m, image, d, rng);
            }
        }
        Augment::Cutout { max_side } => {
            let side = (rng.uniform(0.0, max_side) * d.h.min(d.w) as f32).round() as isize;
            let cx = rng.below(d.w) as isize;
            let cy = rng.below(d.h) as isize;
            fill_square(image, d, cx, cy, side, 0.5);
        }
    }
}

/// A box of `scale` × the area with aspect ratio drawn log-uniformly in `ratio`, as
/// (width, height) in pixels, no larger than the image.
fn random_box(d: Dims, scale: (f32, f32), ratio: (f32, f32), rng: &mut AugmentRng) -> (f32, f32) {
    let area = (d.h * d.w) as f32 * rng.uniform(scale.0, scale.1);
    let r = rng.uniform(ratio.0.ln(), ratio.1.ln()).exp();
    let w = (area * r).sqrt().min(d.w as f32).max(1.0);
    let h = (area / r).sqrt().min(d.h as f32).max(1.0);
    (w, h)
}

/// One RandAugment operation (index into [`RAND_AUGMENT_OPS`]) at magnitude `m` in (0, 1].
fn rand_augment_op(op: usize, m: f32, image: &mut [f32], d: Dims, rng: &mut AugmentRng) {
    match RAND_AUGMENT_OPS[op] {
        "identity" => {}
        "autocontrast" => autocontrast(image, d),
        "brightness" => scale_brightness(image, 1.0 + rng.sign() * 0.9 * m),
        "contrast" => scale_contrast(image, 1.0 + rng.sign() * 0.9 * m),
        "equalize" => equalize(image, d),
        "posterize" => posterize(image, 8 - (4.0 * m).round() as u32),
        "rotate" => {
            let angle = rng.sign() * 30.0 * m;
            warp(image, d, rotation(d, angle), Sampling::Bilinear);
        }
        "sharpness" => sharpen(image, d, 1.0 + rng.sign() * 0.9 * m),
        "shear_x" => {
            let s = rng.sign() * 0.3 * m;
            let cy = (d.h as f32 - 1.0) / 2.0;
            warp(
                image,
                d,
                [1.0, s, -s * cy, 0.0, 1.0, 0.0],
                Sampling::Bilinear,
            );
        }
        "shear_y" => {
            let s = rng.sign() * 0.3 * m;
            let cx = (d.w as f32 - 1.0) / 2.0;
            warp(
                image,
                d,
                [1.0, 0.0, 0.0, s, 1.0, -s * cx],
                Sampling::Bilinear,
            );
        }
        "solarize" => solarize(image, 1.0 - m),
        "translate_x" => {
            let t = rng.sign() * 0.3 * m * d.w as f32;
            warp(image, d, [1.0, 0.0, t, 0.0, 1.0, 0.0], Sampling::Bilinear);
        }
        "translate_y" => {
            let t = rng.sign() * 0.3 * m * d.h as f32;
            warp(image, d, [1.0, 0.0, 0.0, 0.0, 1.0, t], Sampling::Bilinear);
        }
        other => unreachable!("RandAugment op {other} without an implementation"),
    }
}

/// How [`warp`] reads between pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sampling {
    Nearest,
    Bilinear,
}

/// Resamples `image` so that output pixel (x, y) takes the source value at
/// (m0·x + m1·y + m2, m3·x + m4·y + m5); outside the source reads 0.
fn warp(image: &mut [f32], d: Dims, m: [f32; 6], sampling: Sampling) {
    let src = image.to_vec();
    let at = |c: usize, y: isize, x: isize| -> f32 {
        if y < 0 || x < 0 || y >= d.h as isize || x >= d.w as isize {
            0.0
        } else {
            src[(c * d.h + y as usize) * d.w + x as usize]
        }
    };
    for c in 0..d.c {
        for y in 0..d.h {
            for x in 0..d.w {
                let (xf, yf) = (x as f32, y as f32);
                let sx = m[0] * xf + m[1] * yf + m[2];
                let sy = m[3] * xf + m[4] * yf + m[5];
                image[(c * d.h + y) * d.w + x] = match sampling {
                    Sampling::Nearest => at(c, sy.round() as isize, sx.round() as isize),
                    Sampling::Bilinear => {
                        let (x0, y0) = (sx.floor(), sy.floor());
                        let (fx, fy) = (sx - x0, sy - y0);
                        let (x0, y0) = (x0 as isize, y0 as isize);
                        (1.0 - fy) * ((1.0 - fx) * at(c, y0, x0) + fx * at(c, y0, x0 + 1))
                            + fy * ((1.0 - fx) * at(c, y0 + 1, x0) + fx * at(c, y0 + 1, x0 + 1))
                    }
                };
            }
        }
    }
}

/// The [`warp`] matrix of a rotation by `degrees` (counter-clockwise as seen) about the centre.
fn rotation(d: Dims, degrees: f32) -> [f32; 6] {
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = ((d.w as f32 - 1.0) / 2.0, (d.h as f32 - 1.0) / 2.0);
    // Source = R⁻¹·(out − centre) + centre, with image y pointing down.
    [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy]
}

fn scale_brightness(image: &mut [f32], factor: f32) {
    for v in image.iter_mut() {
        *v = (*v * factor).clamp(0.0, 1.0);
    }
}

fn scale_contrast(image: &mut [f32], factor: f32) {
    let mean = image.iter().sum::<f32>() / image.len().max(1) as f32;
    for v in image.iter_mut() {
        *v = (mean + (*v - mean) * factor).clamp(0.0, 1.0);
    }
}

fn solarize(image: &mut [f32], threshold: f32) {
    for v in image.iter_mut() {
        if *v >= threshold {
            *v = 1.0 - *v;
        }
    }
}

fn posterize(image: &mut [f32], bits: u32) {
    let keep = !((1u32 << (8 - bits.clamp(1, 8))) - 1) & 0xff;
    for v in image.iter_mut() {
        *v = ((*v * 255.0).round() as u32 & keep) as f32 / 255.0;
    }
}

/// Stretches each channel's values to span [0, 1].
fn autocontrast(image: &mut [f32], d: Dims) {
    for plane in image.chunks_mut(d.h * d.w) {
        let lo = plane.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = plane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if hi - lo > 1e-6 {
            for v in plane.iter_mut() {
                *v = (*v - lo) / (hi - lo);
            }
        }
    }
}

/// Histogram equalisation of each channel over 256 levels.
fn equalize(image: &mut [f32], d: Dims) {
    for plane in image.chunks_mut(d.h * d.w) {
        let mut hist = [0usize; 256];
        for &v in plane.iter() {
            hist[(v.clamp(0.0, 1.0) * 255.0).round() as usize] += 1;
        }
        let mut cdf = [0usize; 256];
        let mut run = 0;
        for (c, h) in cdf.iter_mut().zip(hist) {
            run += h;
            *c = run;
        }
        let first = cdf.iter().copied().find(|&c| c > 0).unwrap_or(0);
        let span = (plane.len() - first).max(1) as f32;
        for v in plane.iter_mut() {
            let level = (v.clamp(0.0, 1.0) * 255.0).round() as usize;
            *v = (cdf[level] - first) as f32 / span;
        }
    }
}

/// Blends with a 3×3 smoothed copy: factor 1 is the image, 0 the smoothed one, above 1 sharper
/// (PIL's `ImageEnhance.Sharpness`).
fn sharpen(image: &mut [f32], d: Dims, factor: f32) {
    let src = image.to_vec();
    for c in 0..d.c {
        for y in 1..d.h.saturating_sub(1) {
            for x in 1..d.w.saturating_sub(1) {
                let at = |yy: usize, xx: usize| src[(c * d.h + yy) * d.w + xx];
                let mut sum = 0.0;
                for yy in y - 1..=y + 1 {
                    for xx in x - 1..=x + 1 {
                        sum += at(yy, xx);
                    }
                }
                // PIL's smoothing kernel: centre 5, the rest 1, over 13.
                let smooth = (sum + 4.0 * at(y, x)) / 13.0;
                let i = (c * d.h + y) * d.w + x;
                image[i] = (smooth + (src[i] - smooth) * factor).clamp(0.0, 1.0);
            }
        }
    }
}

/// A separable Gaussian blur with standard deviation `sigma` pixels (zero outside).
fn gaussian_blur(image: &mut [f32], d: Dims, sigma: f32) {
    let radius = (3.0 * sigma).ceil().max(1.0) as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let pass = |src: &[f32], dst: &mut [f32], horizontal: bool| {
        for c in 0..d.c {
            for y in 0..d.h {
                for x in 0..d.w {
                    let mut acc = 0.0;
                    for (k, &wk) in kernel.iter().enumerate() {
                        let o = k as isize - radius;
                        let (yy, xx) = if horizontal {
                            (y as isize, x as isize + o)
                        } else {
                            (y as isize + o, x as isize)
                        };
                        if yy >= 0 && xx >= 0 && (yy as usize) < d.h && (xx as usize) < d.w {
                            acc += wk * src[(c * d.h + yy as usize) * d.w + xx as usize];
                        }
                    }
                    dst[(c * d.h + y) * d.w + x] = acc;
                }
            }
        }
    };
    let mut tmp = vec![0.0; image.len()];
    pass(image, &mut tmp, true);
    pass(&tmp, image, false);
}

/// Fills a square of `side` centred at (cx, cy), clipped to the image, with `value`.
fn fill_square(image: &mut [f32], d: Dims, cx: isize, cy: isize, side: isize, value: f32) {
    let (lo_x, lo_y) = ((cx - side / 2).max(0), (cy - side / 2).max(0));
    let hi_x = (cx - side / 2 + side).min(d.w as isize);
    let hi_y = (cy - side / 2 + side).min(d.h as isize);
    for c in 0..d.c {
        for y in lo_y..hi_y {
            for x in lo_x..hi_x {
                image[(c * d.h + y as usize) * d.w + x as usize] = value;
            }
        }
    }
}

/// `image` rotated by `degrees` about its centre (bilinear; the corners fill with 0).
pub fn rotate(image: &mut [f32], dims: Dims, degrees: f32) {
    warp(image, dims, rotation(dims, degrees), Sampling::Bilinear);
}

/// `image` with a square of `area` × its area blanked (0) at a position drawn from `seed`.
pub fn occlude(image: &mut [f32], dims: Dims, area: f32, seed: u64) {
    let side = (area * (dims.h * dims.w) as f32).sqrt().round() as isize;
    let mut rng = AugmentRng::new(seed);
    let x0 = rng.below((dims.w as isize - side).max(0) as usize + 1) as isize;
    let y0 = rng.below((dims.h as isize - side).max(0) as usize + 1) as isize;
    fill_square(image, dims, x0 + side / 2, y0 + side / 2, side, 0.0);
}

/// `image` re-framed: scaled by `scale` about its centre, then shifted by (`dx`, `dy`) shares
/// of its side (bilinear; what leaves the frame is lost, what enters is 0).
pub fn reframe(image: &mut [f32], dims: Dims, scale: f32, dx: f32, dy: f32) {
    let (cx, cy) = ((dims.w as f32 - 1.0) / 2.0, (dims.h as f32 - 1.0) / 2.0);
    let (tx, ty) = (dx * dims.w as f32, dy * dims.h as f32);
    // out = scale·(src − c) + c + t  ⇒  src = (out − c − t)/scale + c.
    let inv = 1.0 / scale;
    let m = [
        inv,
        0.0,
        cx - (cx + tx) * inv,
        0.0,
        inv,
        cy - (cy + ty) * inv,
    ];
    warp(image, dims, m, Sampling::Bilinear);
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Dims = Dims { c: 1, h: 8, w: 8 };

    fn ramp() -> Vec<f32> {
        (0..64)
            .map(|i| (i % 8) as f32 / 7.0 * ((i / 8) as f32 / 7.0))
            .collect()
    }

    fn all_pipelines() -> Vec<Pipeline> {
        vec![
            Pipeline::weak(D, true),
            Pipeline::strong(D, true),
            Pipeline::contrastive(true),
            Pipeline::supervised(true),
            Pipeline {
                ops: vec![Augment::Noise { std: 0.1 }],
            },
        ]
    }

    #[test]
    fn same_seed_same_view_other_seed_other_view() {
        for p in all_pipelines() {
            let view = |seed| {
                let mut img = ramp();
                p.apply(&mut img, D, &mut AugmentRng::new(seed));
                img
            };
            assert_eq!(view(7), view(7), "{p:?}");
            assert!(
                (0..20).any(|s| view(s) != view(s + 100)),
                "{p:?} never changes the image"
            );
            for s in 0..20 {
                assert!(view(s).iter().all(|v| (0.0..=1.0).contains(v)), "{p:?}");
            }
        }
    }

    #[test]
    fn every_rand_augment_op_keeps_values_in_range_and_identity_keeps_the_image() {
        for op in 0..RAND_AUGMENT_OPS.len() {
            for m in [0.1, 0.5, 1.0] {
                let mut img = ramp();
                rand_augment_op(op, m, &mut img, D, &mut AugmentRng::new(3));
                assert!(
                    img.iter()
                        .all(|v| v.is_finite() && (-1e-6..=1.0 + 1e-6).contains(v)),
                    "{} at {m}: {img:?}",
                    RAND_AUGMENT_OPS[op]
                );
            }
        }
        let mut img = ramp();
        rand_augment_op(0, 1.0, &mut img, D, &mut AugmentRng::new(3));
        assert_eq!(img, ramp());
    }

    #[test]
    fn geometric_transforms_move_pixels_as_stated() {
        // A single lit pixel right of centre of a 9×9 image.
        let d = Dims { c: 1, h: 9, w: 9 };
        let mut img = vec![0.0; 81];
        img[4 * 9 + 6] = 1.0;
        // A quarter turn (counter-clockwise as seen, y down) takes it above the centre.
        let mut r = img.clone();
        rotate(&mut r, d, 90.0);
        assert!((r[2 * 9 + 4] - 1.0).abs() < 1e-5, "{r:?}");
        // Shifting by 1/9 of the side moves it one pixel right.
        let mut s = img.clone();
        reframe(&mut s, d, 1.0, 1.0 / 9.0, 0.0);
        assert!((s[4 * 9 + 7] - 1.0).abs() < 1e-5, "{s:?}");
        // Doubling the scale about the centre takes it from 2 right of centre to 4 right.
        let mut z = img.clone();
        reframe(&mut z, d, 2.0, 0.0, 0.0);
        assert!((z[4 * 9 + 8] - 1.0).abs() < 1e-5, "{z:?}");
        // Occlusion blanks a quarter of the area.
        let mut o = vec![1.0; 64];
        occlude(&mut o, D, 0.25, 9);
        assert_eq!(o.iter().filter(|&&v| v == 0.0).count(), 16);
        // A flip mirrors each row.
        let mut f = ramp();
        apply_one(Augment::Flip { p: 1.0 }, &mut f, D, &mut AugmentRng::new(0));
        assert_eq!(f[0], ramp()[7]);
    }

    #[test]
    fn crop_with_padding_is_a_shift_of_at_most_the_padding() {
        let mut img = vec![0.0; 64];
        img[3 * 8 + 3] = 1.0;
        for seed in 0..30 {
            let mut v = img.clone();
            apply_one(
                Augment::CropPad { pad: 2 },
                &mut v,
                D,
                &mut AugmentRng::new(seed),
            );
            let lit: Vec<usize> = (0..64).filter(|&i| v[i] == 1.0).collect();
            assert_eq!(lit.len(), 1, "{v:?}");
            let (y, x) = (lit[0] / 8, lit[0] % 8);
            assert!(y.abs_diff(3) <= 2 && x.abs_diff(3) <= 2);
        }
    }
}
