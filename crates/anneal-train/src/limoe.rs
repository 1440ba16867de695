//! Training the LIMoE-style encoder ([`anneal_nn::limoe`]) on Fashion-MNIST: each image paired
//! with a short description of its class ("a photo of a pair of trousers"), trained
//! contrastively, then measured by zero-shot classification of the test images (the class whose
//! description embeds closest) and by how the experts of each MoE block split between the two
//! modalities (LIMoE, Mustafa et al. 2022, Fig. 1 and §5: experts specialise by modality).
//!
//! A batch holds one image of each class in a random order, so every other pair in it is a true
//! negative.

use crate::schedule::CosineSchedule;
use anneal_data::ImageSet;
use anneal_nn::limoe::{Limoe, LimoeConfig};
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::{no_grad, DropoutKey, Optimizer, Rng, Tensor};
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;

/// Four-word descriptions of Fashion-MNIST's classes, by label.
pub const DESCRIPTIONS: [&str; 10] = [
    "a short sleeved top",
    "a pair of trousers",
    "a warm knitted pullover",
    "a long summer dress",
    "a heavy winter coat",
    "an open summer sandal",
    "a buttoned collar shirt",
    "a white running sneaker",
    "a leather hand bag",
    "a short ankle boot",
];

/// Three-word openings a description follows.
pub const TEMPLATES: [&str; 4] = ["a photo of", "an image of", "a picture of", "a drawing of"];

/// Words per text: an opening and a description.
pub const TEXT_LEN: usize = 7;

/// Side of a square image patch.
pub const PATCH: usize = 7;

/// The words of every text, in first-seen order (the text vocabulary).
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&str> = Vec::new();
    for text in TEMPLATES.iter().chain(&DESCRIPTIONS) {
        for w in text.split(' ') {
            if !words.contains(&w) {
                words.push(w);
            }
        }
    }
    words
}

/// Token ids of template `t` followed by class `c`'s description.
pub fn text_ids(vocab: &[&str], t: usize, c: usize) -> Vec<u32> {
    let text = format!("{} {}", TEMPLATES[t], DESCRIPTIONS[c]);
    text.split(' ')
        .map(|w| {
            vocab
                .iter()
                .position(|v| *v == w)
                .expect("in the vocabulary") as u32
        })
        .collect()
}

/// How to train.
#[derive(Clone, Debug)]
pub struct LimoeRun {
    /// The encoder.
    pub config: LimoeConfig,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate (linear warm-up over 5% of the steps, cosine decay to a tenth).
    pub lr: f64,
    /// Seed of initialisation and batches.
    pub seed: u64,
    /// Test images scored (all of them when larger than the set).
    pub test_images: usize,
}

/// A block's index, each expert's share of the image tokens, and of the text tokens.
pub type BlockRouting = (usize, Vec<f64>, Vec<f64>);

/// What a run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LimoeReport {
    /// (step, contrastive loss, total loss) of every step.
    pub losses: Vec<(u64, f32, f32)>,
    /// The last step's local entropies (weighted), image and text.
    pub local_entropy: [f32; 2],
    /// The last step's global entropies (weighted), image and text.
    pub global_entropy: [f32; 2],
    /// Zero-shot accuracy on the test images.
    pub zero_shot_accuracy: f64,
    /// Test images scored.
    pub test_images: usize,
    /// Per MoE block: its index, each expert's share of the image tokens, and of the text
    /// tokens.
    pub routing: Vec<BlockRouting>,
    /// Seconds of training.
    pub train_seconds: f64,
}

/// Image `i` of `set` as `[patches, PATCH²]` values normalised by Fashion-MNIST's mean and
/// standard deviation (0.286, 0.353).
fn patches(set: &ImageSet, i: usize, out: &mut Vec<f32>) {
    let (rows, cols) = (set.rows, set.cols);
    let img = set.image(i);
    for pr in 0..rows / PATCH {
        for pc in 0..cols / PATCH {
            for r in 0..PATCH {
                for c in 0..PATCH {
                    let v = img[(pr * PATCH + r) * cols + pc * PATCH + c] as f32 / 255.0;
                    out.push((v - 0.286) / 0.353);
                }
            }
        }
    }
}

/// Images `idx` of `set` as a `[B, patches, PATCH²]` tensor.
fn image_batch(set: &ImageSet, idx: &[usize]) -> Result<Tensor> {
    let per = (set.rows / PATCH) * (set.cols / PATCH);
    let mut v = Vec::with_capacity(idx.len() * per * PATCH * PATCH);
    for &i in idx {
        patches(set, i, &mut v);
    }
    Ok(Tensor::from_f32(v, &[idx.len(), per, PATCH * PATCH])?)
}

/// The config's image shape for `set`, checked.
pub fn check_images(set: &ImageSet, config: &LimoeConfig) -> Result<()> {
    let per = (set.rows / PATCH) * (set.cols / PATCH);
    if !set.rows.is_multiple_of(PATCH) || !set.cols.is_multiple_of(PATCH) || per != config.patches {
        bail!(
            "images of {}×{} do not cut into the {} patches of {PATCH}×{PATCH} the encoder expects",
            set.rows,
            set.cols,
            config.patches
        );
    }
    if let Some(&l) = set
        .labels
        .iter()
        .find(|&&l| l as usize >= DESCRIPTIONS.len())
    {
        bail!("label {l} has no description (Fashion-MNIST has labels 0-9)");
    }
    Ok(())
}

/// Trains on `train`, then scores `test`; `on_step(step, contrastive loss)` sees each step.
pub fn train_limoe(
    run: &LimoeRun,
    train: &ImageSet,
    test: &ImageSet,
    on_step: &mut dyn FnMut(u64, f32),
) -> Result<LimoeReport> {
    check_images(train, &run.config)?;
    check_images(test, &run.config)?;
    let vocab = vocabulary();
    let model = Limoe::new(run.config.clone(), run.seed)?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); DESCRIPTIONS.len()];
    for (i, &l) in train.labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    if let Some(c) = by_class.iter().position(|v| v.is_empty()) {
        bail!("the training images hold no {:?}", DESCRIPTIONS[c]);
    }
    let mut opt = AdamW::new(&model.params, AdamWConfig::default());
    let schedule = CosineSchedule {
        max_lr: run.lr,
        min_lr: run.lr / 10.0,
        warmup_steps: (run.steps / 20).max(1),
        decay_steps: run.steps,
    };
    let mut rng = Rng::new(run.seed ^ 0x11_0e);
    let mut losses = Vec::new();
    let (mut local, mut global) = ([0.0; 2], [0.0; 2]);
    let t0 = Instant::now();
    for step in 0..run.steps {
        // One image of each class, in a random order, each with a random opening.
        let mut classes: Vec<usize> = (0..DESCRIPTIONS.len()).collect();
        for i in (1..classes.len()).rev() {
            classes.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let idx: Vec<usize> = classes
            .iter()
            .map(|&c| by_class[c][(rng.next_u64() % by_class[c].len() as u64) as usize])
            .collect();
        let ids: Vec<u32> = classes
            .iter()
            .flat_map(|&c| {
                text_ids(
                    &vocab,
                    (rng.next_u64() % TEMPLATES.len() as u64) as usize,
                    c,
                )
            })
            .collect();
        model.params.zero_grad();
        let key: Option<DropoutKey> =
            Some(run.seed.wrapping_mul(1_000_003).wrapping_add(step).into());
        let images = model.encode_images(&image_batch(train, &idx)?, key)?;
        let texts = model.encode_texts(&ids, classes.len(), TEXT_LEN, key)?;
        let loss = model.loss(&images, &texts)?;
        loss.total.backward()?;
        model.params.clip_grad_norm(1.0);
        opt.step(&model.params, schedule.lr(step) as f32);
        losses.push((step + 1, loss.contrastive, loss.total.item()?));
        (local, global) = (loss.local, loss.global);
        on_step(step + 1, loss.contrastive);
    }
    let train_seconds = t0.elapsed().as_secs_f64();
    // Zero-shot: each class's embedding is its descriptions' mean over the openings.
    let n_test = run.test_images.min(test.len());
    let (accuracy, routing) = no_grad(|| -> Result<(f64, Vec<BlockRouting>)> {
        let classes = DESCRIPTIONS.len();
        let ids: Vec<u32> = (0..classes)
            .flat_map(|c| (0..TEMPLATES.len()).map(move |t| (c, t)))
            .flat_map(|(c, t)| text_ids(&vocab, t, c))
            .collect();
        let texts = model.encode_texts(&ids, classes * TEMPLATES.len(), TEXT_LEN, None)?;
        let e = texts.embeddings.to_vec_f32();
        let p = run.config.proj_dim;
        let mut class_emb = vec![0f32; classes * p];
        for c in 0..classes {
            for t in 0..TEMPLATES.len() {
                let row = &e[(c * TEMPLATES.len() + t) * p..][..p];
                for j in 0..p {
                    class_emb[c * p + j] += row[j] / TEMPLATES.len() as f32;
                }
            }
        }
        let class_emb = Tensor::from_f32(class_emb, &[classes, p])?;
        let mut correct = 0usize;
        let mut image_load: Vec<Vec<f64>> = Vec::new();
        let chunk = 500;
        for start in (0..n_test).step_by(chunk) {
            let idx: Vec<usize> = (start..(start + chunk).min(n_test)).collect();
            let enc = model.encode_images(&image_batch(test, &idx)?, None)?;
            let sims = enc
                .embeddings
                .matmul(&class_emb.transpose(0, 1)?)?
                .to_vec_f32();
            for (k, &i) in idx.iter().enumerate() {
                let row = &sims[k * classes..(k + 1) * classes];
                let best = (0..classes)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .expect("ten classes");
                correct += usize::from(best == test.labels[i] as usize);
            }
            for (l, (_, aux)) in enc.moe.iter().enumerate() {
                if image_load.len() <= l {
                    image_load.push(vec![0.0; aux.load.len()]);
                }
                for (acc, &v) in image_load[l].iter_mut().zip(&aux.load) {
                    *acc += v * idx.len() as f64 / n_test as f64;
                }
            }
        }
        let routing = texts
            .moe
            .iter()
            .zip(image_load)
            .map(|((block, aux), img)| (*block, img, aux.load.clone()))
            .collect();
        Ok((correct as f64 / n_test.max(1) as f64, routing))
    })?;
    Ok(LimoeReport {
        losses,
        local_entropy: local,
        global_entropy: global,
        zero_shot_accuracy: accuracy,
        test_images: n_test,
        routing,
        train_seconds,
    })
}

/// Fashion-MNIST's training and test sets from the data cache (`scripts/fetch-data.sh
/// fashion-mnist`), or an error saying how to fetch them.
pub fn load_fashion_mnist(cache: &Path) -> Result<(ImageSet, ImageSet)> {
    let dir = anneal_data::images::fashion_mnist_dir(cache);
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        bail!(
            "Fashion-MNIST is not in {} (fetch it with scripts/fetch-data.sh fashion-mnist)",
            dir.display()
        );
    }
    Ok((
        ImageSet::fashion_mnist(&dir, true)?,
        ImageSet::fashion_mnist(&dir, false)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_nn::layers::MoeConfig;

    /// Ten 14×14 images per class whose class is a bright 7×7 corner or band: learnable.
    fn synthetic(n_per_class: usize, seed: u64) -> ImageSet {
        let mut rng = Rng::new(seed);
        let (rows, cols) = (14, 14);
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n_per_class {
            for c in 0..10u8 {
                for r in 0..rows {
                    for k in 0..cols {
                        let on = (r / 7 * 2 + k / 7) == (c as usize % 4) && c < 4
                            || (c >= 4 && (r + k) % 10 == c as usize);
                        let noise = (rng.next_u64() % 40) as u8;
                        pixels.push(if on { 200 + noise / 2 } else { noise });
                    }
                }
                labels.push(c);
            }
        }
        ImageSet {
            rows,
            cols,
            pixels,
            labels,
        }
    }

    #[test]
    fn trains_contrastively_and_reports_routing_per_modality() {
        let (train, test) = (synthetic(8, 1), synthetic(3, 2));
        let config = LimoeConfig {
            patches: 4,
            patch_dim: PATCH * PATCH,
            vocab_size: vocabulary().len(),
            max_text: TEXT_LEN,
            d_model: 32,
            n_head: 2,
            n_layer: 2,
            moe_every: 1,
            moe: MoeConfig {
                capacity_factor: None,
                eval_capacity_factor: None,
                ..MoeConfig::switch(4)
            },
            proj_dim: 16,
            local_entropy: 0.01,
            global_entropy: 0.01,
            global_threshold: 0.0,
            temperature: 0.1,
        };
        let run = LimoeRun {
            config,
            steps: 60,
            lr: 3e-3,
            seed: 0,
            test_images: 30,
        };
        let mut seen = 0;
        let report = train_limoe(&run, &train, &test, &mut |_, _| seen += 1).unwrap();
        assert_eq!(seen, 60);
        let first = report.losses[0].1;
        let last = report
            .losses
            .iter()
            .rev()
            .take(10)
            .map(|l| l.1)
            .sum::<f32>()
            / 10.0;
        assert!(last < 0.5 * first, "contrastive loss {first} → {last}");
        assert!(
            report.zero_shot_accuracy > 0.3,
            "{}",
            report.zero_shot_accuracy
        );
        assert_eq!(report.routing.len(), 2);
        for (_, img, txt) in &report.routing {
            assert!((img.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!((txt.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn texts_are_seven_known_words() {
        let v = vocabulary();
        for c in 0..10 {
            for t in 0..TEMPLATES.len() {
                assert_eq!(text_ids(&v, t, c).len(), TEXT_LEN);
            }
        }
    }
}
