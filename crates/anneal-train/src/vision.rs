//! Image models trained and scored: the data sets (Fashion-MNIST, MNIST), accuracy on a test set
//! (optionally transformed, for distribution shift), and supervised training of a classifier
//! from N labels on the [`Trainer`]. The cells of `anneal experiment label-efficiency` are built
//! from these.

use crate::model::{ModelInput, TrainModel};
use crate::objectives::{accuracy, ImageClassification, Objective};
use crate::schedule::CosineSchedule;
use crate::strategy::SingleDevice;
use crate::trainer::{Trainer, TrainerParts};
use anneal_data::augment::{Dims, Pipeline};
use anneal_data::images::{fashion_mnist_dir, mnist_digits_dir, ImageSource, Views};
use anneal_data::ImageSet;
use anneal_nn::{LeNet, LeNetConfig};
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anyhow::{bail, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// An image data set: its training and test images and how to treat them.
#[derive(Clone)]
pub struct ImageData {
    /// Its name (`fashion-mnist`, `mnist`).
    pub name: String,
    /// Training images.
    pub train: Arc<ImageSet>,
    /// Test images.
    pub test: Arc<ImageSet>,
    /// Whether a mirrored image keeps its class (clothes do; digits do not).
    pub flip: bool,
    /// Pixel mean and standard deviation of the training images, in [0, 1] units.
    pub normalise: (f32, f32),
}

/// The image data sets this harness knows.
pub const IMAGE_DATASETS: [&str; 2] = ["fashion-mnist", "mnist"];

impl ImageData {
    /// `name` from the data cache `cache` (`scripts/fetch-data.sh NAME`), or an error saying
    /// how to fetch it.
    pub fn load(name: &str, cache: &Path) -> Result<ImageData> {
        let (train, test, flip) = match name {
            "fashion-mnist" => {
                let dir = fashion_mnist_dir(cache);
                if !dir.join("train-images-idx3-ubyte.gz").is_file() {
                    bail!(
                        "Fashion-MNIST is not in {} (fetch it with scripts/fetch-data.sh \
                         fashion-mnist)",
                        dir.display()
                    );
                }
                (
                    ImageSet::fashion_mnist(&dir, true)?,
                    ImageSet::fashion_mnist(&dir, false)?,
                    true,
                )
            }
            "mnist" => {
                let dir = mnist_digits_dir(cache);
                if !dir.join("0.json").is_file() {
                    bail!(
                        "MNIST is not in {} (fetch it with scripts/fetch-data.sh mnist)",
                        dir.display()
                    );
                }
                let (train, test) = ImageSet::mnist_digits(&dir)?;
                (train, test, false)
            }
            other => bail!(
                "--dataset {other:?} is not known: use one of {}",
                IMAGE_DATASETS.join(", ")
            ),
        };
        Ok(ImageData::new(name, train, test, flip))
    }

    /// A data set from its images, normalised by the training images' mean and deviation.
    pub fn new(name: &str, train: ImageSet, test: ImageSet, flip: bool) -> ImageData {
        let n = train.pixels.len().max(1) as f64;
        let mean = train.pixels.iter().map(|&p| p as f64).sum::<f64>() / n / 255.0;
        let var = train
            .pixels
            .iter()
            .map(|&p| (p as f64 / 255.0 - mean).powi(2))
            .sum::<f64>()
            / n;
        ImageData {
            name: name.to_string(),
            train: Arc::new(train),
            test: Arc::new(test),
            flip,
            normalise: (mean as f32, var.sqrt().max(1e-3) as f32),
        }
    }

    /// One image's shape.
    pub fn dims(&self) -> Dims {
        Dims {
            c: 1,
            h: self.train.rows,
            w: self.train.cols,
        }
    }

    /// Classes of the training set.
    pub fn classes(&self) -> usize {
        self.train.classes()
    }

    /// A source of training examples `examples` (image index, label) made into `views`.
    pub fn source(&self, examples: Vec<(usize, i64)>, views: Views) -> ImageSource {
        ImageSource {
            set: self.train.clone(),
            examples,
            unlabelled: Vec::new(),
            views,
            normalise: self.normalise,
        }
    }
}

/// A transform of test images (a distribution shift), applied before normalisation.
pub type ImageTransform<'a> = &'a (dyn Fn(usize, &mut [f32], Dims) + Sync);

/// The accuracy of `model` on the first `limit` images of `set` (all when `None`), each image
/// `i` first passed through `transform(i, …)` when given; no gradients, batches of 500.
pub fn test_accuracy(
    model: &dyn TrainModel,
    set: &ImageSet,
    normalise: (f32, f32),
    limit: Option<usize>,
    transform: Option<ImageTransform<'_>>,
) -> Result<f64> {
    let n = limit.unwrap_or(set.len()).min(set.len());
    let dims = Dims {
        c: 1,
        h: set.rows,
        w: set.cols,
    };
    let (mean, std) = normalise;
    let mut right = 0.0;
    anneal_tensor::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(500) {
            let end = (start + 500).min(n);
            let mut pixels = Vec::with_capacity((end - start) * dims.len());
            for i in start..end {
                let mut image: Vec<f32> = set.image(i).iter().map(|&p| p as f32 / 255.0).collect();
                if let Some(t) = transform {
                    t(i, &mut image, dims);
                }
                pixels.extend(image.iter().map(|v| (v - mean) / std));
            }
            let input = ModelInput::Images {
                pixels: &pixels,
                shape: [end - start, 1, dims.h, dims.w],
            };
            let logits = model.forward(&input, None)?.logits;
            let labels: Vec<i64> = set.labels[start..end].iter().map(|&l| l as i64).collect();
            right += accuracy(&logits, &labels) * (end - start) as f64;
        }
        Ok(())
    })?;
    Ok(right / n.max(1) as f64)
}

/// How long a cell trains and with what.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate (AdamW, cosine decay to a tenth after 3% warm-up).
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of initialisation, sampling and augmentation.
    pub seed: u64,
}

impl TrainSettings {
    /// Steps that make `epochs` passes over `n` examples at this batch size, at least
    /// `min_steps`.
    pub fn steps_for(n: usize, batch: usize, epochs: f64, min_steps: u64) -> u64 {
        ((epochs * n as f64 / batch.max(1) as f64).ceil() as u64).max(min_steps)
    }

    /// The learning rate by step: 3% linear warm-up, cosine decay to a tenth of the peak.
    pub fn schedule(&self) -> CosineSchedule {
        CosineSchedule {
            max_lr: self.lr,
            min_lr: self.lr / 10.0,
            warmup_steps: (self.steps * 3 / 100).max(1),
            decay_steps: self.steps,
        }
    }
}

/// A trainer for `model` under `objective` on `source` with AdamW and `settings`' schedule.
pub fn image_trainer(
    model: Box<dyn TrainModel>,
    objective: Box<dyn Objective>,
    source: Box<dyn anneal_data::BatchSource>,
    settings: &TrainSettings,
) -> Trainer {
    let optimizer = AdamW::new(
        model.params(),
        AdamWConfig {
            weight_decay: settings.weight_decay as f32,
            ..AdamWConfig::default()
        },
    );
    Trainer::new(TrainerParts {
        model,
        objective,
        optimizer: Box::new(optimizer),
        strategy: Box::new(SingleDevice),
        source,
        seed: settings.seed,
        schedule: settings.schedule(),
        batch_size: settings.batch,
        grad_accum: 1,
        grad_clip: 0.0,
    })
}

/// What training one cell gave.
#[derive(Clone, Debug, PartialEq)]
pub struct CellResult {
    /// Test accuracy.
    pub accuracy: f64,
    /// Optimizer steps.
    pub steps: u64,
    /// Passes over the labelled examples.
    pub epochs: f64,
    /// Seconds of training and scoring.
    pub seconds: f64,
    /// Mean training loss of the last tenth of the steps.
    pub final_loss: f64,
}

/// Called every step with (step, steps, loss).
pub type StepProgress<'a> = &'a mut dyn FnMut(u64, u64, f64);

/// Runs `trainer` for its schedule's steps, reporting each step; the mean loss of the last
/// tenth of them.
pub fn run_steps(trainer: &mut Trainer, steps: u64, progress: StepProgress<'_>) -> Result<f64> {
    let tail = (steps / 10).max(1);
    let mut sum = 0.0;
    while trainer.steps() < steps {
        let out = trainer.step()?;
        let done = trainer.steps();
        if done + tail > steps {
            sum += out.loss;
        }
        progress(done, steps, out.loss);
    }
    Ok(sum / tail.min(steps).max(1) as f64)
}

/// Supervised LeNet-5 from `labelled` (image indices of the training set, with their labels),
/// with supervised augmentation when `augment`; scored on the whole test set.
pub fn train_lenet(
    data: &ImageData,
    labelled: &[usize],
    augment: bool,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let t0 = Instant::now();
    let model = LeNet::new(
        LeNetConfig {
            channels: 1,
            side: data.train.rows,
            classes: data.classes(),
        },
        settings.seed,
    )?;
    let views = Views::One(if augment {
        Pipeline::supervised(data.flip)
    } else {
        Pipeline::none()
    });
    let examples = labelled
        .iter()
        .map(|&i| (i, data.train.labels[i] as i64))
        .collect();
    let mut trainer = image_trainer(
        Box::new(model),
        Box::new(ImageClassification),
        Box::new(data.source(examples, views)),
        settings,
    );
    let final_loss = run_steps(&mut trainer, settings.steps, progress)?;
    let accuracy = test_accuracy(trainer.model(), &data.test, data.normalise, None, None)?;
    Ok((
        trainer.into_model(),
        CellResult {
            accuracy,
            steps: settings.steps,
            epochs: (settings.steps * settings.batch as u64) as f64 / labelled.len().max(1) as f64,
            seconds: t0.elapsed().as_secs_f64(),
            final_loss,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Images whose class is which quarter of the image is bright.
    pub(crate) fn quarters(n: usize, seed: u64) -> ImageSet {
        let mut rng = anneal_data::augment::AugmentRng::new(seed);
        let side = 16;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let c = i % 4;
            for y in 0..side {
                for x in 0..side {
                    let q = (y / 8) * 2 + x / 8;
                    let v = if q == c { 0.8 } else { 0.1 } + 0.2 * rng.unit();
                    pixels.push((v.min(1.0) * 255.0) as u8);
                }
            }
            labels.push(c as u8);
        }
        ImageSet {
            rows: side,
            cols: side,
            pixels,
            labels,
        }
    }

    #[test]
    fn lenet_learns_a_simple_image_task_through_the_trainer() {
        let data = ImageData::new("quarters", quarters(200, 1), quarters(100, 2), true);
        let labelled = data.train.balanced_subset(40, 0).unwrap();
        let settings = TrainSettings {
            steps: 60,
            batch: 16,
            lr: 3e-3,
            weight_decay: 0.0,
            seed: 0,
        };
        let (_, result) =
            train_lenet(&data, &labelled, false, &settings, &mut |_, _, _| {}).unwrap();
        assert!(result.accuracy > 0.9, "{result:?}");
        assert_eq!(result.epochs, 24.0);
        assert!(ImageData::load("cifar", Path::new("/nonexistent"))
            .err()
            .unwrap()
            .to_string()
            .contains("fashion-mnist, mnist"));
    }
}
