//! Chat templates: the Jinja template a model's files carry (`tokenizer.chat_template` in GGUF,
//! `chat_template` in a Hugging Face `tokenizer_config.json`), rendered with `minijinja` the way
//! transformers' `apply_chat_template` renders it: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token` and `raise_exception` in scope.

use anneal_data::Tokenizer;
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled-once, checked chat template.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    // As transformers compiles them: a newline after a block tag is dropped, and so is the
    // indentation before one.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env
}

impl ChatTemplate {
    /// Parses `source`; `bos` and `eos` name the tokens the template may write.
    pub fn new(
        source: &str,
        tokenizer: &Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<ChatTemplate> {
        let token = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        environment()
            .template_from_str(source)
            .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
        Ok(ChatTemplate {
            source: source.to_string(),
            bos_token: token(bos),
            eos_token: token(eos),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The conversation as the model reads it; with `add_generation_prompt`, followed by the
    /// opening of the assistant's next turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| anyhow!("rendering the chat template: {e}"))
    }
}
