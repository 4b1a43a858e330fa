//! What a run continues, checked against its recipe before anything trains.
//!
//! `--resume` continues a checkpoint. Each checkpoint holds the identity of the run that wrote
//! it (`identity.json`): the recipe's settings as run, and digests of the base's `config.json`,
//! of the training data as tokens, of the reference adapter's weights and of GRPO's reward
//! models. A recipe that would make the checkpoint continue another
//! run (another base, training data, strategy, batching, seed or adapter) is refused, naming
//! each difference; other changes (the run's length, the learning rate and its schedule, the
//! optimizer's and DPO's settings, evaluation) are allowed and reported.
//!
//! `adapter.init_from` continues a saved adapter as it is: a key the recipe sets beside it that
//! says otherwise (another rank, alpha, dropout or set of modules) is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burnish_data::Dataset;
use burnish_peft::{LoraConfig, select_targets};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::RunError;
use crate::recipe::{AdapterSection, Recipe};
use crate::run::lora_config;

/// Recipe keys that hold paths: where things are, not what they are (the digests cover what the
/// model and the data hold).
const PATHS: &[&str] = &[
    "model.base",
    "adapter.init_from",
    "dpo.reference_adapter",
    "kto.reference_adapter",
    "grpo.reference_adapter",
    "grpo.reward_models",
    "data.train",
    "data.eval",
    "data.chat_template",
    "check.file",
    "output.dir",
];

/// Keys (or, ending in `.`, sections) a checkpoint cannot be continued under another value of:
/// the weights or the optimizer's moments would belong to another model, or the position in the
/// data to another order of batches.
const BINDING: &[&str] = &[
    "adapter.",
    "model.init",
    "data.max_length",
    "train.strategy",
    "train.micro_batch_size",
    "train.gradient_accumulation",
    "train.pack",
    "train.seed",
    "grpo.num_generations",
];

/// Keys whose change leaves the trained numbers as they are: not worth a word.
const NEUTRAL: &[&str] = &[
    "check.",
    "output.tensorboard",
    "train.eval_every",
    "train.gradient_checkpointing",
    "train.keep_checkpoints",
    "train.save_every",
];

fn listed(list: &[&str], key: &str) -> bool {
    list.iter().any(|entry| match entry.strip_suffix('.') {
        Some(section) => key
            .strip_prefix(section)
            .is_some_and(|r| r.starts_with('.')),
        None => key == *entry,
    })
}

/// The run a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// SHA-256 of the base's `config.json`.
    pub base_config: String,
    /// SHA-256 of the training rows as token ids and loss masks, in the order they were read.
    pub train_data: String,
    /// SHA-256 of the reference adapter's weights (`dpo.reference_adapter`,
    /// `kto.reference_adapter` or `grpo.reference_adapter`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_adapter: Option<String>,
    /// SHA-256 of GRPO's reward models (`grpo.reward_models`), when there are any: what
    /// scores the completions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_models: Option<String>,
    /// Every recipe setting but the paths: dotted key → TOML value.
    pub settings: BTreeMap<String, String>,
}

impl RunIdentity {
    /// The identity of `recipe`'s run, whose base has `base_config` (the bytes of its
    /// `config.json`), whose reference adapter has the weights `reference_adapter` (the
    /// bytes of its safetensors file) if any, whose reward models' files have the digest
    /// `reward_models` (`model_files_digest`) if any, and which trains on `train_data`.
    pub fn of(
        recipe: &Recipe,
        base_config: &[u8],
        reference_adapter: Option<&[u8]>,
        reward_models: Option<String>,
        train_data: &Dataset,
    ) -> Self {
        let mut settings = BTreeMap::new();
        flatten("", &recipe.to_table(), &mut settings);
        settings.retain(|key, _| !listed(PATHS, key));
        Self {
            base_config: hex(&Sha256::digest(base_config)),
            train_data: data_digest(train_data),
            reference_adapter: reference_adapter.map(|bytes| hex(&Sha256::digest(bytes))),
            reward_models,
            settings,
        }
    }

    /// Compares the identity a checkpoint was written under (`self`) with the recipe's now:
    /// what changed and may (notices to report), or an error listing what may not.
    pub fn compare(&self, now: &RunIdentity, checkpoint: &Path) -> Result<Vec<String>, RunError> {
        let mut refused = Vec::new();
        if self.base_config != now.base_config {
            refused.push("the base model's `config.json`".to_string());
        }
        if self.reference_adapter != now.reference_adapter {
            refused.push("the reference adapter's weights (`*.reference_adapter`)".to_string());
        }
        if self.reward_models != now.reward_models {
            refused.push(
                "the reward models (`grpo.reward_models`: their weights, configs or \
                 tokenizers)"
                    .to_string(),
            );
        }
        if self.train_data != now.train_data {
            refused.push(
                "the training data as tokens (their files, `data.*` settings, template or \
                 tokenizer)"
                    .to_string(),
            );
        }
        let mut allowed = Vec::new();
        let keys: BTreeSet<&String> = self.settings.keys().chain(now.settings.keys()).collect();
        for key in keys {
            let (then, current) = (self.settings.get(key), now.settings.get(key));
            if then == current || listed(NEUTRAL, key) {
                continue;
            }
            let shown = |v: Option<&String>| v.map_or("(not set)".to_string(), String::clone);
            let change = format!("`{key}` {} → {}", shown(then), shown(current));
            if listed(BINDING, key) {
                refused.push(change);
            } else {
                allowed.push(change);
            }
        }
        if !refused.is_empty() {
            return Err(RunError::Checkpoint(format!(
                "{} belongs to another run than this recipe describes: {}. Resume with the \
                 recipe the run started with, or start a new run in another `output.dir`",
                checkpoint.display(),
                refused.join("; ")
            )));
        }
        Ok(if allowed.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "resumed with changed settings: {}; the run goes on from its checkpoint under \
                 the new values",
                allowed.join(", ")
            )]
        })
    }
}

/// Every leaf of `table` as `prefix.key` → its TOML text.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => flatten(&path, inner, out),
            leaf => {
                out.insert(path, leaf.to_string());
            }
        }
    }
}

/// SHA-256 over the model directories `dirs`, in order: every file loading one reads (its
/// configs, tokenizer and chat template, `.json` and `.jinja`, and its `.safetensors` weights),
/// by name, size and content, streamed. `key` names the recipe key in errors.
pub fn model_files_digest(dirs: &[PathBuf], key: &str) -> Result<String, RunError> {
    let unreadable = |path: &Path, source: std::io::Error| {
        RunError::Mismatch(format!("`{key}`: cannot read {}: {source}", path.display()))
    };
    let mut hasher = Sha256::new();
    for dir in dirs {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
            let path = entry.map_err(|e| unreadable(dir, e))?.path();
            let read = path
                .extension()
                .is_some_and(|e| e == "json" || e == "jinja" || e == "safetensors");
            if read && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        hasher.update([b'd']);
        hasher.update((files.len() as u64).to_le_bytes());
        for path in files {
            let mut file = std::fs::File::open(&path).map_err(|e| unreadable(&path, e))?;
            let name = path
                .file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default();
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name);
            let size = file.metadata().map_err(|e| unreadable(&path, e))?.len();
            hasher.update(size.to_le_bytes());
            std::io::copy(&mut file, &mut hasher).map_err(|e| unreadable(&path, e))?;
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the examples' token ids and masks, then the pairs' and the labeled completions'
/// token ids (and labels, and pairs' margins), and the prompts', each sequence preceded by its
/// length so that no two datasets hash alike by concatenation.
fn data_digest(data: &Dataset) -> String {
    let mut hasher = Sha256::new();
    let mut ids = |tag: u8, ids: &[u32]| {
        hasher.update([tag]);
        hasher.update((ids.len() as u64).to_le_bytes());
        for id in ids {
            hasher.update(id.to_le_bytes());
        }
    };
    for example in &data.examples {
        ids(b'e', &example.input_ids);
    }
    for pair in &data.pairs {
        ids(b'p', &pair.prompt_ids);
        ids(b'c', &pair.chosen_ids);
        ids(b'r', &pair.rejected_ids);
    }
    for prompt in &data.prompts {
        ids(b'o', &prompt.prompt_ids);
    }
    for labeled in &data.labeled {
        ids(b'q', &labeled.prompt_ids);
        ids(
            if labeled.desirable { b'd' } else { b'u' },
            &labeled.completion_ids,
        );
    }
    // Margins by pair index, so that data without margins hashes as before they were read.
    for (i, pair) in data.pairs.iter().enumerate() {
        if let Some(margin) = pair.margin {
            hasher.update([b'g']);
            hasher.update((i as u64).to_le_bytes());
            hasher.update(margin.to_le_bytes());
        }
    }
    for example in &data.examples {
        hasher.update([b'm']);
        hasher.update(
            example
                .labels_mask
                .iter()
                .map(|&m| u8::from(m))
                .collect::<Vec<u8>>(),
        );
    }
    hex(&hasher.finalize())
}

/// Refuses the keys `section` sets that disagree with the adapter it continues (`loaded`, read
/// from `dir`): `init_from` trains that adapter as saved, so a recipe value that differs would
/// be silently ignored. `modules` are the model's linear modules, to compare the modules each
/// selects.
pub fn check_init_from(
    section: &AdapterSection,
    loaded: &LoraConfig,
    dir: &Path,
    modules: &[String],
    base: &Path,
) -> Result<(), RunError> {
    let given = |key: &str| section.given.iter().any(|k| k == key);
    let mut differences = Vec::new();
    let mut differ = |key: &str, ours: String, theirs: String| {
        if given(key) && ours != theirs {
            differences.push(format!(
                "`adapter.{key} = {ours}`, the adapter has {theirs}"
            ));
        }
    };
    differ("r", section.r.to_string(), loaded.r.to_string());
    differ(
        "alpha",
        section.alpha.to_string(),
        loaded.lora_alpha.to_string(),
    );
    differ(
        "dropout",
        section.dropout.to_string(),
        loaded.lora_dropout.to_string(),
    );
    differ(
        "use_rslora",
        section.use_rslora.to_string(),
        loaded.use_rslora.to_string(),
    );
    differ(
        "use_dora",
        section.use_dora.to_string(),
        loaded.use_dora.to_string(),
    );
    if given("target_modules") || given("layers_to_transform") {
        let names = |config: &LoraConfig| -> Result<BTreeSet<String>, RunError> {
            Ok(select_targets(modules, config)?
                .into_iter()
                .map(|s| s.name)
                .collect())
        };
        let (ours, theirs) = (names(&lora_config(section, base))?, names(loaded)?);
        if ours != theirs {
            let mut only_ours = ours.difference(&theirs);
            let mut only_theirs = theirs.difference(&ours);
            differences.push(format!(
                "`adapter.target_modules`/`layers_to_transform` select {} modules, the adapter \
                 has {} (first difference: {})",
                ours.len(),
                theirs.len(),
                match (only_ours.next(), only_theirs.next()) {
                    (Some(name), _) => format!("{name} is not in the adapter"),
                    (None, Some(name)) => format!("the adapter has {name}"),
                    (None, None) => unreachable!("the sets differ"),
                }
            ));
        }
    }
    if given("init") {
        differences.push(
            "`adapter.init` has no effect: the adapter's weights are loaded, not initialised"
                .into(),
        );
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(RunError::Mismatch(format!(
        "`adapter.init_from` continues the adapter in {} as saved (its adapter_config.json), \
         but the recipe says otherwise: {}. Remove these keys from `[adapter]` or make them match",
        dir.display(),
        differences.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(settings: &[(&str, &str)]) -> RunIdentity {
        RunIdentity {
            base_config: "c".into(),
            train_data: "d".into(),
            reference_adapter: None,
            reward_models: None,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn binding_changes_are_refused_and_others_reported() {
        let then = identity(&[
            ("train.lr", "0.0002"),
            ("train.micro_batch_size", "4"),
            ("train.save_every", "2"),
            ("adapter.r", "8"),
        ]);
        let path = Path::new("run/checkpoints/step-000002");
        assert_eq!(then.compare(&then, path).unwrap(), Vec::<String>::new());

        let longer = identity(&[
            ("train.lr", "0.0001"),
            ("train.micro_batch_size", "4"),
            ("train.save_every", "5"),
            ("adapter.r", "8"),
        ]);
        let notices = then.compare(&longer, path).unwrap();
        assert_eq!(notices.len(), 1);
        assert!(
            notices[0].contains("`train.lr` 0.0002 → 0.0001"),
            "{notices:?}"
        );
        assert!(!notices[0].contains("save_every"), "{notices:?}");

        let mut other = identity(&[
            ("train.lr", "0.0002"),
            ("train.micro_batch_size", "8"),
            ("train.save_every", "2"),
        ]);
        other.train_data = "e".into();
        other.reference_adapter = Some("f".into());
        other.reward_models = Some("g".into());
        let err = then.compare(&other, path).unwrap_err().to_string();
        for part in [
            "step-000002",
            "`train.micro_batch_size` 4 → 8",
            "`adapter.r` 8 → (not set)",
            "training data",
            "`*.reference_adapter`",
            "`grpo.reward_models`",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
        assert!(!err.contains("config.json"), "{err}");
    }

    /// The reward models' digest sees a changed weight file and the order of the models, and
    /// names an unreadable directory.
    #[test]
    fn the_model_files_digest_sees_contents_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let model = |name: &str, weights: &[u8]| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("config.json"), b"{}").unwrap();
            std::fs::write(path.join("model.safetensors"), weights).unwrap();
            std::fs::write(path.join("README.md"), name).unwrap();
            path
        };
        let (a, b) = (model("a", b"1234"), model("b", b"1234"));
        let digest = |dirs: &[PathBuf]| model_files_digest(dirs, "grpo.reward_models").unwrap();
        let both = digest(&[a.clone(), b.clone()]);
        // The same files elsewhere (the README, which loading does not read, aside).
        assert_eq!(
            digest(std::slice::from_ref(&a)),
            digest(std::slice::from_ref(&b))
        );
        assert_ne!(both, digest(std::slice::from_ref(&a)));
        std::fs::write(b.join("model.safetensors"), b"1235").unwrap();
        assert_ne!(both, digest(&[a.clone(), b.clone()]));
        assert_ne!(digest(&[a.clone(), b.clone()]), digest(&[b.clone(), a]));
        let err = model_files_digest(&[dir.path().join("gone")], "grpo.reward_models")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grpo.reward_models") && err.contains("gone"),
            "{err}"
        );
    }

    #[test]
    fn sections_match_their_keys_only() {
        assert!(listed(BINDING, "adapter.r"));
        assert!(!listed(BINDING, "adapters.r"));
        assert!(listed(NEUTRAL, "check.show"));
        assert!(!listed(BINDING, "train.seeds"));
    }

    #[test]
    fn the_data_digest_sees_tokens_masks_and_boundaries() {
        use burnish_data::Example;
        let data = |rows: &[(&[u32], &[bool])]| Dataset {
            examples: rows
                .iter()
                .map(|(ids, mask)| Example {
                    input_ids: ids.to_vec(),
                    labels_mask: mask.to_vec(),
                })
                .collect(),
            ..Default::default()
        };
        let a = data_digest(&data(&[(&[1, 2], &[false, true]), (&[3], &[true])]));
        assert_eq!(
            a,
            data_digest(&data(&[(&[1, 2], &[false, true]), (&[3], &[true])]))
        );
        for other in [
            data(&[(&[1], &[false]), (&[2, 3], &[true, true])]),
            data(&[(&[1, 2], &[true, true]), (&[3], &[true])]),
            data(&[(&[1, 2], &[false, true]), (&[4], &[true])]),
        ] {
            assert_ne!(a, data_digest(&other));
        }
    }
}
