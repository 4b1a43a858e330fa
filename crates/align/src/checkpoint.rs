//! Checkpoints of a run, under `RUN_DIR/checkpoints/step-NNNNNN/`: the trained weights (the
//! adapter in PEFT's format, or the whole model), the optimizer's moments by parameter path,
//! where the run stands (step, epoch, next batch group, counters), and which run it is
//! ([`RunIdentity`], compared with the recipe on resume). Each is written into a
//! temporary directory renamed into place, so a crash at any moment leaves the last complete
//! checkpoint loadable; older ones beyond `keep` are removed.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use burnish_model::{Decoder, HfConfig, save_decoder};
use burnish_peft::{LoraConfig, SaveDtype, decode_f32, save_adapter, serialize, write_atomic};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::continuation::RunIdentity;
use crate::error::RunError;
use crate::optimizer::{AdamW, SavedMoments};

const PROGRESS_FILE: &str = "progress.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const IDENTITY_FILE: &str = "identity.json";
const PREFIX: &str = "step-";

/// Where a run stands after an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps applied.
    pub step: usize,
    /// Steps skipped for non-finite values.
    pub skipped: usize,
    /// The epoch the next step belongs to.
    pub epoch: u64,
    /// The index, within that epoch, of the next group of micro-batches (for GRPO with
    /// `num_iterations` above 1, of the next of the optimizer steps those groups make).
    pub next_group: usize,
    /// Trained tokens so far.
    pub trained_tokens: usize,
    /// Lines written to `metrics.jsonl` so far.
    pub metrics_lines: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The complete checkpoints of `run_dir`, oldest first.
pub fn checkpoints(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("checkpoints")) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(PREFIX)?.parse().ok()?;
            e.path()
                .join(PROGRESS_FILE)
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Removes what a killed run left half-written under `checkpoints/` (temporary directories that
/// never got their final name).
pub fn remove_partial_checkpoints(run_dir: &Path) -> Result<(), RunError> {
    let parent = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{PREFIX}")) && name.contains(".tmp-") {
            std::fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

/// Writes a checkpoint of the run after `progress.step` and keeps only the newest `keep`.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint<B: AutodiffBackend>(
    run_dir: &Path,
    model: &Decoder<B>,
    adapter: Option<&LoraConfig>,
    base_config: &HfConfig,
    optimizer: &AdamW<B>,
    progress: &Progress,
    identity: &RunIdentity,
    keep: usize,
) -> Result<PathBuf, RunError> {
    let parent = run_dir.join("checkpoints");
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = format!("{PREFIX}{:06}", progress.step);
    let final_dir = parent.join(&name);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    match adapter {
        Some(config) => save_adapter(&tmp, config, &model.linears(), &model.whole_modules())?,
        None => save_decoder(model, base_config, &tmp, SaveDtype::F32)?,
    }
    let moments = optimizer.export_state(model);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = moments
        .into_iter()
        .flat_map(|s| {
            let n = s.m.len();
            [
                (format!("{}.m", s.path), vec![n], s.m),
                (format!("{}.v", s.path), vec![n], s.v),
            ]
        })
        .collect();
    let optimizer_path = tmp.join(OPTIMIZER_FILE);
    let bytes = serialize(&tensors, SaveDtype::F32)
        .map_err(|e| RunError::Checkpoint(format!("{}: {e}", optimizer_path.display())))?;
    write_atomic(&optimizer_path, &bytes).map_err(io_err(&optimizer_path))?;
    let identity_path = tmp.join(IDENTITY_FILE);
    let text = serde_json::to_string_pretty(identity).expect("an identity serializes");
    write_atomic(&identity_path, text.as_bytes()).map_err(io_err(&identity_path))?;
    let progress_path = tmp.join(PROGRESS_FILE);
    let text = serde_json::to_string_pretty(progress).expect("progress serializes");
    write_atomic(&progress_path, text.as_bytes()).map_err(io_err(&progress_path))?;

    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;

    let all = checkpoints(run_dir);
    for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(final_dir)
}

/// Reads a checkpoint's progress and optimizer moments.
pub fn read_checkpoint(dir: &Path) -> Result<(Progress, Vec<SavedMoments>), RunError> {
    let progress_path = dir.join(PROGRESS_FILE);
    let text = std::fs::read_to_string(&progress_path).map_err(io_err(&progress_path))?;
    let progress: Progress = serde_json::from_str(&text)
        .map_err(|e| RunError::Checkpoint(format!("{}: {e}", progress_path.display())))?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&optimizer_path).map_err(io_err(&optimizer_path))?;
    let bad =
        |detail: String| RunError::Checkpoint(format!("{}: {detail}", optimizer_path.display()));
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut names = file.names();
    names.sort_unstable();
    let mut moments = Vec::new();
    for name in names.iter().filter(|n| n.ends_with(".m")) {
        let path = name.trim_end_matches(".m").to_string();
        let read = |key: &str| -> Result<Vec<f32>, RunError> {
            let view = file.tensor(key).map_err(|e| bad(format!("`{key}`: {e}")))?;
            decode_f32(&view).map_err(|d| bad(format!("`{key}` has dtype {d:?}")))
        };
        moments.push(SavedMoments {
            m: read(name)?,
            v: read(&format!("{path}.v"))?,
            path,
        });
    }
    Ok((progress, moments))
}

/// Reads which run a checkpoint belongs to.
pub fn read_identity(dir: &Path) -> Result<RunIdentity, RunError> {
    let path = dir.join(IDENTITY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        RunError::Checkpoint(format!(
            "{}: {e}; without it the checkpoint cannot be matched with the recipe: start a new \
             run in another `output.dir`",
            path.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| RunError::Checkpoint(format!("{}: {e}", path.display())))
}
