//! `burnish train RECIPE [--set key=value ...]`: run a recipe. Progress goes to stderr, one line
//! per optimizer step and per evaluation; the run directory gets the adapter, the resolved
//! recipe, `metrics.jsonl` and a model card.

use std::path::PathBuf;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burnish_align::{Recipe, RunEvent, train};
use clap::Args;

use crate::device::{DeviceArg, Job, run_on};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe file (TOML; see docs/recipes.md).
    recipe: PathBuf,
    /// Override a recipe key: `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
}

struct Train {
    recipe: Recipe,
}

impl Job for Train {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let mut total = 0;
        let summary = train::<Autodiff<B>>(&self.recipe, &device, |event| match event {
            RunEvent::Prepared { train, eval, steps } => {
                total = *steps;
                eprintln!(
                    "data: {train} training and {eval} evaluation items; {steps} optimizer steps"
                );
            }
            RunEvent::Step(m) => {
                let extra: String = m
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("  {k} {v:.4}"))
                    .collect();
                eprintln!(
                    "step {}/{total}  loss {:.4}  lr {:.3e}  grad_norm {:.3}{extra}",
                    m.step, m.loss, m.lr, m.grad_norm
                );
            }
            RunEvent::Eval {
                step,
                loss,
                metrics,
            } => {
                let extra: String = metrics
                    .iter()
                    .map(|(k, v)| format!("  {k} {v:.4}"))
                    .collect();
                eprintln!("eval after step {step}  loss {loss:.4}{extra}");
            }
        })?;
        eprintln!("wrote {}", summary.dir.display());
        Ok(())
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = Recipe::from_file(&args.recipe, &args.overrides)?;
    run_on(args.device, Train { recipe })
}
