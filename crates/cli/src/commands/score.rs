//! `burnish score`: the log-probability of each token of a text (or id list) given its prefix.
//! With `--json` it prints exactly one object, `{"token_ids", "logprobs", "sum"}`, where
//! `logprobs[i] = log p(token_ids[i+1] | token_ids[..=i])`. This interface is kept stable: it is
//! our log-likelihood tool and parity probe. A sequence classifier (a reward model) gets its
//! reward instead, read at the last token that is not the pad token: `{"token_ids", "reward"}`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;
use burnish_data::Tokenizer;
use burnish_hub::resolve_model;
use burnish_model::{batch_rewards, token_logprobs};
use clap::Args;

use crate::device::{DeviceArg, FrozenDtype, Job, run_on};

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Model directory (config.json, safetensors weights, tokenizer files), or a Hub id
    /// (`owner/name`) fetched into the Hub cache.
    #[arg(long)]
    model: PathBuf,
    /// Branch, tag or commit of a Hub model (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// Text to score, tokenized without special tokens.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    text: Option<String>,
    /// Token ids to score, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// A LoRA adapter directory in PEFT's format to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
    #[command(flatten)]
    dtype: FrozenDtype,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

struct Score {
    args: ScoreArgs,
}

impl Job for Score {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let tokenizer = match &args.text {
            Some(_) => Some(Tokenizer::from_dir(&args.model)?),
            None => None,
        };
        let ids = match (&args.text, &tokenizer, args.ids) {
            (Some(text), Some(tok), _) => tok.encode(text, false)?,
            (_, _, Some(ids)) => ids,
            _ => bail!("give --text or --ids"),
        };
        let mut pretrained = args
            .dtype
            .load::<B>(&args.model, args.adapter.as_deref(), &device)?;
        if pretrained.model.is_classifier() {
            super::pad_as_trained(&mut pretrained, &args.model)?;
            let reward = batch_rewards(&pretrained.model, std::slice::from_ref(&ids))?[0];
            match args.json {
                true => println!(
                    "{}",
                    serde_json::json!({"token_ids": ids, "reward": reward})
                ),
                false => println!("reward {reward:.6}"),
            }
            return Ok(());
        }
        let logprobs = token_logprobs(&pretrained.model, &ids)?;
        let sum: f64 = logprobs.iter().map(|&l| f64::from(l)).sum();
        if args.json {
            let out = serde_json::json!({"token_ids": ids, "logprobs": logprobs, "sum": sum});
            println!("{out}");
            return Ok(());
        }
        println!("{:>6}  {:>8}  {:>10}  token", "pos", "id", "logprob");
        for (i, (id, lp)) in ids.iter().skip(1).zip(&logprobs).enumerate() {
            let piece = match &tokenizer {
                Some(tok) => format!("{:?}", tok.decode(&[*id], false)?),
                None => String::new(),
            };
            println!("{:>6}  {:>8}  {:>10.4}  {piece}", i + 1, id, lp);
        }
        let mean = sum / logprobs.len() as f64;
        println!(
            "sum {sum:.4}  mean {mean:.4}  perplexity {:.3}",
            (-mean).exp()
        );
        Ok(())
    }
}

pub fn run(mut args: ScoreArgs) -> Result<()> {
    args.model = resolve_model(&args.model, args.revision.as_deref(), |f| eprintln!("{f}"))?;
    let device = args.device;
    run_on(device, Score { args })
}
