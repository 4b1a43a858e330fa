//! `burnish push RUN_DIR --repo owner/name`: upload a finished run (its adapter or full model,
//! model card, recipe, metrics and any tokenizer files; never checkpoints) to a Hub model repo
//! in one commit, creating the repo if needed. `--dry-run` lists the files and sizes and makes no
//! request. Only what the Hub confirmed is reported.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burnish_hub::{Hub, PushPlan, PushTarget, RunKind, is_repo_id};
use clap::Args;

#[derive(Debug, Args)]
#[command(after_help = "\
Example:
  burnish push runs/fixture-chat-sft --repo your-name/smollm2-chat-lora --private

The token comes from HF_TOKEN, else the file at HF_TOKEN_PATH, else HF_HOME/token (written by
`huggingface-cli login`); HF_ENDPOINT picks another Hub. See docs/hub.md.")]
pub struct PushArgs {
    /// The run directory `burnish train` wrote (adapter or model, README.md, recipe.toml).
    run_dir: PathBuf,
    /// The model repo to push to, created if it does not exist.
    #[arg(long, value_name = "OWNER/NAME")]
    repo: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    private: bool,
    /// List the files that would be uploaded, with their sizes, and upload nothing.
    #[arg(long)]
    dry_run: bool,
    /// The branch to commit to.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The commit message (default: "Upload <adapter|model> trained with burnish").
    #[arg(long)]
    message: Option<String>,
}

pub fn run(args: PushArgs) -> Result<()> {
    if !is_repo_id(&args.repo) {
        bail!(
            "--repo {}: expected a Hub id `owner/name` (letters, digits, `-`, `_`, `.`)",
            args.repo
        );
    }
    let plan = PushPlan::from_run_dir(&args.run_dir)?;
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    let what = match plan.kind {
        RunKind::Adapter => "adapter",
        RunKind::FullModel => "model",
    };
    let count = plan.files.len();
    let total = plan.total_size();
    if args.dry_run {
        println!(
            "would push {count} files ({}) to {} (branch {}):",
            human_size(total),
            args.repo,
            args.revision
        );
        for file in &plan.files {
            println!("{:>14}  {}", file.size, file.name);
        }
        return Ok(());
    }

    let hub = Hub::from_env()?;
    hub.ready_to_push()?;
    eprintln!(
        "pushing the {what} of {} to {} on {}: {count} files, {}, one commit",
        args.run_dir.display(),
        args.repo,
        hub.endpoint(),
        human_size(total)
    );
    let target = PushTarget {
        repo: args.repo.clone(),
        private: args.private,
        revision: args.revision.clone(),
        message: args
            .message
            .clone()
            .unwrap_or_else(|| format!("Upload {what} trained with burnish")),
    };
    let pushed = hub.push(&plan, &target)?;
    match (&pushed.commit_url, &pushed.commit_oid) {
        (Some(url), _) => println!("pushed {count} files to {}: {url}", args.repo),
        (None, Some(oid)) => println!(
            "pushed {count} files to {} ({}), commit {oid}",
            args.repo, pushed.repo_url
        ),
        (None, None) => println!(
            "pushed {count} files to {} ({}); the Hub returned no commit id",
            args.repo, pushed.repo_url
        ),
    }
    Ok(())
}

/// Bytes in the largest unit that keeps the number at least 1 (powers of 1000, as the Hub shows).
fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_hub_shows_them() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500), "1.5 kB");
        assert_eq!(human_size(2_300_000_000), "2.3 GB");
    }
}
