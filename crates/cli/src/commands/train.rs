//! `burnish train RECIPE [--set key=value ...]`: run a recipe. Progress goes to stderr: a
//! progress bar with loss, learning rate and tokens/s on a terminal, otherwise one line per
//! optimizer step and per evaluation. The run directory gets the adapter, the resolved recipe,
//! `metrics.jsonl` and a model card.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burnish_align::{Recipe, RunEvent, train};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{DeviceArg, Job, run_on};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe file (TOML; see docs/recipes.md).
    recipe: PathBuf,
    /// Override a recipe key: `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest checkpoint in the run directory (`train.save_every`).
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
}

struct Train {
    recipe: Recipe,
    resume: bool,
}

impl Job for Train {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let mut progress = Progress::new();
        let summary = train::<Autodiff<B>>(&self.recipe, &device, self.resume, |event| {
            progress.show(event)
        })?;
        progress.finish();
        eprintln!("wrote {}", summary.dir.display());
        Ok(())
    }
}

/// Training progress on stderr: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
}

fn metrics_text(metrics: &[(&'static str, f64)]) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("  {k} {v:.4}"))
        .collect()
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("the template is valid"),
            );
            bar
        });
        Self { bar, total: 0 }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn show(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Prepared { train, eval, steps } => {
                self.total = *steps;
                if let Some(bar) = &self.bar {
                    bar.set_length(*steps as u64);
                }
                self.line(format!(
                    "data: {train} training and {eval} evaluation items; {steps} optimizer steps"
                ));
            }
            RunEvent::Step {
                metrics: m,
                tokens_per_s,
            } => {
                let text = format!(
                    "loss {:.4}  lr {:.3e}  grad_norm {:.3}  tok/s {tokens_per_s:.0}{}",
                    m.loss,
                    m.lr,
                    m.grad_norm,
                    metrics_text(&m.metrics)
                );
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(m.step as u64);
                        bar.set_message(text);
                    }
                    None => eprintln!("step {}/{}  {text}", m.step, self.total),
                }
            }
            RunEvent::Checkpoint { step, path } => {
                self.line(format!("checkpoint after step {step}: {}", path.display()))
            }
            RunEvent::Eval {
                step,
                loss,
                metrics,
            } => self.line(format!(
                "eval after step {step}  loss {loss:.4}{}",
                metrics_text(metrics)
            )),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = Recipe::from_file(&args.recipe, &args.overrides)?;
    run_on(
        args.device,
        Train {
            recipe,
            resume: args.resume,
        },
    )
}
