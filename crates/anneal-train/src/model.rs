//! What the trainer asks of a model: its parameters, a forward pass from [`ModelInput`] to
//! [`ModelOutput`], and its training FLOPs. Objectives build the input and read the output;
//! strategies run the forward pass.

use anneal_nn::bert::{Bert, BertInput};
use anneal_nn::layers::ParallelContext;
use anneal_nn::{Gpt, LeNet, StackedAutoencoder, Vit};
use anneal_tensor::{CrossEntropyOptions, DropoutKey, ParamStore, Result, Tensor};
use std::sync::Arc;

/// A model's input, built by an objective from a batch (borrowing from it: nothing is copied).
#[derive(Clone, Copy, Debug)]
pub enum ModelInput<'a> {
    /// Token ids `[batch, seq]`, row-major.
    Tokens {
        /// The ids.
        ids: &'a [u32],
        /// Rows.
        batch: usize,
        /// Positions per row.
        seq: usize,
    },
    /// Token ids `[batch, seq]` of sequences padded after their real tokens.
    Sequences {
        /// The ids.
        ids: &'a [u32],
        /// Each sequence's real length.
        lengths: &'a [usize],
        /// Rows.
        batch: usize,
        /// Positions per row.
        seq: usize,
    },
    /// Sentence pairs for BERT's pretraining heads: ids, token types and each row's length
    /// `[batch, seq]`, and the masked-LM targets (−100 where nothing is predicted), which say
    /// where the heads predict.
    MaskedPairs {
        /// The ids.
        ids: &'a [u32],
        /// Segment of each position.
        token_types: &'a [u32],
        /// Each row's real length.
        lengths: &'a [usize],
        /// Masked-LM targets.
        targets: &'a [i64],
        /// Rows.
        batch: usize,
        /// Positions per row.
        seq: usize,
    },
    /// Images `[n, channels, height, width]`, row-major, normalised.
    Images {
        /// The pixels.
        pixels: &'a [f32],
        /// Their shape.
        shape: [usize; 4],
    },
    /// Images in pairs of views, for which the model gives its contrastive queries (MoCo v3).
    ContrastiveImages {
        /// The pixels.
        pixels: &'a [f32],
        /// Their shape.
        shape: [usize; 4],
    },
    /// Images whose codes at hidden layer `layer` (the images themselves at 0) a stacked
    /// autoencoder reconstructs (one stage of greedy layer-wise pretraining).
    ReconstructLayer {
        /// The pixels.
        pixels: &'a [f32],
        /// Their shape.
        shape: [usize; 4],
        /// The stage.
        layer: usize,
    },
    /// Images of which the model hides a random share of patches and predicts them (MAE).
    MaskedImages {
        /// The pixels.
        pixels: &'a [f32],
        /// Their shape.
        shape: [usize; 4],
        /// The share of each image's patches hidden.
        mask_ratio: f32,
    },
}

impl ModelInput<'_> {
    /// The images of an image input as a tensor; fails, naming `model`, for any other input.
    pub fn image_tensor(&self, model: &'static str) -> Result<Tensor> {
        match self {
            ModelInput::Images { pixels, shape }
            | ModelInput::ContrastiveImages { pixels, shape }
            | ModelInput::ReconstructLayer { pixels, shape, .. }
            | ModelInput::MaskedImages { pixels, shape, .. } => {
                Tensor::from_f32(pixels.to_vec(), shape)
            }
            _ => Err(anneal_tensor::Error::Invalid {
                op: model,
                reason: "an image model reads images".into(),
            }),
        }
    }
}

/// A model's output: its main tensor (logits, embeddings, …) and the named auxiliary losses its
/// layers added (a Mixture-of-Experts layer's balancing and z-losses), which the training step
/// adds to the objective's loss and logs.
pub struct ModelOutput {
    /// Logits `[rows, vocab]` for a language model.
    pub logits: Tensor,
    /// Named auxiliary losses (scalars).
    pub aux_losses: Vec<(String, Tensor)>,
    /// Named statistics to log and not to train on (a Mixture-of-Experts layer's expert load
    /// and dropped share).
    pub stats: Vec<(String, f64)>,
    /// Named tensors an objective reads beside the main one (MAE's mask and target patches).
    pub extras: Vec<(String, Tensor)>,
    /// The parallel context of a model whose logits hold only this rank's slice of the
    /// vocabulary (tensor parallelism); [`ModelOutput::cross_entropy`] goes through it.
    pub parallel: Option<Arc<dyn ParallelContext>>,
}

impl ModelOutput {
    /// The extra tensor `name`; fails naming the model output's kind when it is missing.
    pub fn extra(&self, name: &str) -> Result<&Tensor> {
        self.extras
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| anneal_tensor::Error::Invalid {
                op: "ModelOutput::extra",
                reason: format!("the model gave no {name:?} beside its output"),
            })
    }

    /// An output with no auxiliary losses and no statistics.
    pub fn logits(logits: Tensor) -> ModelOutput {
        ModelOutput {
            logits,
            aux_losses: Vec::new(),
            stats: Vec::new(),
            extras: Vec::new(),
            parallel: None,
        }
    }

    /// The mean cross-entropy of the logits against `targets`: the vocabulary-parallel one when
    /// the logits are a slice of the vocabulary.
    pub fn cross_entropy(&self, targets: &[i64], opts: CrossEntropyOptions) -> Result<Tensor> {
        match &self.parallel {
            Some(p) => p.cross_entropy(&self.logits, targets, opts),
            None => self.logits.cross_entropy(targets, opts),
        }
    }

    /// An output carrying what the Mixture-of-Experts blocks of a model reported: the losses
    /// summed over the layers as `moe_aux_loss` and `moe_z_loss`, and per layer (by block
    /// index `i`) each expert's load as `moe.i.load.e` and the dropped share as `moe.i.dropped`.
    pub fn with_moe(
        logits: Tensor,
        moe: Vec<(usize, anneal_nn::layers::MoeAux)>,
    ) -> Result<ModelOutput> {
        let mut out = ModelOutput::logits(logits);
        if moe.is_empty() {
            return Ok(out);
        }
        let (mut balance, mut z) = (None::<Tensor>, None::<Tensor>);
        for (block, aux) in moe {
            balance = Some(match balance {
                Some(b) => b.add(&aux.balance)?,
                None => aux.balance,
            });
            z = Some(match z {
                Some(s) => s.add(&aux.z)?,
                None => aux.z,
            });
            for (e, load) in aux.load.iter().enumerate() {
                out.stats.push((format!("moe.{block}.load.{e}"), *load));
            }
            out.stats
                .push((format!("moe.{block}.dropped"), aux.dropped));
        }
        out.aux_losses
            .extend(balance.map(|b| ("moe_aux_loss".to_string(), b)));
        out.aux_losses
            .extend(z.map(|z| ("moe_z_loss".to_string(), z)));
        Ok(out)
    }
}

/// A model the trainer can train.
pub trait TrainModel: Send + Sync {
    /// Its parameters.
    fn params(&self) -> &ParamStore;

    /// Its parameters, to lay out anew (freezing, sharding the gradients).
    fn params_mut(&mut self) -> &mut ParamStore;

    /// The forward pass; `dropout` turns dropout on (training) with masks derived from its key
    /// (a seed, and the first row of the whole batch that the input holds).
    fn forward(&self, input: &ModelInput<'_>, dropout: Option<DropoutKey>) -> Result<ModelOutput>;

    /// Training FLOPs per token at sequence length `seq` (for MFU).
    fn flops_per_token(&self, seq: usize) -> f64;

    /// The parallel context its layers were built in, for a model that can be split across
    /// ranks (`None`: always whole).
    fn parallel(&self) -> Option<&Arc<dyn ParallelContext>> {
        None
    }

    /// How many layers a pipeline can cut the model into stages of (in forward order: the
    /// embedding, the blocks, the head); 0 for a model that cannot be cut.
    fn pipeline_layers(&self) -> usize {
        0
    }

    /// The layers `layers` (of [`TrainModel::pipeline_layers`]) on `input`: the model's input
    /// when they start with the first layer, else the hidden states the layer before gave.
    /// Gives the model's output when they end with the last layer, else hidden states (as the
    /// output's `logits`).
    fn forward_layers(
        &self,
        input: StageInput<'_>,
        layers: std::ops::Range<usize>,
        dropout: Option<DropoutKey>,
    ) -> Result<ModelOutput> {
        let _ = (input, layers, dropout);
        Err(anneal_tensor::Error::Invalid {
            op: "TrainModel::forward_layers",
            reason: "this model cannot be cut into pipeline stages".into(),
        })
    }
}

/// What a pipeline stage's layers start from.
pub enum StageInput<'a> {
    /// The model's input (the first stage).
    Model(&'a ModelInput<'a>),
    /// Hidden states received from the stage before (`[B, T, d]`, or under sequence
    /// parallelism this rank's rows of `[B·T, d]`), of a batch of `batch` sequences of `seq`
    /// tokens.
    Hidden {
        /// The hidden states.
        x: Tensor,
        /// Sequences.
        batch: usize,
        /// Their length.
        seq: usize,
    },
}

impl TrainModel for Gpt {
    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    fn forward(&self, input: &ModelInput<'_>, dropout: Option<DropoutKey>) -> Result<ModelOutput> {
        let ModelInput::Tokens { ids, batch, seq } = input else {
            return Err(anneal_tensor::Error::Invalid {
                op: "Gpt",
                reason: "a GPT reads token windows".into(),
            });
        };
        let (logits, moe) = self.forward_with_aux(ids, *batch, *seq, dropout)?;
        let mut out = ModelOutput::with_moe(logits, moe)?;
        out.parallel = (self.parallel().tensor_parallel().1 > 1).then(|| self.parallel().clone());
        Ok(out)
    }

    fn parallel(&self) -> Option<&Arc<dyn ParallelContext>> {
        Some(Gpt::parallel(self))
    }

    fn pipeline_layers(&self) -> usize {
        self.config.n_layer + 2
    }

    fn forward_layers(
        &self,
        input: StageInput<'_>,
        layers: std::ops::Range<usize>,
        dropout: Option<DropoutKey>,
    ) -> Result<ModelOutput> {
        let input = match input {
            StageInput::Model(ModelInput::Tokens { ids, batch, seq }) => {
                anneal_nn::PartInput::Tokens {
                    ids,
                    batch: *batch,
                    seq: *seq,
                }
            }
            StageInput::Model(_) => {
                return Err(anneal_tensor::Error::Invalid {
                    op: "Gpt",
                    reason: "a GPT reads token windows".into(),
                })
            }
            StageInput::Hidden { x, batch, seq } => anneal_nn::PartInput::Hidden { x, batch, seq },
        };
        let last = layers.end == self.pipeline_layers();
        let (out, moe) = self.forward_part(input, layers, dropout)?;
        let mut out = ModelOutput::with_moe(out, moe)?;
        if last {
            out.parallel =
                (self.parallel().tensor_parallel().1 > 1).then(|| self.parallel().clone());
        }
        Ok(out)
    }

    fn flops_per_token(&self, seq: usize) -> f64 {
        self.config.flops_per_token(seq)
    }
}

/// A BERT: class logits of padded sequences (with a classification head), or, on masked sentence
/// pairs (with pretraining heads), masked-LM logits at the predicted positions with the
/// next-sentence logits as the extra `next_sentence`.
impl TrainModel for Bert {
    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    fn forward(&self, input: &ModelInput<'_>, dropout: Option<DropoutKey>) -> Result<ModelOutput> {
        let mask_of = |lengths: &[usize], seq: usize| -> Vec<bool> {
            lengths
                .iter()
                .flat_map(|&l| (0..seq).map(move |i| i < l))
                .collect()
        };
        match input {
            ModelInput::Sequences {
                ids,
                lengths,
                batch,
                seq,
            } => {
                let input = BertInput {
                    ids: ids.to_vec(),
                    token_types: None,
                    mask: mask_of(lengths, *seq),
                    batch: *batch,
                    seq: *seq,
                };
                Ok(ModelOutput::logits(self.classify(&input, dropout)?))
            }
            ModelInput::MaskedPairs {
                ids,
                token_types,
                lengths,
                targets,
                batch,
                seq,
            } => {
                let input = BertInput {
                    ids: ids.to_vec(),
                    token_types: Some(token_types.to_vec()),
                    mask: mask_of(lengths, *seq),
                    batch: *batch,
                    seq: *seq,
                };
                let predict: Vec<usize> = targets
                    .iter()
                    .enumerate()
                    .filter(|(_, &t)| t >= 0)
                    .map(|(i, _)| i)
                    .collect();
                let out = self.pretraining_logits(&input, &predict, dropout)?;
                let mut output = ModelOutput::logits(out.mlm);
                output.extras = vec![("next_sentence".into(), out.next_sentence)];
                Ok(output)
            }
            _ => Err(anneal_tensor::Error::Invalid {
                op: "Bert",
                reason: "a BERT reads padded sequences or masked sentence pairs".into(),
            }),
        }
    }

    /// 6·N per token over the encoder's parameters (the attention term is small at 256 tokens).
    fn flops_per_token(&self, _seq: usize) -> f64 {
        6.0 * self.params.numel() as f64
    }
}

/// LeNet-5: class logits of images.
impl TrainModel for LeNet {
    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    fn forward(&self, input: &ModelInput<'_>, _dropout: Option<DropoutKey>) -> Result<ModelOutput> {
        Ok(ModelOutput::logits(LeNet::forward(
            self,
            &input.image_tensor("LeNet")?,
        )?))
    }

    /// Per image: the "tokens" of an image model are its images.
    fn flops_per_token(&self, _seq: usize) -> f64 {
        self.flops_per_image()
    }
}

/// A ViT: class logits of images, or, on masked images, MAE's predicted patches with the mask
/// (`mask`, `[B, P]`, 1 where hidden) and the true patches (`target`, `[B, P, C·p²]`) as extras.
/// The mask is drawn from the dropout key (its seed and the batch's first row), so it depends on
/// the step alone; evaluation masks with seed 0.
impl TrainModel for Vit {
    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    fn forward(&self, input: &ModelInput<'_>, dropout: Option<DropoutKey>) -> Result<ModelOutput> {
        let images = input.image_tensor("Vit")?;
        if let ModelInput::ContrastiveImages { .. } = input {
            return Ok(ModelOutput::logits(self.predict(&images, dropout)?));
        }
        let ModelInput::MaskedImages { mask_ratio, .. } = input else {
            return Ok(ModelOutput::logits(self.classify(&images, dropout)?));
        };
        let seed = dropout.map_or(0, |k| {
            k.seed
                ^ k.first_row
                    .wrapping_add(1)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        let out = self.mae(&images, *mask_ratio, seed, dropout)?;
        let [b, p] = [out.patches.shape()[0], out.patches.shape()[1]];
        let mut output = ModelOutput::logits(out.pred);
        output.extras = vec![
            ("mask".into(), Tensor::from_f32(out.mask, &[b, p])?),
            ("target".into(), out.patches),
        ];
        Ok(output)
    }

    fn flops_per_token(&self, _seq: usize) -> f64 {
        self.flops_per_image()
    }
}

/// A stacked-autoencoder classifier: class logits of flattened images, or, for one stage of
/// layer-wise pretraining, the reconstruction of that layer's input with the input itself
/// (`target`) as an extra.
impl TrainModel for StackedAutoencoder {
    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    fn forward(&self, input: &ModelInput<'_>, _dropout: Option<DropoutKey>) -> Result<ModelOutput> {
        let images = input.image_tensor("StackedAutoencoder")?;
        let n = images.shape()[0];
        let flat = images.reshape(&[n, images.numel() / n.max(1)])?;
        if let ModelInput::ReconstructLayer { layer, .. } = input {
            let (out, target) = self.reconstruct(&flat, *layer)?;
            let mut output = ModelOutput::logits(out);
            output.extras = vec![("target".into(), target)];
            return Ok(output);
        }
        Ok(ModelOutput::logits(self.classify(&flat)?))
    }

    fn flops_per_token(&self, _seq: usize) -> f64 {
        self.flops_per_example()
    }
}
