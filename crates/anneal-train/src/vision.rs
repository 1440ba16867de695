//! Image models trained and scored: the data sets (Fashion-MNIST, MNIST), accuracy on a test set
//! (optionally transformed, for distribution shift), and supervised training of a classifier
//! from N labels on the [`Trainer`]. The cells of `anneal experiment label-efficiency` are built
//! from these.

use crate::model::{ModelInput, TrainModel};
use crate::objectives::{
    accuracy, FixMatch, ImageClassification, LayerwiseAutoencoder, Mae, MocoV3, Objective,
};
use crate::schedule::CosineSchedule;
use crate::strategy::{SingleDevice, StepOutput};
use crate::trainer::{Trainer, TrainerParts};
use anneal_data::augment::{Dims, Pipeline};
use anneal_data::images::{mnist_digits_dir, ImageSource, Views};
use anneal_data::ImageSet;
use anneal_nn::{LeNet, LeNetConfig, StackedAutoencoder, Vit, VitConfig};
use anneal_tensor::optim::{AdamW, AdamWConfig, Sgd};
use anneal_tensor::Tensor;
use anyhow::{bail, Context, Result};
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
                let (train, test) = crate::limoe::load_fashion_mnist(cache)?;
                (train, test, true)
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

/// `each(chunk, logits)` for the images `indices` of `set`, 500 at a time, without gradients:
/// each image scaled to [0, 1], passed through `transform(i, …)` when given, then normalised by
/// `normalise`.
fn logits_in_batches(
    model: &dyn TrainModel,
    set: &ImageSet,
    indices: &[usize],
    normalise: (f32, f32),
    transform: Option<ImageTransform<'_>>,
    each: &mut dyn FnMut(&[usize], &Tensor) -> Result<()>,
) -> Result<()> {
    let dims = Dims {
        c: 1,
        h: set.rows,
        w: set.cols,
    };
    let (mean, std) = normalise;
    anneal_tensor::no_grad(|| -> Result<()> {
        for chunk in indices.chunks(500) {
            let mut pixels = Vec::with_capacity(chunk.len() * dims.len());
            for &i in chunk {
                let mut image: Vec<f32> = set.image(i).iter().map(|&p| p as f32 / 255.0).collect();
                if let Some(t) = transform {
                    t(i, &mut image, dims);
                }
                pixels.extend(image.iter().map(|v| (v - mean) / std));
            }
            let input = ModelInput::Images {
                pixels: &pixels,
                shape: [chunk.len(), 1, dims.h, dims.w],
            };
            each(chunk, &model.forward(&input, None)?.logits)?;
        }
        Ok(())
    })
}

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
    let indices: Vec<usize> = (0..n).collect();
    let mut right = 0.0;
    logits_in_batches(
        model,
        set,
        &indices,
        normalise,
        transform,
        &mut |chunk, logits| {
            let labels: Vec<i64> = chunk.iter().map(|&i| set.labels[i] as i64).collect();
            right += accuracy(logits, &labels) * chunk.len() as f64;
            Ok(())
        },
    )?;
    Ok(right / n.max(1) as f64)
}

/// How long a cell trains and with what.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate (cosine decay to a tenth after 3% warm-up).
    pub lr: f64,
    /// Weight decay: decoupled for AdamW, an L2 penalty for SGD.
    pub weight_decay: f64,
    /// The optimizer.
    pub optimizer: Optim,
    /// Seed of initialisation, sampling and augmentation.
    pub seed: u64,
}

/// The optimizer a run trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optim {
    /// AdamW (β 0.9, 0.999, ε 1e-8) with decoupled weight decay.
    AdamW,
    /// SGD with Nesterov momentum 0.9 and an L2 penalty: FixMatch's optimizer (Sohn et al.
    /// 2020, §4: lr 0.03, weight decay 5e-4).
    SgdNesterov,
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

/// A one-device trainer for `model` under `objective` on `source`, with `settings`' optimizer
/// and schedule (the image objectives and BERT pretraining use it).
pub fn simple_trainer(
    model: Box<dyn TrainModel>,
    objective: Box<dyn Objective>,
    source: Box<dyn anneal_data::BatchSource>,
    settings: &TrainSettings,
) -> Trainer {
    let optimizer: Box<dyn anneal_tensor::optim::Optimizer> = match settings.optimizer {
        Optim::AdamW => Box::new(AdamW::new(
            model.params(),
            AdamWConfig {
                weight_decay: settings.weight_decay as f32,
                ..AdamWConfig::default()
            },
        )),
        Optim::SgdNesterov => {
            let mut sgd = Sgd::new(model.params(), 0.9, settings.weight_decay as f32);
            sgd.nesterov = true;
            Box::new(sgd)
        }
    };
    Trainer::new(TrainerParts {
        model,
        objective,
        optimizer,
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
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// The objective's metrics, averaged over the last tenth of the steps.
    pub metrics: Vec<(String, f64)>,
}

/// Called every step with (step, steps, what the step gave).
pub type StepProgress<'a> = &'a mut dyn FnMut(u64, u64, &StepOutput);

/// Runs `trainer` until step `steps`, reporting each step; the mean loss and metrics of the last
/// tenth of the steps.
pub fn run_steps(
    trainer: &mut Trainer,
    steps: u64,
    progress: StepProgress<'_>,
) -> Result<(f64, Vec<(String, f64)>)> {
    let tail = (steps / 10).max(1);
    let mut sum = 0.0;
    let mut metrics: Vec<(String, f64)> = Vec::new();
    while trainer.steps() < steps {
        let out = trainer.step()?;
        let done = trainer.steps();
        if done + tail > steps {
            sum += out.loss;
            for (name, v) in &out.metrics {
                match metrics.iter_mut().find(|(n, _)| n == name) {
                    Some(m) => m.1 += v,
                    None => metrics.push((name.clone(), *v)),
                }
            }
        }
        progress(done, steps, &out);
    }
    let n = tail.min(steps).max(1) as f64;
    metrics.iter_mut().for_each(|m| m.1 /= n);
    Ok((sum / n, metrics))
}

/// A freshly initialised LeNet-5 for `data`'s images and classes.
pub fn new_lenet(data: &ImageData, seed: u64) -> Result<LeNet> {
    Ok(LeNet::new(
        LeNetConfig {
            channels: 1,
            side: data.train.rows,
            classes: data.classes(),
        },
        seed,
    )?)
}

/// `examples` of `labelled` with their true labels.
fn with_labels(data: &ImageData, labelled: &[usize]) -> Vec<(usize, i64)> {
    labelled
        .iter()
        .map(|&i| (i, data.train.labels[i] as i64))
        .collect()
}

/// Trains `model` under `objective` on `source` for `settings.steps`, then scores it on the test
/// set; `labelled` is the number of labelled examples an epoch passes over.
fn fit(
    data: &ImageData,
    model: Box<dyn TrainModel>,
    objective: Box<dyn Objective>,
    source: ImageSource,
    settings: &TrainSettings,
    labelled: usize,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let t0 = Instant::now();
    let mut trainer = simple_trainer(model, objective, Box::new(source), settings);
    let (final_loss, metrics) = run_steps(&mut trainer, settings.steps, progress)?;
    // An objective that averages the weights (FixMatch) is scored, and kept, with the average.
    let params = trainer.model().params();
    if let Some(average) = trainer.objective().averaged_weights() {
        if average.len() == params.trainable_numel() {
            params.set_trainable_values(0, average);
        }
    }
    let accuracy = test_accuracy(trainer.model(), &data.test, data.normalise, None, None)?;
    Ok((
        trainer.into_model(),
        CellResult {
            accuracy,
            steps: settings.steps,
            epochs: (settings.steps * settings.batch as u64) as f64 / labelled.max(1) as f64,
            seconds: t0.elapsed().as_secs_f64(),
            final_loss,
            metrics,
        },
    ))
}

/// [`fit`] of `model` with supervised cross-entropy on the images `labelled`, each through
/// `augment`.
fn fit_labelled(
    data: &ImageData,
    model: Box<dyn TrainModel>,
    labelled: &[usize],
    augment: Pipeline,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let source = data.source(with_labels(data, labelled), Views::One(augment));
    let objective = Box::new(ImageClassification);
    fit(
        data,
        model,
        objective,
        source,
        settings,
        labelled.len(),
        progress,
    )
}

/// Trains `model` under `objective` on `source` for `settings.steps` (pretraining, scored by
/// its loss alone); the model and the mean loss of the last tenth of the steps.
pub fn pretrain(
    model: Box<dyn TrainModel>,
    objective: Box<dyn Objective>,
    source: Box<dyn anneal_data::BatchSource>,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, f64)> {
    let mut trainer = simple_trainer(model, objective, source, settings);
    let (loss, _) = run_steps(&mut trainer, settings.steps, progress)?;
    Ok((trainer.into_model(), loss))
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
    let augment = if augment {
        Pipeline::supervised(data.flip)
    } else {
        Pipeline::none()
    };
    let model = Box::new(new_lenet(data, settings.seed)?);
    fit_labelled(data, model, labelled, augment, settings, progress)
}

/// What FixMatch's batches hold besides the labelled images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixMatchViews {
    /// Unlabelled images per labelled one (μ).
    pub ratio: usize,
    /// Crop padding of the weak view, in pixels.
    pub weak_pad: usize,
    /// Largest Cutout square of the strong view, as a share of the side.
    pub cutout: f32,
}

impl FixMatchViews {
    /// The paper's: μ = 7, padding 12.5% of the side, Cutout up to half the side.
    pub fn paper(dims: Dims) -> FixMatchViews {
        FixMatchViews {
            ratio: 7,
            weak_pad: Pipeline::paper_pad(dims),
            cutout: 0.5,
        }
    }
}

/// FixMatch on LeNet-5: `settings.batch` labelled images per step (weak views) with `ratio`
/// (μ) unlabelled images each, as weak and strong views; every training image serves as
/// unlabelled, as in the paper.
pub fn train_fixmatch(
    data: &ImageData,
    labelled: &[usize],
    fixmatch: FixMatch,
    views: FixMatchViews,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let weak = Pipeline::weak_padded(views.weak_pad, data.flip);
    let mut source = data.source(
        with_labels(data, labelled),
        Views::FixMatch {
            strong: Pipeline::strong_from(weak.clone(), views.cutout),
            weak,
            ratio: views.ratio,
        },
    );
    source.unlabelled = (0..data.train.len()).collect();
    let model = Box::new(new_lenet(data, settings.seed)?);
    fit(
        data,
        model,
        Box::new(fixmatch),
        source,
        settings,
        labelled.len(),
        progress,
    )
}

/// The class and top probability `model` gives each of `indices` of the training set.
pub fn predict_train(
    model: &dyn TrainModel,
    data: &ImageData,
    indices: &[usize],
) -> Result<Vec<(usize, f32)>> {
    let mut out = Vec::with_capacity(indices.len());
    logits_in_batches(
        model,
        &data.train,
        indices,
        data.normalise,
        None,
        &mut |_, logits| {
            let classes = logits.shape().last().copied().unwrap_or(1).max(1);
            for row in logits.softmax()?.to_vec_f32().chunks(classes) {
                let best = crate::objectives::argmax_rows(row, classes)[0];
                out.push((best, row[best]));
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// Offline pseudo-labelling (Lee 2013, as self-training): a teacher, supervised LeNet-5 on
/// `labelled`, labels every other training image; a student LeNet-5 trains on the labelled
/// images plus those whose pseudo-label has probability ≥ `threshold`, for `student_epochs`
/// passes (at most `student_max_steps` steps). The result's seconds
/// cover both; its epochs are the student's passes over its (larger) training set.
pub fn train_pseudo_label(
    data: &ImageData,
    labelled: &[usize],
    threshold: f32,
    teacher: &TrainSettings,
    student_epochs: f64,
    student_max_steps: u64,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult, usize)> {
    let t0 = Instant::now();
    let (teacher_model, _) = train_lenet(data, labelled, true, teacher, &mut |_, _, _| {})?;
    let mut is_labelled = vec![false; data.train.len()];
    for &i in labelled {
        is_labelled[i] = true;
    }
    let rest: Vec<usize> = (0..data.train.len()).filter(|&i| !is_labelled[i]).collect();
    let predicted = predict_train(&*teacher_model, data, &rest)?;
    let mut examples = with_labels(data, labelled);
    let before = examples.len();
    examples.extend(
        rest.iter()
            .zip(&predicted)
            .filter(|(_, (_, p))| *p >= threshold)
            .map(|(&i, &(c, _))| (i, c as i64)),
    );
    let pseudo = examples.len() - before;
    let student = TrainSettings {
        steps: TrainSettings::steps_for(examples.len(), teacher.batch, student_epochs, 1)
            .min(student_max_steps.max(1)),
        seed: teacher.seed + 1,
        ..teacher.clone()
    };
    let n = examples.len();
    let source = data.source(examples, Views::One(Pipeline::supervised(data.flip)));
    let (model, mut result) = fit(
        data,
        Box::new(new_lenet(data, student.seed)?),
        Box::new(ImageClassification),
        source,
        &student,
        n,
        progress,
    )?;
    result.seconds = t0.elapsed().as_secs_f64();
    Ok((model, result, pseudo))
}

/// What a ViT is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VitRole {
    /// A classifier over the data set's classes.
    Classifier,
    /// MAE pretraining: a decoder, no head.
    Mae,
    /// MoCo v3 pretraining: projector and predictor, no head.
    Contrastive,
}

/// A freshly initialised ViT (`VitConfig::small`) for `data`'s images in `role`.
pub fn new_vit(data: &ImageData, role: VitRole, seed: u64) -> Result<Vit> {
    let mut config = VitConfig::small(data.classes());
    config.side = data.train.rows;
    if role != VitRole::Classifier {
        config.classes = 0;
    }
    if role != VitRole::Mae {
        config.decoder_d = 0;
    }
    if role == VitRole::Contrastive {
        config.proj_dim = 64;
    }
    Ok(Vit::new(config, seed)?)
}

/// MoCo v3 pretraining of a ViT on every training image, labels unused (two contrastive views
/// of each); returns the pretrained model and its final loss.
pub fn pretrain_moco(
    data: &ImageData,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, f64)> {
    let examples = (0..data.train.len()).map(|i| (i, -1)).collect();
    let source = data.source(examples, Views::Two(Pipeline::contrastive(data.flip)));
    let model = new_vit(data, VitRole::Contrastive, settings.seed)?;
    let momentum = new_vit(data, VitRole::Contrastive, settings.seed)?;
    let moco = MocoV3::new(&model, momentum, settings.steps)?;
    pretrain(
        Box::new(model),
        Box::new(moco),
        Box::new(source),
        settings,
        progress,
    )
}

/// Supervised ViT from scratch on `labelled`, with supervised augmentation.
pub fn train_vit(
    data: &ImageData,
    labelled: &[usize],
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let model = Box::new(new_vit(data, VitRole::Classifier, settings.seed)?);
    let augment = Pipeline::supervised(data.flip);
    fit_labelled(data, model, labelled, augment, settings, progress)
}

/// MAE pretraining of a ViT on every training image, labels unused (flips and small shifts as
/// its only augmentation); returns the pretrained model and its final reconstruction loss.
pub fn pretrain_mae(
    data: &ImageData,
    mae: Mae,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, f64)> {
    let examples = (0..data.train.len()).map(|i| (i, -1)).collect();
    let source = data.source(examples, Views::One(Pipeline::weak(data.dims(), data.flip)));
    let model = Box::new(new_vit(data, VitRole::Mae, settings.seed)?);
    pretrain(model, Box::new(mae), Box::new(source), settings, progress)
}

/// A ViT classifier whose encoder starts from `pretrained`'s parameters (an MAE's or MoCo's) and trains
/// on `labelled`: every parameter (fine-tuning), or only the head with the encoder frozen
/// (`probe`, a linear probe on the `[cls]` features).
pub fn finetune_vit(
    data: &ImageData,
    pretrained: &anneal_tensor::ParamStore,
    labelled: &[usize],
    probe: bool,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let mut model = new_vit(data, VitRole::Classifier, settings.seed)?;
    model.load_encoder_from(pretrained)?;
    if probe {
        model.params.train_only(|name| name.starts_with("head"));
    }
    let augment = if probe {
        Pipeline::none()
    } else {
        Pipeline::supervised(data.flip)
    };
    fit_labelled(data, Box::new(model), labelled, augment, settings, progress)
}

/// Widths of the hidden layers of the fully connected network of the layer-wise row (the input
/// is the flattened image).
pub const MLP_HIDDEN: [usize; 3] = [500, 250, 100];

/// A freshly initialised stacked-autoencoder classifier for `data`.
pub fn new_mlp(data: &ImageData, seed: u64) -> Result<StackedAutoencoder> {
    let mut widths = vec![data.dims().len()];
    widths.extend(MLP_HIDDEN);
    Ok(StackedAutoencoder::new(&widths, data.classes(), seed)?)
}

/// The fully connected network trained from scratch on `labelled` (no pretraining).
pub fn train_mlp(
    data: &ImageData,
    labelled: &[usize],
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let mut model = new_mlp(data, settings.seed)?;
    model.params.train_only(|n| !n.starts_with("decoders"));
    let augment = Pipeline::supervised(data.flip);
    fit_labelled(data, Box::new(model), labelled, augment, settings, progress)
}

/// Greedy layer-wise pretraining of the fully connected network on every training image,
/// labels unused: each hidden layer in turn, the ones below frozen, trains with its decoder to
/// reconstruct its input for `settings.steps` steps. Returns the model and each stage's final
/// reconstruction loss.
pub fn pretrain_layerwise(
    data: &ImageData,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, Vec<f64>)> {
    let mut model: Box<dyn TrainModel> = Box::new(new_mlp(data, settings.seed)?);
    let mut losses = Vec::new();
    for layer in 0..MLP_HIDDEN.len() {
        let (own, decoder) = (format!("layers.{layer}."), format!("decoders.{layer}."));
        model
            .params_mut()
            .train_only(|n| n.starts_with(&own) || n.starts_with(&decoder));
        let examples = (0..data.train.len()).map(|i| (i, -1)).collect();
        let source = data.source(examples, Views::One(Pipeline::none()));
        let stage = TrainSettings {
            seed: settings.seed + layer as u64,
            ..settings.clone()
        };
        let objective = Box::new(LayerwiseAutoencoder { layer });
        let (trained, loss) = pretrain(model, objective, Box::new(source), &stage, progress)?;
        losses.push(loss);
        model = trained;
    }
    Ok((model, losses))
}

/// The fully connected network starting from `pretrained`'s layers (its decoders dropped),
/// fine-tuned with back-propagation on `labelled`.
pub fn finetune_mlp(
    data: &ImageData,
    pretrained: &anneal_tensor::ParamStore,
    labelled: &[usize],
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, CellResult)> {
    let mut model = new_mlp(data, settings.seed)?;
    model
        .params
        .copy_from(pretrained, |n| n.starts_with("layers."))?;
    model.params.train_only(|n| !n.starts_with("decoders"));
    let augment = Pipeline::supervised(data.flip);
    fit_labelled(data, Box::new(model), labelled, augment, settings, progress)
}

/// What a saved image model is, so that it can be rebuilt (`image_model.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageModelInfo {
    /// `lenet`, `vit` or `mlp`.
    pub kind: String,
    /// The data set it was trained on.
    pub dataset: String,
    /// Image side.
    pub side: usize,
    /// Classes.
    pub classes: usize,
    /// Pixel mean and standard deviation it expects inputs normalised by.
    pub normalise: (f32, f32),
    /// How it was trained (method, labels, seed), for reports.
    pub label: String,
}

/// Writes `model`'s parameters (`model.safetensors`) and `info` (`image_model.json`) into `dir`,
/// each atomically.
pub fn save_image_model(dir: &Path, model: &dyn TrainModel, info: &ImageModelInfo) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::checkpoint::write_params(&dir.join("model.safetensors"), model.params())?;
    crate::checkpoint::write_atomic(
        &dir.join("image_model.json"),
        serde_json::to_string_pretty(info)?.as_bytes(),
    )?;
    Ok(())
}

/// Rebuilds the image model saved in `dir` by [`save_image_model`]; the error names the file at
/// fault.
pub fn load_image_model(dir: &Path) -> Result<(Box<dyn TrainModel>, ImageModelInfo)> {
    let info_path = dir.join("image_model.json");
    let text = std::fs::read_to_string(&info_path).with_context(|| {
        format!(
            "reading {} (is {} a saved image model?)",
            info_path.display(),
            dir.display()
        )
    })?;
    let info: ImageModelInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an image model description", info_path.display()))?;
    let model: Box<dyn TrainModel> = match info.kind.as_str() {
        "lenet" => Box::new(LeNet::new(
            LeNetConfig {
                channels: 1,
                side: info.side,
                classes: info.classes,
            },
            0,
        )?),
        "vit" => {
            let mut config = VitConfig::small(info.classes);
            config.side = info.side;
            config.decoder_d = 0;
            Box::new(Vit::new(config, 0)?)
        }
        "mlp" => {
            let mut widths = vec![info.side * info.side];
            widths.extend(MLP_HIDDEN);
            Box::new(StackedAutoencoder::new(&widths, info.classes, 0)?)
        }
        other => bail!(
            "{}: kind {other:?} is not an image model anneal builds (lenet, vit, mlp)",
            info_path.display()
        ),
    };
    crate::checkpoint::read_params(&dir.join("model.safetensors"), model.params())?;
    Ok((model, info))
}

/// A distribution shift of test images (Barbu et al. 2019, ObjectNet: rotated, occluded,
/// re-framed objects).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shift {
    /// Rotated by this many degrees.
    Rotate(f32),
    /// A square of this share of the area blanked at a random place (seeded by the image).
    Occlude(f32),
    /// Scaled by the first factor about the centre, then shifted by the second share of the
    /// side, right and down.
    Reframe(f32, f32),
}

impl Shift {
    /// The shifts `anneal experiment shift` reports.
    pub const ALL: [Shift; 7] = [
        Shift::Rotate(-15.0),
        Shift::Rotate(15.0),
        Shift::Rotate(-30.0),
        Shift::Rotate(30.0),
        Shift::Occlude(0.25),
        Shift::Reframe(0.75, 0.1),
        Shift::Reframe(1.25, -0.1),
    ];

    /// A short name for tables.
    pub fn name(self) -> String {
        match self {
            Shift::Rotate(d) => format!("rotate {d:+.0}°"),
            Shift::Occlude(a) => format!("occlude {:.0}%", 100.0 * a),
            Shift::Reframe(s, t) => format!("reframe ×{s} {t:+}"),
        }
    }

    /// Applies the shift to test image `index`.
    pub fn apply(self, index: usize, image: &mut [f32], dims: Dims) {
        match self {
            Shift::Rotate(d) => anneal_data::augment::rotate(image, dims, d),
            Shift::Occlude(a) => anneal_data::augment::occlude(image, dims, a, index as u64),
            Shift::Reframe(s, t) => anneal_data::augment::reframe(image, dims, s, t, t),
        }
    }
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
    fn fixmatch_and_pseudo_labels_train_on_few_labels() {
        // A mirrored image changes class here: no flips.
        let data = ImageData::new("quarters", quarters(200, 1), quarters(100, 2), false);
        let labelled = data.train.balanced_subset(8, 0).unwrap();
        let settings = TrainSettings {
            steps: 40,
            batch: 4,
            lr: 3e-3,
            weight_decay: 0.0,
            optimizer: Optim::AdamW,
            seed: 0,
        };
        let mut rates = Vec::new();
        let (_, r) = train_fixmatch(
            &data,
            &labelled,
            FixMatch {
                threshold: 0.6,
                ema_decay: 0.9,
                ..FixMatch::default()
            },
            FixMatchViews {
                ratio: 2,
                ..FixMatchViews::paper(data.dims())
            },
            &settings,
            &mut |_, _, out| rates.push(out.loss),
        )
        .unwrap();
        assert_eq!(rates.len(), 40);
        assert!(r.accuracy > 0.7, "{r:?}");
        let (_, r, pseudo) = train_pseudo_label(
            &data,
            &labelled,
            0.9,
            &settings,
            2.0,
            1000,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(pseudo > 0 && r.accuracy > 0.7, "{pseudo} {r:?}");
    }

    #[test]
    fn mae_pretrains_a_vit_whose_encoder_fine_tunes() {
        let mut train = quarters(64, 1);
        let mut test = quarters(40, 2);
        // 28×28 images for the small ViT: the 16×16 quarters padded.
        for set in [&mut train, &mut test] {
            let mut pixels = Vec::new();
            for i in 0..set.len() {
                let img = set.image(i).to_vec();
                for y in 0..28 {
                    for x in 0..28 {
                        pixels.push(if y < 16 && x < 16 { img[y * 16 + x] } else { 0 });
                    }
                }
            }
            set.pixels = pixels;
            set.rows = 28;
            set.cols = 28;
        }
        let data = ImageData::new("quarters", train, test, false);
        let settings = TrainSettings {
            steps: 12,
            batch: 16,
            lr: 2e-3,
            weight_decay: 0.05,
            optimizer: Optim::AdamW,
            seed: 0,
        };
        let mut losses = Vec::new();
        let (mae, loss) = pretrain_mae(&data, Mae::default(), &settings, &mut |_, _, out| {
            losses.push(out.loss)
        })
        .unwrap();
        assert!(loss.is_finite() && loss < losses[0], "{losses:?}");
        let (moco, moco_loss) = pretrain_moco(&data, &settings, &mut |_, _, _| {}).unwrap();
        assert!(moco_loss.is_finite());
        let labelled = data.train.balanced_subset(16, 0).unwrap();
        let (_, r) = finetune_vit(
            &data,
            moco.params(),
            &labelled,
            true,
            &settings,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(r.accuracy > 0.0);
        for probe in [true, false] {
            let (model, r) = finetune_vit(
                &data,
                mae.params(),
                &labelled,
                probe,
                &settings,
                &mut |_, _, _| {},
            )
            .unwrap();
            assert!(r.accuracy > 0.0 && r.accuracy <= 1.0);
            // The encoder came from the MAE; a probe leaves it there.
            let name = "blocks.0.attn.c_attn.weight";
            let same = model.params().by_name(name).unwrap().to_vec_f32()
                == mae.params().by_name(name).unwrap().to_vec_f32();
            assert_eq!(same, probe);
        }
    }

    #[test]
    fn layerwise_pretraining_trains_each_layer_in_turn_then_fine_tunes() {
        let data = ImageData::new("quarters", quarters(64, 1), quarters(40, 2), false);
        let settings = TrainSettings {
            steps: 15,
            batch: 16,
            lr: 3e-3,
            weight_decay: 0.0,
            optimizer: Optim::AdamW,
            seed: 0,
        };
        let (model, losses) = pretrain_layerwise(&data, &settings, &mut |_, _, _| {}).unwrap();
        assert_eq!(losses.len(), MLP_HIDDEN.len());
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        let labelled = data.train.balanced_subset(16, 0).unwrap();
        let (tuned, r) = finetune_mlp(
            &data,
            model.params(),
            &labelled,
            &settings,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(r.accuracy > 0.5, "{r:?}");
        // Pretraining moved every layer away from its initial values.
        let fresh = new_mlp(&data, 0).unwrap();
        for l in 0..MLP_HIDDEN.len() {
            let name = format!("layers.{l}.weight");
            assert_ne!(
                model.params().by_name(&name).unwrap().to_vec_f32(),
                fresh.params.by_name(&name).unwrap().to_vec_f32(),
                "{name}"
            );
        }
        let (_, scratch) = train_mlp(&data, &labelled, &settings, &mut |_, _, _| {}).unwrap();
        assert!(scratch.accuracy > 0.0);
        let _ = tuned;
    }

    #[test]
    fn image_models_save_and_load_and_shifts_cost_accuracy() {
        let data = ImageData::new("quarters", quarters(200, 1), quarters(100, 2), false);
        let labelled = data.train.balanced_subset(40, 0).unwrap();
        let settings = TrainSettings {
            steps: 60,
            batch: 16,
            lr: 3e-3,
            weight_decay: 0.0,
            optimizer: Optim::AdamW,
            seed: 0,
        };
        let (model, r) =
            train_lenet(&data, &labelled, false, &settings, &mut |_, _, _| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let info = ImageModelInfo {
            kind: "lenet".into(),
            dataset: "quarters".into(),
            side: 16,
            classes: 4,
            normalise: data.normalise,
            label: "lenet 40".into(),
        };
        save_image_model(dir.path(), &*model, &info).unwrap();
        let (loaded, back) = load_image_model(dir.path()).unwrap();
        assert_eq!(back, info);
        let again = test_accuracy(&*loaded, &data.test, data.normalise, None, None).unwrap();
        assert_eq!(again, r.accuracy);
        // Turning the quarters by 90° moves every bright quarter: accuracy falls.
        let quarter_turn =
            |_: usize, img: &mut [f32], d: Dims| anneal_data::augment::rotate(img, d, 90.0);
        let turned = test_accuracy(
            &*loaded,
            &data.test,
            data.normalise,
            None,
            Some(&quarter_turn),
        )
        .unwrap();
        assert!(turned < again - 0.3, "{turned} vs {again}");
        std::fs::write(dir.path().join("image_model.json"), "{").unwrap();
        let e = format!("{:#}", load_image_model(dir.path()).err().unwrap());
        assert!(e.contains("image_model.json"), "{e}");
    }

    #[test]
    fn lenet_learns_a_simple_image_task_through_the_trainer() {
        let data = ImageData::new("quarters", quarters(200, 1), quarters(100, 2), false);
        let labelled = data.train.balanced_subset(40, 0).unwrap();
        let settings = TrainSettings {
            steps: 60,
            batch: 16,
            lr: 3e-3,
            weight_decay: 0.0,
            optimizer: Optim::AdamW,
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
