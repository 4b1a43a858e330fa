//! `burnish bench`: builds a random-weight model of a real shape and measures it: forward passes,
//! or full LoRA training steps (forward, backward, AdamW) with r on all seven projections, SFT or
//! DPO, the same measurement as `peer_lora.py` makes with transformers + PEFT. Reports tokens/s,
//! step time and peak memory. Speed is measured here, never in tests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burnish_align::{
    Activations, AdamW, AdamWConfig, Cpo, CpoLoss, Dpo, Kto, KtoLoss, LabeledBatch, Orpo,
    PairBatch, Reward, Schedule, ScheduleKind, ScoredPairs, Sft, TokenBatch, optimizer_step,
};
use burnish_model::{BaseDtype, HfConfig, RandomWeights, build_decoder};
use burnish_peft::{LoraConfig, Targets};
use clap::{Args, ValueEnum};

use crate::device::{
    DeviceArg, Job, base_dtype_for, own_gpu_kernels, product_route, row_reduction, run_on,
};
use crate::memory::MemoryGauge;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A named shape (tiny, fixture, smollm2-135m, smollm2-360m, tinyllama-1.1b) or a config.json path.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    #[arg(long, value_enum, default_value_t = Mode::Forward)]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// LoRA rank for the training modes (alpha is twice the rank).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Untimed passes before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed passes.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
    /// Precision the frozen base weights are held in: f32, bf16 (half the memory; on a GPU the
    /// activations are bf16 too), nf4 (QLoRA's 4-bit codes for the layers' projections, their
    /// block maxima double-quantized), nf4-plain (maxima as they are), or auto (bf16 on a GPU,
    /// f32 on the CPU).
    #[arg(long, default_value = "auto")]
    dtype: BaseDtype,
    /// Recompute each layer's activations in the backward pass (training modes): what
    /// `train.gradient_checkpointing` does.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Documents per row in the training modes: each row packed with this many documents of
    /// equal length (positions restart, and attention stays within each document), as
    /// `train.pack` lays rows out.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    documents: u32,
    /// DoRA adapters instead of plain LoRA in the training modes (`adapter.use_dora`).
    #[arg(long)]
    dora: bool,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Full-sequence forward passes without gradients (prefill / scoring).
    Forward,
    /// LoRA SFT steps on batch × seq tokens, every token trained.
    Sft,
    /// LoRA DPO steps on batch pairs of seq tokens (chosen and rejected), sigmoid loss, the
    /// reference being the same model with its adapter off.
    Dpo,
    /// LoRA ORPO steps on the same pairs as `dpo`: no reference pass.
    Orpo,
    /// LoRA CPO steps (sigmoid loss and the chosen completions' NLL) on the same pairs as `dpo`.
    Cpo,
    /// LoRA KTO steps on batch labeled completions of seq tokens (half of them desirable): the
    /// trained pass, and without gradients the policy's and the reference's (adapter off)
    /// passes over the KL rows and the reference's over the trained rows.
    Kto,
    /// Reward-model steps on the same pairs as `dpo`: the model a one-label classifier whose
    /// `score` head trains beside the adapter, each sequence scored at its last token.
    Reward,
}

/// Configurations of the shapes people tune, as their `config.json` states them.
fn named_shape(name: &str) -> Option<&'static str> {
    Some(match name {
        // transformers + PEFT's peer benchmark's smallest shape.
        "tiny" => {
            r#"{"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0}"#
        }
        "fixture" => {
            r#"{"model_type": "llama", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0}"#
        }
        "smollm2-135m" => {
            r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true}"#
        }
        "smollm2-360m" => {
            r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560,
            "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true}"#
        }
        "tinyllama-1.1b" => {
            r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#
        }
        _ => return None,
    })
}

fn load_shape(shape: &str) -> Result<HfConfig> {
    match named_shape(shape) {
        Some(json) => Ok(HfConfig::from_json_str(json, &PathBuf::from(shape))?),
        None => Ok(HfConfig::from_file(Path::new(shape)).with_context(|| {
            format!("--shape `{shape}` is neither a known shape nor a readable config.json")
        })?),
    }
}

struct Bench {
    args: BenchArgs,
}

impl Job for Bench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let mut a = self.args;
        a.dtype = base_dtype_for::<B>(a.dtype, &device, true)?;
        anyhow::ensure!(
            a.batch > 0 && a.seq > 0 && a.steps > 0,
            "--batch, --seq and --steps must be positive"
        );
        let config = load_shape(&a.shape)?;
        let vocab = config.decoder.vocab_size as u32;
        // Two fixed pseudo-random sequences per row: inputs (chosen) and rejected.
        let ids: Vec<u32> = (0..a.batch * a.seq)
            .map(|i| (i as u32).wrapping_mul(7919) % vocab)
            .collect();
        let rejected: Vec<u32> = (0..a.batch * a.seq)
            .map(|i| (i as u32).wrapping_mul(104_729) % vocab)
            .collect();

        let mut memory = MemoryGauge::start(&device);
        let mut weights = 0;
        let step_s = if a.mode == Mode::Forward {
            let model = build_decoder::<B>(
                &config.decoder,
                &RandomWeights { seed: 0, std: 0.02 },
                a.dtype,
                &device,
            )?;
            weights = model.parameter_bytes();
            let input = Tensor::<B, 2, Int>::from_data(
                TensorData::new(
                    ids.iter().map(|&t| i64::from(t)).collect(),
                    [a.batch, a.seq],
                ),
                &device,
            );
            time_steps(a.warmup, a.steps, || {
                // Reading one value back waits for the device to finish.
                let _ = model
                    .forward(input.clone())
                    .narrow(1, 0, 1)
                    .sum()
                    .into_scalar();
                memory.sample();
                Ok(())
            })?
        } else {
            train_steps::<Autodiff<B>>(
                &a,
                &config,
                &ids,
                &rejected,
                &device,
                &mut memory,
                &mut weights,
            )?
        };
        let pairs = matches!(a.mode, Mode::Dpo | Mode::Orpo | Mode::Cpo | Mode::Reward);
        let tokens = a.batch * a.seq * if pairs { 2 } else { 1 };
        let tokens_per_s = tokens as f64 / step_s;
        let peak = memory.peak_bytes();
        if a.json {
            let out = serde_json::json!({
                "shape": a.shape, "mode": format!("{:?}", a.mode).to_lowercase(),
                "batch": a.batch, "seq": a.seq, "steps": a.steps, "rank": a.rank,
                "dtype": a.dtype.to_string(),
                "activations": format!("{:?}", a.dtype.activations::<B>()).to_lowercase(),
                "tokens_per_s": tokens_per_s, "step_ms": step_s * 1e3,
                "peak_memory_bytes": peak, "memory": memory.describe(),
                "parameter_bytes": weights,
                "matmul": product_route::<B>(a.dtype), "backend": B::name(&device),
                "autotune": cfg!(feature = "autotune"),
                "gpu_kernels": own_gpu_kernels::<B>(),
                "row_reduction": row_reduction::<B>(),
                "gradient_checkpointing": a.gradient_checkpointing,
                "documents": a.documents,
                "dora": a.dora,
            });
            println!("{out}");
        } else {
            println!(
                "{} {:?} batch {} x seq {}, base in {}{}{}: {:.1} ms/step, {:.0} tokens/s, peak memory {} ({}), parameters {:.2} GiB",
                a.shape,
                a.mode,
                a.batch,
                a.seq,
                a.dtype,
                if a.gradient_checkpointing {
                    ", layers recomputed"
                } else {
                    ""
                },
                if a.documents > 1 {
                    format!(", {} documents a row", a.documents)
                } else {
                    String::new()
                },
                step_s * 1e3,
                tokens_per_s,
                peak.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
                    .unwrap_or_else(|| "n/a".into()),
                memory.describe(),
                weights as f64 / (1u64 << 30) as f64,
            );
        }
        Ok(())
    }
}

/// Mean seconds per call of `step` over `steps` calls, after `warmup` untimed ones.
fn time_steps(warmup: usize, steps: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        step()?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    Ok(start.elapsed().as_secs_f64() / steps as f64)
}

/// Seconds per LoRA training step (forward, backward, AdamW) in `a.mode`; the bytes the model's
/// parameters hold into `weights`.
fn train_steps<AD: AutodiffBackend>(
    a: &BenchArgs,
    config: &HfConfig,
    ids: &[u32],
    rejected: &[u32],
    device: &AD::Device,
    memory: &mut MemoryGauge,
    weights: &mut u64,
) -> Result<f64> {
    let base = build_decoder::<AD>(
        &config.decoder,
        &RandomWeights { seed: 0, std: 0.02 },
        a.dtype,
        device,
    )?;
    let lora = LoraConfig {
        r: a.rank,
        lora_alpha: 2.0 * a.rank as f64,
        targets: Targets::AllLinear,
        use_dora: a.dora,
        ..Default::default()
    };
    let base = match a.mode {
        Mode::Reward => base.into_reward_model(0, 0.02),
        _ => base,
    };
    let (mut model, _) = base.with_lora(&lora, 0)?;
    model.score = model.score.map(|head| head.set_require_grad(true));
    *weights = model.parameter_bytes();
    let mut model = Some(model);
    // Documents of `length` tokens laid end to end (a row's last one may be shorter), numbered
    // from 1 (0 is padding).
    let length = a.seq.div_ceil(a.documents as usize) as u32;
    let rows = |tokens: &[u32]| {
        let trained = vec![true; tokens.len()];
        let row = || 0..a.seq as u32;
        let positions: Vec<u32> = (0..a.batch)
            .flat_map(|_| row().map(|p| p % length))
            .collect();
        let segments: Vec<u32> = (0..a.batch)
            .flat_map(|_| row().map(|p| 1 + p / length))
            .collect();
        TokenBatch::<AD>::from_rows(
            a.batch, a.seq, tokens, &trained, &positions, &segments, device,
        )
    };
    let sft = [rows(ids)];
    let pairs = [PairBatch {
        chosen: rows(ids),
        rejected: rows(rejected),
        reference: None,
    }];
    // Other tokens of the same shape stand in for the rotated completions of the KL rows.
    let labeled = [LabeledBatch {
        matched: rows(ids),
        mismatched: Some(rows(rejected)),
        desirable: (0..a.batch).map(|i| i % 2 == 0).collect(),
    }];
    let kto = Kto {
        loss: KtoLoss {
            beta: 0.1,
            uses_kl: true,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        },
        reference: None,
    };
    let dpo = Dpo::sigmoid(0.1);
    // The chosen rows, then the rejected ones, each scored at its last token.
    let sequences: Vec<i64> = ids.iter().chain(rejected).map(|&t| i64::from(t)).collect();
    let scored = [ScoredPairs::<AD> {
        ids: Tensor::from_data(TensorData::new(sequences, [2 * a.batch, a.seq]), device),
        positions: vec![a.seq - 1; 2 * a.batch],
        tokens: 2 * a.batch * a.seq,
        margins: None,
    }];
    let schedule = Schedule {
        kind: ScheduleKind::Constant,
        peak_lr: 1e-4,
        warmup_steps: 0,
        total_steps: usize::MAX,
    };
    let activations = Activations::checkpointed_if(a.gradient_checkpointing);
    let mut optimizer = AdamW::<AD>::new(AdamWConfig::default());
    time_steps(a.warmup, a.steps, || {
        let current = model
            .take()
            .expect("the model is put back after every step");
        let (next, _) = match a.mode {
            Mode::Dpo => optimizer_step(
                current,
                &dpo,
                &pairs,
                &mut optimizer,
                &schedule,
                activations,
            )?,
            Mode::Orpo => optimizer_step(
                current,
                &Orpo { beta: 0.1 },
                &pairs,
                &mut optimizer,
                &schedule,
                activations,
            )?,
            Mode::Cpo => optimizer_step(
                current,
                &Cpo {
                    loss: CpoLoss::Sigmoid {
                        label_smoothing: 0.0,
                    },
                    beta: 0.1,
                    cpo_alpha: 1.0,
                    alpha: 0.0,
                },
                &pairs,
                &mut optimizer,
                &schedule,
                activations,
            )?,
            Mode::Kto => optimizer_step(
                current,
                &kto,
                &labeled,
                &mut optimizer,
                &schedule,
                activations,
            )?,
            Mode::Reward => optimizer_step(
                current,
                &Reward::default(),
                &scored,
                &mut optimizer,
                &schedule,
                activations,
            )?,
            _ => optimizer_step(current, &Sft, &sft, &mut optimizer, &schedule, activations)?,
        };
        model = Some(next);
        memory.sample();
        Ok(())
    })
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device;
    run_on(device, Bench { args })
}
