//! `anneal chat`: a conversation with a chat model, through the chat template its file carries.

use crate::run::{Generator, SampleArgs};
use anneal_train::chat::Message;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// Arguments of `anneal chat`.
#[derive(Args)]
pub struct ChatArgs {
    /// A chat model: a Llama GGUF file with a chat template (SmolLM2-135M-Instruct, say).
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply (as `anneal finetune --set train.out=DIR` writes).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A system message (default: the template's own, where it has one).
    #[arg(long)]
    pub system: Option<String>,
    /// A user message to answer; repeat for several turns. Without any, messages are read from
    /// standard input, one per line, until end of input or an empty line.
    #[arg(long = "message", short)]
    pub messages: Vec<String>,
    /// Print the rendered conversation the model reads before each reply.
    #[arg(long)]
    pub show_prompt: bool,
    #[command(flatten)]
    pub sample: SampleArgs,
}

/// `anneal chat`.
pub fn run(a: ChatArgs) -> Result<()> {
    let opts = a.sample.options()?;
    let g = Generator::load(&a.model, a.adapter.as_deref())?;
    let Some(template) = g.chat_template.clone() else {
        bail!(
            "{}: the model carries no chat template (GGUF tokenizer.chat_template); use anneal \
             generate to continue plain text",
            a.model.display()
        );
    };
    let mut conversation: Vec<Message> =
        a.system.iter().map(|s| Message::new("system", s)).collect();
    let interactive = a.messages.is_empty();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut given = a.messages.into_iter();
    loop {
        let user = if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
            match lines.next() {
                Some(line) => line.context("reading standard input")?,
                None => break,
            }
        } else {
            match given.next() {
                Some(m) => m,
                None => break,
            }
        };
        if interactive && user.trim().is_empty() {
            break;
        }
        if !interactive {
            println!("> {user}");
        }
        conversation.push(Message::new("user", &user));
        let prompt = template.render(&conversation, true)?;
        if a.show_prompt {
            println!("[prompt]\n{prompt}[/prompt]");
        }
        let ids = g.encode(&prompt)?;
        if ids.len() >= g.model.context() {
            bail!(
                "the conversation is {} tokens, the model's context {}",
                ids.len(),
                g.model.context()
            );
        }
        let started = std::time::Instant::now();
        let new = g.stream(&ids, &opts)?;
        println!();
        let reply = g.tokenizer.decode(&new)?;
        tracing::debug!(
            "{} tokens in {:.2} s",
            new.len(),
            started.elapsed().as_secs_f64()
        );
        conversation.push(Message::new("assistant", reply.trim_end()));
    }
    Ok(())
}
