//! `burnish train RECIPE [--set key=value ...]`: run a recipe. Progress goes to stderr: a
//! progress bar with loss, learning rate and tokens/s on a terminal, otherwise one line per
//! optimizer step and per evaluation. The run directory gets the adapter, the resolved recipe,
//! `metrics.jsonl` and a model card. With a `[check]` section, the held-out prompts answered
//! before and after training are printed on stdout as a table with the exact-match scores.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burnish_align::{CheckReport, ModelInit, Recipe, RunEvent, train};
use burnish_hub::Hub;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{DeviceArg, Job, base_dtype_for, checkpoint_dtype, run_on};

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
        let mut recipe = self.recipe;
        let frozen_base = recipe.adapter.is_some();
        let dtype = match recipe.model.init {
            ModelInit::Pretrained => {
                checkpoint_dtype(recipe.model.dtype, recipe.model.dir(), frozen_base)?
            }
            ModelInit::Random => recipe.model.dtype,
        };
        recipe.model.dtype = base_dtype_for::<B>(dtype, &device, frozen_base)?;
        let mut progress = Progress::new();
        let summary =
            train::<Autodiff<B>>(&recipe, &device, self.resume, |event| progress.show(event))?;
        progress.finish();
        if let (Some(after), Some(check)) = (&summary.check_after, &recipe.check) {
            print!(
                "{}",
                check_table(summary.check_before.as_ref(), after, check.show)
            );
        }
        eprintln!("wrote {}", summary.dir.display());
        Ok(())
    }
}

/// `text` cut to `width` characters, with an ellipsis when cut.
fn cell(text: &str, width: usize) -> String {
    let flat = text.replace('\n', " ");
    if flat.chars().count() <= width {
        flat
    } else {
        flat.chars().take(width - 1).chain(['…']).collect()
    }
}

/// The held-out check as a table of the first `show` prompts, then the scores.
fn check_table(before: Option<&CheckReport>, after: &CheckReport, show: usize) -> String {
    const WIDTH: usize = 34;
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    let mut rows = vec![[
        "prompt".to_string(),
        "expected".into(),
        "before".into(),
        "after".into(),
    ]];
    for (i, a) in after.answers.iter().take(show).enumerate() {
        let was = before.map_or(String::from("-"), |b| {
            let b = &b.answers[i];
            format!("{} {}", mark(b.correct), cell(&b.answer, WIDTH))
        });
        rows.push([
            cell(&a.prompt, WIDTH),
            cell(&a.expected, WIDTH),
            was,
            format!("{} {}", mark(a.correct), cell(&a.answer, WIDTH)),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "\nheld-out check: {} prompts ({} shown)\n",
        after.answers.len(),
        rows.len() - 1
    );
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(text, &w)| format!("{text}{}", " ".repeat(w - text.chars().count())))
            .collect();
        out.push_str(line.join(" | ").trim_end());
        out.push('\n');
    }
    let n = after.answers.len();
    let score = |k: usize| format!("{k}/{n} ({:.0}%)", 100.0 * k as f64 / n.max(1) as f64);
    let change = |was: Option<usize>, now: usize| match was {
        Some(w) => format!("{} → {}", score(w), score(now)),
        None => score(now),
    };
    out.push_str(&format!(
        "exact match: {}\n",
        change(before.map(|b| b.exact), after.exact)
    ));
    if let Some(p) = after.preferred {
        out.push_str(&format!(
            "prefers the chosen reply: {}\n",
            change(before.and_then(|b| b.preferred), p)
        ));
    }
    out
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
            RunEvent::Prepared {
                train,
                eval,
                steps,
                notices,
            } => {
                self.total = *steps;
                if let Some(bar) = &self.bar {
                    bar.set_length(*steps as u64);
                }
                self.line(format!(
                    "data: {train} training and {eval} evaluation items; {steps} optimizer steps"
                ));
                for notice in notices {
                    self.line(format!("note: {notice}"));
                }
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
            RunEvent::Check { after, report } => {
                let mut text = format!(
                    "held-out check {}: {}/{} exact",
                    if *after {
                        "after training"
                    } else {
                        "before training"
                    },
                    report.exact,
                    report.answers.len()
                );
                if let Some(p) = report.preferred {
                    text.push_str(&format!(", {p} prefer the chosen reply"));
                }
                self.line(text);
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Downloads (or finds in the Hub cache) the recipe's Hub model and datasets.
fn fetch_from_hub(recipe: &mut Recipe) -> Result<()> {
    let datasets = recipe.data.hub_datasets();
    let model = recipe.model.hub_id().map(str::to_string);
    if model.is_none() && datasets.is_empty() {
        return Ok(());
    }
    let hub = Hub::from_env()?.on_fetch(|f| eprintln!("{f}"));
    if let Some(id) = model {
        let dir = hub
            .model_dir(&id, recipe.model.revision.as_deref())
            .with_context(|| format!("`model.base = \"{id}\"` is not a local directory"))?;
        recipe.model.local = Some(dir);
    }
    for d in datasets {
        let files = hub
            .dataset_files(&d.repo, None, d.path.as_deref())
            .with_context(|| format!("data entry `{}` is not a local file", d.entry.display()))?;
        recipe.data.local.insert(d.entry, files);
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut recipe = Recipe::from_file(&args.recipe, &args.overrides)?;
    fetch_from_hub(&mut recipe)?;
    run_on(
        args.device,
        Train {
            recipe,
            resume: args.resume,
        },
    )
}
