//! Pushing a finished run to a model repo: which files of the run directory go up (the adapter
//! or the full model, the model card, the recipe, the metrics, any tokenizer files and GGUF
//! exports; never checkpoints), the checks that the directory is a finished run whose card
//! names its base model, and the push itself: create the repo if needed, then one commit with
//! every file.

use std::path::{Path, PathBuf};

use hf_hub::RepoTypeModel;
use hf_hub::repository::CommitOperation;

use crate::error::{HubError, io_err, push_error};
use crate::hub::Hub;
use crate::repo_id::is_repo_id;
use crate::selection::{WEIGHTS_INDEX, shards_from_index};

/// The model card every run ends with; its front matter carries `base_model`.
const MODEL_CARD: &str = "README.md";

/// The two files of a PEFT adapter.
const ADAPTER_FILES: &[&str] = &["adapter_config.json", "adapter_model.safetensors"];

/// Files uploaded whenever the run directory has them: the resolved recipe, the metrics, and
/// the tokenizer and generation files a full fine-tune copies next to its weights.
const OPTIONAL_FILES: &[&str] = &[
    "recipe.toml",
    "metrics.jsonl",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
];

/// The GGUF files `burnish export` wrote into the run directory (`*.gguf` at its top), which
/// llama.cpp and Ollama pull from the repo.
fn gguf_files(dir: &Path) -> Result<Vec<String>, HubError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".gguf") && !name.starts_with('.') && entry.path().is_file() {
            out.push(name);
        }
    }
    Ok(out)
}

/// What a run directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// A LoRA adapter in PEFT's format.
    Adapter,
    /// A whole fine-tuned model.
    FullModel,
}

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushFile {
    /// Its path in the repo.
    pub name: String,
    /// Its path on disk.
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
}

/// The files of a finished run that a push uploads, checked before any request.
#[derive(Debug, Clone)]
pub struct PushPlan {
    pub dir: PathBuf,
    pub kind: RunKind,
    /// The model card's `base_model`.
    pub base_model: String,
    /// Sorted by name.
    pub files: Vec<PushFile>,
    /// Things worth fixing that do not stop the push (a base model that is not a Hub id).
    pub warnings: Vec<String>,
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushTarget {
    /// `owner/name`.
    pub repo: String,
    /// Create the repo private (an existing repo keeps its visibility).
    pub private: bool,
    /// The branch to commit to.
    pub revision: String,
    pub message: String,
}

/// What the Hub confirmed.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub repo_url: String,
    pub commit_url: Option<String>,
    pub commit_oid: Option<String>,
}

impl PushPlan {
    /// Checks that `dir` is a finished run (adapter or model weights, and a model card whose
    /// front matter names `base_model`) and lists the files to upload.
    pub fn from_run_dir(dir: &Path) -> Result<Self, HubError> {
        let not_a_run = |reason: &str| HubError::NotARun {
            dir: dir.to_path_buf(),
            reason: reason.to_string(),
        };
        if !dir.is_dir() {
            return Err(not_a_run("no such directory"));
        }
        let has = |name: &str| dir.join(name).is_file();
        let (kind, mut names) = if ADAPTER_FILES.iter().all(|f| has(f)) {
            (RunKind::Adapter, to_strings(ADAPTER_FILES))
        } else if has("adapter_config.json") {
            return Err(not_a_run(
                "adapter_config.json without adapter_model.safetensors: the adapter was not \
                 written; is the run still going?",
            ));
        } else if has("config.json") {
            let mut names = vec!["config.json".to_string()];
            names.extend(model_weights(dir).map_err(|reason| not_a_run(&reason))?);
            (RunKind::FullModel, names)
        } else {
            return Err(not_a_run(
                "no adapter (adapter_config.json, adapter_model.safetensors) and no model \
                 (config.json, model.safetensors); push the directory `burnish train` wrote once \
                 the run has finished",
            ));
        };
        if !has(MODEL_CARD) {
            return Err(not_a_run(
                "no README.md model card; `burnish train` writes it when the run finishes",
            ));
        }
        let card_path = dir.join(MODEL_CARD);
        let card = std::fs::read_to_string(&card_path).map_err(io_err(&card_path))?;
        let base_model =
            front_matter_base_model(&card).ok_or(HubError::MissingBaseModel { path: card_path })?;
        let mut warnings = Vec::new();
        if !is_repo_id(&base_model) {
            warnings.push(format!(
                "README.md: base_model `{base_model}` is not a Hub id, so the Hub will not link \
                 this run to its base model; set it to the base's id (`base_model: owner/name`){}",
                if kind == RunKind::Adapter {
                    ", here and as base_model_name_or_path in adapter_config.json"
                } else {
                    ""
                }
            ));
        }
        names.push(MODEL_CARD.to_string());
        names.extend(
            OPTIONAL_FILES
                .iter()
                .filter(|f| has(f))
                .map(|f| f.to_string()),
        );
        names.extend(gguf_files(dir)?);
        names.sort();
        names.dedup();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(&name);
            let size = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            files.push(PushFile { name, path, size });
        }
        Ok(PushPlan {
            dir: dir.to_path_buf(),
            kind,
            base_model,
            files,
            warnings,
        })
    }

    /// Bytes to upload in all.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

impl Hub {
    /// Whether a push can be attempted: online, with a token. Makes no request.
    pub fn ready_to_push(&self) -> Result<(), HubError> {
        if self.is_offline() {
            return Err(HubError::OfflinePush);
        }
        if !self.has_token() {
            return Err(HubError::NoToken);
        }
        Ok(())
    }

    /// Creates `target.repo` as a model repo if it does not exist, then uploads every file of
    /// `plan` in one commit on `target.revision`. Returns only what the Hub confirmed; on an
    /// error nothing was committed (a commit is applied whole or not at all).
    pub fn push(&self, plan: &PushPlan, target: &PushTarget) -> Result<Pushed, HubError> {
        if !is_repo_id(&target.repo) {
            return Err(HubError::InvalidRepoId {
                id: target.repo.clone(),
            });
        }
        self.ready_to_push()?;
        let Some(client) = self.client() else {
            return Err(HubError::OfflinePush);
        };
        let repo = target.repo.as_str();
        let created = client
            .create_repository()
            .repo_id(repo)
            .repo_type(RepoTypeModel)
            .private(target.private)
            .exist_ok(true)
            .send()
            .map_err(|e| push_error(repo, "creating the repo", e, &self.settings))?;
        let operations: Vec<CommitOperation> = plan
            .files
            .iter()
            .map(|f| CommitOperation::add_file(f.name.clone(), f.path.clone()))
            .collect();
        let (owner, name) = repo.split_once('/').unwrap_or(("", repo));
        let commit = client
            .model(owner, name)
            .create_commit()
            .operations(operations)
            .commit_message(target.message.clone())
            .revision(target.revision.clone())
            .send()
            .map_err(|e| push_error(repo, "committing the files", e, &self.settings))?;
        Ok(Pushed {
            repo_url: created.url,
            commit_url: commit.commit_url,
            commit_oid: commit.commit_oid,
        })
    }
}

fn to_strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The weight files of a full model in `dir`: `model.safetensors`, or the index and the shards
/// it names.
fn model_weights(dir: &Path) -> Result<Vec<String>, String> {
    if dir.join("model.safetensors").is_file() {
        return Ok(vec!["model.safetensors".to_string()]);
    }
    let index = dir.join(WEIGHTS_INDEX);
    let Ok(text) = std::fs::read_to_string(&index) else {
        return Err(
            "config.json but no model.safetensors or model.safetensors.index.json: the \
                    weights were not written; is the run still going?"
                .to_string(),
        );
    };
    let shards = shards_from_index(&text)?;
    if let Some(missing) = shards.iter().find(|s| !dir.join(s).is_file()) {
        return Err(format!(
            "{WEIGHTS_INDEX} names `{missing}`, which is missing"
        ));
    }
    let mut names = vec![WEIGHTS_INDEX.to_string()];
    names.extend(shards);
    Ok(names)
}

/// The `base_model` of a model card's YAML front matter (`---` lines around it): a scalar
/// (`base_model: owner/name`, quoted or not) or the first item of a list.
pub(crate) fn front_matter_base_model(card: &str) -> Option<String> {
    let mut lines = card.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let front: Vec<&str> = lines.take_while(|l| l.trim_end() != "---").collect();
    let unquote = |s: &str| {
        let s = s.trim();
        let s = s
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(s);
        (!s.is_empty()).then(|| s.to_string())
    };
    let at = front.iter().position(|l| l.starts_with("base_model:"))?;
    let value = front[at]["base_model:".len()..].trim();
    if let Some(list) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        return list.split(',').next().and_then(unquote);
    }
    if !value.is_empty() {
        return unquote(value);
    }
    front[at + 1..]
        .iter()
        .take_while(|l| l.starts_with(' ') || l.starts_with('-'))
        .find_map(|l| l.trim_start().strip_prefix('-').and_then(unquote))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_model_is_read_from_every_yaml_shape() {
        let card = |front: &str| format!("---\n{front}\n---\n\n# Title\nbase_model: not-this\n");
        for (front, expected) in [
            ("base_model: org/name\ntags:\n- x", Some("org/name")),
            (
                "library_name: peft\nbase_model: \"org/name\"",
                Some("org/name"),
            ),
            ("base_model: 'org/name'", Some("org/name")),
            ("base_model:\n- org/first\n- org/second", Some("org/first")),
            ("base_model:\n  - org/first", Some("org/first")),
            ("base_model: [org/a, org/b]", Some("org/a")),
            ("base_model: /local/path", Some("/local/path")),
            ("tags:\n- burnish", None),
            ("base_model:", None),
            ("base_model: \"\"", None),
            ("  base_model: nested/key", None),
        ] {
            assert_eq!(
                front_matter_base_model(&card(front)).as_deref(),
                expected,
                "{front}"
            );
        }
        assert_eq!(front_matter_base_model("# No front matter"), None);
        assert_eq!(
            front_matter_base_model("---\nbase_model: a/b"),
            Some("a/b".into())
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const CARD: &str = "---\nbase_model: org/tiny\n---\n# run\n";

    #[test]
    fn an_adapter_run_uploads_adapter_card_recipe_and_metrics_but_no_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "recipe.toml",
            "metrics.jsonl",
            "notes.txt",
            "chat-q8_0.gguf",
            ".chat-f16.gguf.tmp-7",
        ] {
            write(d, f, "x");
        }
        write(d, "README.md", CARD);
        std::fs::create_dir(d.join("checkpoints")).unwrap();
        write(&d.join("checkpoints"), "adapter_model.safetensors", "y");
        write(&d.join("checkpoints"), "old.gguf", "y");
        let plan = PushPlan::from_run_dir(d).unwrap();
        assert_eq!(plan.kind, RunKind::Adapter);
        assert_eq!(plan.base_model, "org/tiny");
        assert!(plan.warnings.is_empty());
        let names: Vec<&str> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "README.md",
                "adapter_config.json",
                "adapter_model.safetensors",
                "chat-q8_0.gguf",
                "metrics.jsonl",
                "recipe.toml"
            ]
        );
        assert_eq!(plan.total_size(), 5 + CARD.len() as u64);
    }

    #[test]
    fn a_full_model_run_uploads_weights_and_tokenizer_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "README.md", "---\nbase_model: /home/me/model\n---\n");
        write(d, "config.json", "{}");
        write(
            d,
            WEIGHTS_INDEX,
            r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#,
        );
        for f in [
            "model-1.safetensors",
            "model-2.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
            "generation_config.json",
        ] {
            write(d, f, "x");
        }
        let plan = PushPlan::from_run_dir(d).unwrap();
        assert_eq!(plan.kind, RunKind::FullModel);
        let names: Vec<&str> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "README.md",
                "chat_template.jinja",
                "config.json",
                "generation_config.json",
                "model-1.safetensors",
                "model-2.safetensors",
                WEIGHTS_INDEX,
                "tokenizer.json",
            ]
        );
        assert_eq!(
            plan.warnings.len(),
            1,
            "a local base_model is worth a warning"
        );
        assert!(plan.warnings[0].contains("/home/me/model"));
    }

    #[test]
    fn unfinished_or_unnamed_runs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = PushPlan::from_run_dir(d).unwrap_err().to_string();
        assert!(err.contains("not a finished run"), "{err}");
        write(d, "adapter_config.json", "{}");
        let err = PushPlan::from_run_dir(d).unwrap_err().to_string();
        assert!(err.contains("adapter_model.safetensors"), "{err}");
        write(d, "adapter_model.safetensors", "x");
        let err = PushPlan::from_run_dir(d).unwrap_err().to_string();
        assert!(err.contains("README.md"), "{err}");
        write(d, "README.md", "---\ntags:\n- burnish\n---\n");
        let err = PushPlan::from_run_dir(d).unwrap_err();
        assert!(matches!(err, HubError::MissingBaseModel { .. }), "{err}");
        write(d, "README.md", CARD);
        assert!(PushPlan::from_run_dir(d).is_ok());
        let err = PushPlan::from_run_dir(&d.join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such directory"), "{err}");

        let full = tempfile::tempdir().unwrap();
        write(full.path(), "config.json", "{}");
        write(full.path(), "README.md", CARD);
        let err = PushPlan::from_run_dir(full.path()).unwrap_err().to_string();
        assert!(err.contains("weights were not written"), "{err}");
    }
}
