//! `burnish generate`: continue a prompt (or answer it through the model's chat template with
//! `--chat`) and print only the generated text, streamed as it is produced.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burnish_data::{Message, Tokenizer};
use burnish_hub::resolve_model;
use clap::Args;

use crate::commands::stream::{SamplingArgs, generate_to_stdout};
use crate::device::{DeviceArg, FrozenDtype, Job, run_on};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors weights, tokenizer files), or a Hub id
    /// (`owner/name`) fetched into the Hub cache.
    #[arg(long)]
    model: PathBuf,
    /// Branch, tag or commit of a Hub model (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A LoRA adapter directory in PEFT's format to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    dtype: FrozenDtype,
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
}

struct Generate {
    args: GenerateArgs,
}

impl Job for Generate {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let tokenizer = Tokenizer::from_dir(&args.model)?;
        let prompt_ids = if args.chat {
            let template = super::chat_template(&args.model, args.adapter.as_deref())?;
            let text = template.render(
                &[Message::new("user", &args.prompt)],
                true,
                &tokenizer.special,
            )?;
            // apply_chat_template tokenizes without the post-processor: the template holds BOS.
            tokenizer.encode(&text, false)?
        } else {
            tokenizer.encode(&args.prompt, true)?
        };
        let pretrained = args
            .dtype
            .load::<B>(&args.model, args.adapter.as_deref(), &device)?;
        super::require_lm_head(&pretrained.model, &args.model)?;

        let options = args.sampling.options(&pretrained, &tokenizer);
        generate_to_stdout(&pretrained.model, &tokenizer, &prompt_ids, &options)?;
        println!();
        Ok(())
    }
}

pub fn run(mut args: GenerateArgs) -> Result<()> {
    args.model = resolve_model(&args.model, args.revision.as_deref(), |f| eprintln!("{f}"))?;
    let device = args.device;
    run_on(device, Generate { args })
}
