//! Streaming generation to stdout, shared by `generate` and `chat`: decoded text is printed as
//! tokens arrive, holding back text that may still change (an incomplete UTF-8 sequence decodes
//! to U+FFFD until its last byte arrives).

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burnish_data::Tokenizer;
use burnish_model::{Decoder, GenerateOptions, Pretrained, generate};
use clap::Args;

/// How replies are decoded: the options `generate` and `chat` share.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens reaching probability P.
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// Generation options that stop on the model's and the tokenizer's end tokens.
    pub fn options<B: Backend>(
        &self,
        model: &Pretrained<B>,
        tokenizer: &Tokenizer,
    ) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop_tokens: stop_tokens(model, tokenizer),
        }
    }
}

/// The tokens that end a reply: the model's EOS ids and the tokenizer's EOS token.
fn stop_tokens<B: Backend>(model: &Pretrained<B>, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut stop = model.eos_token_ids();
    if let Some(id) = tokenizer
        .special
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
    {
        stop.push(id);
    }
    stop
}

/// Generates after `prompt`, printing the text as it comes; returns the text generated (special
/// tokens left out).
pub fn generate_to_stdout<B: Backend>(
    model: &Decoder<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<String> {
    let mut tokens = Vec::new();
    let mut printed = 0;
    let mut failure = None;
    generate(model, prompt, options, |token| {
        tokens.push(token);
        let mut step = || -> Result<()> {
            let text = tokenizer.decode(&tokens, true)?;
            if text.ends_with('\u{FFFD}') || text.len() < printed {
                return Ok(());
            }
            let mut out = std::io::stdout().lock();
            out.write_all(&text.as_bytes()[printed..])?;
            out.flush()?;
            printed = text.len();
            Ok(())
        };
        match step() {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(tokenizer.decode(&tokens, true)?)
}
