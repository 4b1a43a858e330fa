//! `burnish bench`: builds a random-weight model of a real shape and measures it. Today it
//! times forward passes (tokens/s, step time, peak memory); training steps come with the trainer.
//! Speed is measured here, never in tests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_model::{HfConfig, RandomWeights, build_decoder};
use clap::{Args, ValueEnum};

use crate::device::{DeviceArg, Job, run_on};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A named shape (fixture, smollm2-135m, smollm2-360m, tinyllama-1.1b) or a config.json path.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    #[arg(long, value_enum, default_value_t = Mode::Forward)]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    batch: usize,
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
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Full-sequence forward passes without gradients (prefill / scoring).
    Forward,
}

/// Configurations of the shapes people tune, as their `config.json` states them.
fn named_shape(name: &str) -> Option<&'static str> {
    Some(match name {
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

/// Peak resident memory of this process so far (Linux), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Bench {
    args: BenchArgs,
}

impl Job for Bench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.args;
        anyhow::ensure!(
            a.batch > 0 && a.seq > 0 && a.steps > 0,
            "--batch, --seq and --steps must be positive"
        );
        let config = load_shape(&a.shape)?;
        let model = build_decoder::<B>(
            &config.decoder,
            &RandomWeights { seed: 0, std: 0.02 },
            &device,
        )?;
        let vocab = config.decoder.vocab_size as i64;
        let ids: Vec<i64> = (0..a.batch * a.seq)
            .map(|i| (i as i64 * 7919) % vocab)
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [a.batch, a.seq]), &device);

        let pass = || -> Result<()> {
            let logits = match a.mode {
                Mode::Forward => model.forward(ids.clone()),
            };
            // Reading one value back waits for the device to finish.
            let _ = logits.narrow(1, 0, 1).sum().into_scalar();
            Ok(())
        };
        for _ in 0..a.warmup {
            pass()?;
        }
        let start = Instant::now();
        for _ in 0..a.steps {
            pass()?;
        }
        let step_s = start.elapsed().as_secs_f64() / a.steps as f64;
        let tokens_per_s = (a.batch * a.seq) as f64 / step_s;
        let peak = peak_rss_bytes();
        if a.json {
            let out = serde_json::json!({
                "shape": a.shape, "mode": format!("{:?}", a.mode).to_lowercase(),
                "batch": a.batch, "seq": a.seq, "steps": a.steps,
                "tokens_per_s": tokens_per_s, "step_ms": step_s * 1e3,
                "peak_memory_bytes": peak, "memory": "peak resident set of the process",
            });
            println!("{out}");
        } else {
            println!(
                "{} {:?} batch {} x seq {}: {:.1} ms/step, {:.0} tokens/s, peak RSS {}",
                a.shape,
                a.mode,
                a.batch,
                a.seq,
                step_s * 1e3,
                tokens_per_s,
                peak.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
                    .unwrap_or_else(|| "n/a".into())
            );
        }
        Ok(())
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device;
    run_on(device, Bench { args })
}
