//! `burnish merge`: fold a LoRA adapter into its base model (`--model --adapter`), or merge several
//! adapters or fine-tuned models of one base with a merge method (`--method --base --inputs`).
//! Either way the result is a full Hugging Face model directory (weights, config, tokenizer
//! files), built in a temporary directory and renamed into place only when complete.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burnish_hub::resolve_model;
use burnish_model::{
    BaseDtype, InMemoryWeights, MergeMethod, MergeOptions, NamedWeights, Pretrained, build_decoder,
    merge_weights, named_weights, save_decoder,
};
use burnish_peft::merge_methods::SignMethod;
use burnish_peft::{ADAPTER_CONFIG_FILE, SaveDtype};
use clap::{Args, ValueEnum};

use crate::device::Cpu;

/// Files other than weights and config that a model directory carries along.
const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
];

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model directory, or a Hub id (`owner/name`), with --adapter.
    #[arg(long, requires = "adapter", conflicts_with_all = ["method", "base", "inputs"])]
    model: Option<PathBuf>,
    /// PEFT-format adapter to fold into --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Merge method for several inputs.
    #[arg(long, value_enum, requires_all = ["base", "inputs"])]
    method: Option<Method>,
    /// The common base model of the inputs: a directory or a Hub id (`owner/name`).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Branch, tag or commit of a Hub base model given to --model or --base (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// Adapter or model directories, each optionally weighted: `DIR[:WEIGHT]` (default 1).
    #[arg(long, num_args = 1..)]
    inputs: Vec<String>,
    /// Fraction of each task vector kept by ties, dare_linear and dare_ties.
    #[arg(long, default_value_t = 0.5)]
    density: f64,
    /// How ties and dare_ties elect each element's sign.
    #[arg(long, value_enum, default_value_t = Sign::Total)]
    sign: Sign,
    /// Seed of dare's random drop.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SLERP interpolation point between the two inputs.
    #[arg(long, default_value_t = 0.5)]
    t: f32,
    /// Element type of the written weights (default: the base config's dtype, else f32).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Output directory; must not exist yet (or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Slerp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sign {
    Total,
    Frequency,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

/// Parses `DIR[:WEIGHT]`.
fn parse_input(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((dir, weight)) = spec.rsplit_once(':')
        && let Ok(w) = weight.parse::<f32>()
    {
        ensure!(
            w.is_finite(),
            "--inputs {spec}: the weight must be a finite number"
        );
        return Ok((PathBuf::from(dir), w));
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// The weights of one input: the base with the adapter folded in, or a full model.
fn input_weights(base_dir: &Path, input: &Path, base: &Pretrained<Cpu>) -> Result<NamedWeights> {
    let device = Default::default();
    if input.join(ADAPTER_CONFIG_FILE).exists() {
        let mut model =
            Pretrained::<Cpu>::load_with_adapter(base_dir, Some(input), BaseDtype::F32, &device)
                .with_context(|| format!("applying adapter {}", input.display()))?;
        ensure!(
            !model.model.is_classifier(),
            "{}: a reward model's adapter; --method merges language models only (fold a \
             reward adapter alone with --model DIR --adapter DIR)",
            input.display()
        );
        model.model.merge_and_unload()?;
        return Ok(named_weights(&model.model));
    }
    let model = Pretrained::<Cpu>::load(input, &device)
        .with_context(|| format!("loading {}", input.display()))?;
    ensure!(
        !model.model.is_classifier(),
        "{}: a sequence classifier (a reward model); --method merges language models only",
        input.display()
    );
    ensure!(
        model.config.decoder.model_type == base.config.decoder.model_type
            && model.config.decoder.hidden_size == base.config.decoder.hidden_size
            && model.config.decoder.num_layers == base.config.decoder.num_layers,
        "{}: not the same architecture as the base {}",
        input.display(),
        base_dir.display()
    );
    Ok(named_weights(&model.model))
}

/// Writes the model directory into a temporary sibling of `out`, then renames it into place.
fn write_model_dir(
    out: &Path,
    source_dir: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{}: already exists and is not empty; remove it or choose another --out",
            out.display()
        );
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(&tmp)?;
        // The source's companions first: what `write` writes replaces them.
        for file in COMPANION_FILES {
            let from = source_dir.join(file);
            if from.exists() {
                std::fs::copy(&from, tmp.join(file))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
        write(&tmp)?;
        if out.exists() {
            std::fs::remove_dir(out)?;
        }
        std::fs::rename(&tmp, out)
            .with_context(|| format!("moving the result to {}", out.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

pub fn run(mut args: MergeArgs) -> Result<()> {
    for base in [&mut args.model, &mut args.base].into_iter().flatten() {
        *base = resolve_model(base, args.revision.as_deref(), |f| eprintln!("{f}"))?;
    }
    let device = Default::default();
    let dtype_of = |base: &Pretrained<Cpu>| match args.dtype {
        Some(Dtype::F32) => SaveDtype::F32,
        Some(Dtype::Bf16) => SaveDtype::BF16,
        Some(Dtype::F16) => SaveDtype::F16,
        None => base.declared_dtype().unwrap_or(SaveDtype::F32),
    };

    if let Some(method) = args.method {
        let base_dir = args
            .base
            .clone()
            .expect("clap requires --base with --method");
        let base = Pretrained::<Cpu>::load(&base_dir, &device)
            .with_context(|| format!("loading {}", base_dir.display()))?;
        ensure!(
            !base.model.is_classifier(),
            "{}: a sequence classifier (a reward model); --method merges language models only",
            base_dir.display()
        );
        let base_weights = named_weights(&base.model);
        let mut inputs = Vec::with_capacity(args.inputs.len());
        for spec in &args.inputs {
            let (dir, weight) = parse_input(spec)?;
            inputs.push((input_weights(&base_dir, &dir, &base)?, weight));
        }
        let options = MergeOptions {
            method: match method {
                Method::Linear => MergeMethod::Linear,
                Method::TaskArithmetic => MergeMethod::TaskArithmetic,
                Method::Ties => MergeMethod::Ties,
                Method::DareLinear => MergeMethod::DareLinear,
                Method::DareTies => MergeMethod::DareTies,
                Method::Slerp => MergeMethod::Slerp,
            },
            density: args.density,
            sign: match args.sign {
                Sign::Total => SignMethod::Total,
                Sign::Frequency => SignMethod::Frequency,
            },
            seed: args.seed,
            t: args.t,
        };
        let merged = merge_weights(&base_weights, &inputs, &options)?;
        let model = build_decoder::<Cpu>(
            &base.config.decoder,
            &InMemoryWeights::from(merged),
            BaseDtype::F32,
            &device,
        )?;
        let dtype = dtype_of(&base);
        write_model_dir(&args.out, &base_dir, |dir| {
            Ok(save_decoder(&model, &base.config, dir, dtype)?)
        })?;
    } else {
        let (Some(model_dir), Some(adapter)) = (&args.model, &args.adapter) else {
            bail!("give --model DIR --adapter DIR, or --method M --base DIR --inputs ...");
        };
        // Each projection is folded with the adapter in f32 as it is written.
        let (hold, _) = super::held_as_stored(model_dir)?;
        let mut model =
            Pretrained::<Cpu>::load_with_adapter(model_dir, Some(adapter), hold, &device)
                .with_context(|| {
                    format!(
                        "loading {} with adapter {}",
                        model_dir.display(),
                        adapter.display()
                    )
                })?;
        super::pad_as_trained(&mut model, model_dir)?;
        let dtype = dtype_of(&model);
        // The template the adapter's run was trained with, when its recipe chose one, replaces
        // the base's.
        let template = super::template_file(adapter);
        write_model_dir(&args.out, model_dir, |dir| {
            save_decoder(&model.model, &model.config, dir, dtype)?;
            if let Some(template) = &template {
                std::fs::copy(template, dir.join("chat_template.jinja"))
                    .with_context(|| format!("copying {}", template.display()))?;
            }
            Ok(())
        })?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_parse_with_and_without_weights() {
        assert_eq!(
            parse_input("runs/a:0.7").unwrap(),
            (PathBuf::from("runs/a"), 0.7)
        );
        assert_eq!(
            parse_input("runs/b").unwrap(),
            (PathBuf::from("runs/b"), 1.0)
        );
        assert_eq!(parse_input("C:/x").unwrap(), (PathBuf::from("C:/x"), 1.0));
    }
}
