//! `burnish chat`: an interactive conversation with a model (and optionally an adapter) through
//! its own chat template, replies streamed as they are generated. Each line read is a user turn;
//! `/reset` starts the conversation over, `/exit` (or end of input) leaves. On a terminal a
//! `> ` prompt is shown on stderr; replies alone go to stdout, one per line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burnish_data::{Message, Tokenizer};
use burnish_hub::resolve_model;
use clap::Args;

use crate::commands::stream::{SamplingArgs, generate_to_stdout};
use crate::device::{DeviceArg, FrozenDtype, Job, run_on};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model directory (config.json, safetensors weights, tokenizer files, chat template), or a
    /// Hub id (`owner/name`) fetched into the Hub cache.
    #[arg(long)]
    model: PathBuf,
    /// Branch, tag or commit of a Hub model (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// A LoRA adapter directory in PEFT's format to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A system message opening every conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    dtype: FrozenDtype,
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
}

struct Chat {
    args: ChatArgs,
}

impl Job for Chat {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let tokenizer = Tokenizer::from_dir(&args.model)?;
        let template = super::chat_template(&args.model, args.adapter.as_deref())?;
        let pretrained = args
            .dtype
            .load::<B>(&args.model, args.adapter.as_deref(), &device)?;
        super::require_lm_head(&pretrained.model, &args.model)?;
        let options = args.sampling.options(&pretrained, &tokenizer);
        let opening: Vec<Message> = args
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect();
        let mut history = opening.clone();
        let interactive = std::io::stdin().is_terminal();
        let prompt = || -> Result<()> {
            if interactive {
                eprint!("> ");
                std::io::stderr().flush()?;
            }
            Ok(())
        };

        prompt()?;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            match line.trim() {
                "/exit" => break,
                "/reset" => {
                    history = opening.clone();
                    if interactive {
                        eprintln!("(conversation reset)");
                    }
                }
                "" => {}
                text => {
                    history.push(Message::new("user", text));
                    let rendered = template.render(&history, true, &tokenizer.special)?;
                    // apply_chat_template tokenizes without the post-processor: the template holds BOS.
                    let ids = tokenizer.encode(&rendered, false)?;
                    let reply = generate_to_stdout(&pretrained.model, &tokenizer, &ids, &options)?;
                    println!();
                    history.push(Message::new("assistant", reply));
                }
            }
            prompt()?;
        }
        Ok(())
    }
}

pub fn run(mut args: ChatArgs) -> Result<()> {
    args.model = resolve_model(&args.model, args.revision.as_deref(), |f| eprintln!("{f}"))?;
    let device = args.device;
    run_on(device, Chat { args })
}
