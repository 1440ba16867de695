//! Supervised fine-tuning of a chat model: conversations rendered through the model's chat
//! template, the loss taken only on the assistant's tokens (each reply and the end-of-turn
//! token that closes it), the system and user turns and the template's markup read but not
//! predicted. `anneal finetune` runs it for `data.format = "chatterbot"`.

use crate::chat::{ChatTemplate, Message};
use crate::finetune::{resolve, train_run, FinetuneConfig, TrainRun};
use crate::generate::{generate_until, SampleOptions};
use crate::llama_gguf::LlamaModel;
use crate::model::{ModelInput, ModelOutput, TrainModel};
use crate::objectives::CausalLm;
use anneal_data::dialogue::{read_chatterbot, Conversation};
use anneal_data::MaskedSource;
use anneal_nn::layers::LoraConfig;
use anneal_nn::Llama;
use anneal_tensor::{CrossEntropyOptions, DropoutKey, ParamStore};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

impl TrainModel for Llama {
    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    fn forward(
        &self,
        input: &ModelInput<'_>,
        dropout: Option<DropoutKey>,
    ) -> anneal_tensor::Result<ModelOutput> {
        let ModelInput::Tokens { ids, batch, seq } = input else {
            return Err(anneal_tensor::Error::Invalid {
                op: "Llama",
                reason: "a Llama reads token windows".into(),
            });
        };
        Ok(ModelOutput::logits(Llama::forward(
            self, ids, *batch, *seq, dropout,
        )?))
    }

    fn flops_per_token(&self, seq: usize) -> f64 {
        let c = &self.config;
        6.0 * self.params.numel() as f64 + 12.0 * (c.num_layers * seq * c.hidden_size) as f64
    }
}

/// The tokens of a conversation as the model reads it (through `template`), and which of them
/// it is trained to predict: the assistant's turns, each with the markup that closes it. The
/// turns alternate user and assistant, the user first. Fails when a rendered prefix does not
/// tokenize as a prefix of the whole (a template whose turns merge across their boundary).
pub fn encode_conversation(
    m: &LlamaModel,
    template: &ChatTemplate,
    turns: &[String],
) -> Result<(Vec<u32>, Vec<bool>)> {
    let messages: Vec<Message> = turns
        .iter()
        .enumerate()
        .map(|(i, t)| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, t))
        .collect();
    let tokens = m.encode(&template.render(&messages, false)?)?;
    let mut predicted = vec![false; tokens.len()];
    for i in (1..messages.len()).step_by(2) {
        let before = m.encode(&template.render(&messages[..i], true)?)?;
        let through = m.encode(&template.render(&messages[..=i], false)?)?;
        let prefix = |p: &[u32]| p.len() <= tokens.len() && tokens[..p.len()] == *p;
        if !prefix(&before) || !prefix(&through) || before.len() > through.len() {
            bail!("the chat template's turn {i} does not tokenize as a prefix of the conversation");
        }
        predicted[before.len()..through.len()].fill(true);
    }
    Ok((tokens, predicted))
}

/// What a chat fine-tuning run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ChatReport {
    /// Parameters trained.
    pub trainable: usize,
    /// All parameters.
    pub total: usize,
    /// Bytes of optimizer state.
    pub optimizer_bytes: usize,
    /// Conversations trained on and held out.
    pub train_conversations: usize,
    /// Conversations held out (every `data.test_every`-th).
    pub heldout_conversations: usize,
    /// Mean cross-entropy of the held-out assistant tokens before training.
    pub heldout_loss_before: f64,
    /// The same after training.
    pub heldout_loss_after: f64,
    /// Mean training loss of each step.
    pub losses: Vec<f64>,
    /// Seconds per optimizer step.
    pub seconds_per_step: f64,
    /// For a few held-out conversations: the user's first turn, the reference reply, and the
    /// model's greedy replies before and after training.
    pub samples: Vec<(String, String, String, String)>,
    /// Conversations skipped: malformed in the corpus, or longer than `data.max_tokens`.
    pub skipped: usize,
}

/// Mean cross-entropy over the predicted tokens of `source`'s examples, `batch` at a time.
fn heldout_loss(model: &dyn TrainModel, source: &MaskedSource, batch: usize) -> Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    let all: Vec<usize> = (0..source.examples.len()).collect();
    for picked in all.chunks(batch.max(1)) {
        let w = source.batch_of(picked);
        let n = w.targets.iter().filter(|&&t| t != -100).count();
        if n == 0 {
            continue;
        }
        let input = ModelInput::Tokens {
            ids: &w.ids,
            batch: w.batch,
            seq: w.seq,
        };
        let loss = anneal_tensor::no_grad(|| {
            model
                .forward(&input, None)?
                .logits
                .cross_entropy(&w.targets, CrossEntropyOptions::default())
        })?;
        sum += loss.to_vec_f32()[0] as f64 * n as f64;
        count += n;
    }
    Ok(sum / count.max(1) as f64)
}

/// Greedy replies (up to 48 tokens) to the first user turn of each of `convs`.
fn replies(
    m: &LlamaModel,
    template: &ChatTemplate,
    convs: &[&Conversation],
) -> Result<Vec<String>> {
    let opts = SampleOptions {
        temperature: 0.0,
        max_new_tokens: 48,
        stop_at_eos: true,
        ..Default::default()
    };
    convs
        .iter()
        .map(|c| {
            let prompt = template.render(&[Message::new("user", &c.turns[0])], true)?;
            let ids = m.encode(&prompt)?;
            let new = generate_until(&m.model, &ids, &m.stop_tokens, &opts, |_| {})?;
            Ok(m.tokenizer.decode(&new)?.trim().to_string())
        })
        .collect()
}

/// Loads the chat model of `config.model.dir` (a Llama GGUF file or Hugging Face directory).
pub(crate) fn load(dir: &Path, lora: Option<LoraConfig>) -> Result<LlamaModel> {
    if crate::llama_gguf::is_gguf(dir) {
        crate::llama_gguf::load(dir, lora)
    } else if crate::hf_llama::is_llama_dir(dir) {
        crate::hf_llama::load_dir(dir, lora)
    } else {
        bail!(
            "{}: chat fine-tuning needs a Llama GGUF file or Hugging Face Llama directory",
            dir.display()
        )
    }
}

/// Trains `model` for `t.steps` steps of next-token loss on the predicted tokens of
/// `examples` ([`crate::finetune::train_run`]).
pub(crate) fn train_masked(
    model: Llama,
    examples: Vec<(Vec<u32>, Vec<bool>)>,
    pad: u32,
    t: &crate::finetune::TrainSection,
    on_step: &mut dyn FnMut(u64, f64),
) -> Result<TrainRun> {
    train_run(
        Box::new(model),
        Box::new(CausalLm),
        Box::new(MaskedSource { examples, pad }),
        t,
        on_step,
    )
}

/// A Llama of `config` (with `lora`'s adapters) holding `params`' values: a trained model back
/// out of the trainer, to generate from.
pub(crate) fn llama_with(
    config: anneal_nn::LlamaConfig,
    lora: Option<LoraConfig>,
    params: &ParamStore,
) -> Result<Llama> {
    let mut model = Llama::for_loading(config, lora)?;
    model
        .params
        .load_named(&params.named().into_iter().collect())?;
    model.config.dropout = 0.0;
    Ok(model)
}

/// Fine-tunes the chat model of `config` on the ChatterBot conversations of `config.data.dir`,
/// every `data.test_every`-th held out; `on_step(step, loss)` sees each step's loss.
pub fn run(config: &FinetuneConfig, on_step: &mut dyn FnMut(u64, f64)) -> Result<ChatReport> {
    let t = &config.train;
    let path = resolve(&config.model.dir);
    let m = load(&path, config.lora_config())
        .with_context(|| format!("loading the model of model.dir = {:?}", config.model.dir))?;
    let Some(template) = m.chat_template.clone() else {
        bail!("{}: the model carries no chat template", path.display());
    };
    let data_dir = resolve(&config.data.dir);
    let (convs, read) = read_chatterbot(&data_dir)?;
    for (file, why) in &read.bad_files {
        tracing::warn!("{}: skipped ({why})", file.display());
    }
    let mut skipped = read.bad_conversations.len();
    if skipped > 0 {
        tracing::warn!("{skipped} malformed conversations skipped");
    }
    let every = config.data.test_every.max(1);
    let (mut train, mut heldout, mut held_convs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, c) in convs.iter().enumerate() {
        let (tokens, predicted) = encode_conversation(&m, &template, &c.turns)
            .with_context(|| format!("{}: a conversation", c.file.display()))?;
        if tokens.len() > config.data.max_tokens {
            skipped += 1;
            continue;
        }
        if i % every == 0 {
            heldout.push((tokens, predicted));
            held_convs.push(c);
        } else {
            train.push((tokens, predicted));
        }
    }
    if train.is_empty() || heldout.is_empty() {
        bail!(
            "{}: {} conversations fit data.max_tokens = {}: too few to train and hold out",
            data_dir.display(),
            train.len() + heldout.len(),
            config.data.max_tokens
        );
    }
    let pad = m.stop_tokens.first().copied().unwrap_or(0);
    let held_source = MaskedSource {
        examples: heldout,
        pad,
    };
    let mut model = m.model;
    model.config.dropout = t.dropout as f32;
    match t.method.as_str() {
        "lora" => {
            model.params.train_only(LoraConfig::is_adapter);
        }
        "full" => {}
        other => bail!("train.method = {other:?} is not allowed for chat: \"full\" or \"lora\""),
    }
    crate::finetune::apply_freezing(t, &mut model.params, "model.layers.", "model.embed_tokens.")?;
    let samples_of = held_convs.iter().take(3).copied().collect::<Vec<_>>();
    let heldout_loss_before = heldout_loss(&model, &held_source, t.eval_batch)?;
    let (llama_config, lora) = (model.config.clone(), config.lora_config());
    let mut view = LlamaModel {
        model,
        tokenizer: m.tokenizer,
        chat_template: m.chat_template,
        stop_tokens: m.stop_tokens,
        bos: m.bos,
        source: m.source,
    };
    let before = replies(&view, &template, &samples_of)?;
    let train_count = train.len();
    tracing::info!(
        "{} training and {} held-out conversations",
        train_count,
        held_source.examples.len()
    );
    let TrainRun {
        trainer,
        trainable,
        total,
        optimizer_bytes,
        losses,
        seconds_per_step,
    } = train_masked(view.model, train, pad, t, on_step)?;
    let trained = trainer.model();
    let heldout_loss_after = heldout_loss(trained, &held_source, t.eval_batch)?;
    // The trained parameters in a Llama again, to generate from and to write out.
    view.model = llama_with(llama_config, lora, trained.params())?;
    let after = replies(&view, &template, &samples_of)?;
    if !t.out.is_empty() {
        save(config, &view, Path::new(&t.out))?;
    }
    let samples = samples_of
        .iter()
        .zip(before.into_iter().zip(after))
        .map(|(c, (b, a))| (c.turns[0].clone(), c.turns[1].clone(), b, a))
        .collect();
    Ok(ChatReport {
        trainable,
        total,
        optimizer_bytes,
        train_conversations: train_count,
        heldout_conversations: held_source.examples.len(),
        heldout_loss_before,
        heldout_loss_after,
        losses,
        seconds_per_step,
        samples,
        skipped,
    })
}

/// Writes the fine-tuned chat model: under LoRA its adapters as a PEFT directory for
/// `LlamaForCausalLM`, otherwise the whole model as a Hugging Face Llama directory.
fn save(config: &FinetuneConfig, m: &LlamaModel, out: &Path) -> Result<()> {
    match config.lora_config() {
        Some(lora) => {
            let layout = crate::peft::PeftLayout {
                prefix: "",
                modules_to_save: &[],
                task_type: Some("CAUSAL_LM"),
                base_model: &config.model.dir,
            };
            crate::peft::export(&m.model.params, &lora, &layout, out, true)?;
        }
        None => crate::hf_llama::export(m, out, true)?,
    }
    tracing::info!("wrote the fine-tuned model to {}", out.display());
    Ok(())
}
