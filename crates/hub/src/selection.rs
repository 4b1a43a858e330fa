//! Which files of a repository burnish downloads: for a model, the config, the safetensors
//! weights (one file, or the shards its index names) and the tokenizer and chat-template files;
//! for a dataset, the JSON and JSONL files under a path. Pure functions over the repository's
//! file listing; nothing here makes a request.

/// Files a model directory needs besides its weights, downloaded when the repo has them.
pub(crate) const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    // A SentencePiece vocabulary's model, which GGUF export writes as llama.cpp reads it.
    "tokenizer.model",
    "added_tokens.json",
];

/// The index of sharded safetensors weights.
pub(crate) const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// JSON files of the `datasets` library's own bookkeeping, never rows.
const DATASET_METADATA: &[&str] = &[
    "dataset_infos.json",
    "dataset_info.json",
    "dataset_dict.json",
    "state.json",
];

/// The weights of a model repo.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Weights {
    /// Sharded: the shards are the ones `model.safetensors.index.json` names.
    Sharded,
    /// These safetensors files, at the top of the repo.
    Files(Vec<String>),
}

/// What to download from a model repo.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ModelSelection {
    /// Config, tokenizer and template files (and the weights index when sharded).
    pub files: Vec<String>,
    pub weights: Weights,
}

/// Picks a model directory's files from a repo listing; the error says why the repo is not a
/// model burnish can load.
pub(crate) fn select_model_files(listing: &[String]) -> Result<ModelSelection, String> {
    let has = |name: &str| listing.iter().any(|f| f == name);
    let top_safetensors: Vec<String> = listing
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .filter(|f| *f != "adapter_model.safetensors")
        .cloned()
        .collect();
    if !has("config.json") {
        if has("adapter_config.json") {
            return Err("it holds a PEFT adapter (adapter_config.json), not a model".into());
        }
        return Err("the repo has no config.json".into());
    }
    let mut files: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    let weights = if has(WEIGHTS_INDEX) {
        files.push(WEIGHTS_INDEX.to_string());
        Weights::Sharded
    } else if has("model.safetensors") {
        Weights::Files(vec!["model.safetensors".to_string()])
    } else if !top_safetensors.is_empty() {
        Weights::Files(top_safetensors)
    } else {
        let other: Vec<&String> = listing
            .iter()
            .filter(|f| f.ends_with(".bin") || f.ends_with(".pt") || f.ends_with(".gguf"))
            .collect();
        return Err(if other.is_empty() {
            "the repo has no safetensors weights".to_string()
        } else {
            format!(
                "the repo has no safetensors weights (burnish reads only safetensors; found {})",
                summary(&other)
            )
        });
    };
    Ok(ModelSelection { files, weights })
}

/// The shard files named by a `model.safetensors.index.json`, each once, sorted.
pub(crate) fn shards_from_index(text: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{WEIGHTS_INDEX} is not JSON: {e}"))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{WEIGHTS_INDEX} has no `weight_map` object"))?;
    let mut shards = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| format!("{WEIGHTS_INDEX}: `weight_map` values must be file names"))?;
        if !is_safe_repo_path(file) {
            return Err(format!("{WEIGHTS_INDEX} names an unsafe path `{file}`"));
        }
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(format!("{WEIGHTS_INDEX} names no weight files"));
    }
    Ok(shards)
}

/// What a dataset repo offers under a path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DataSelection {
    /// JSON or JSONL files, sorted.
    Files(Vec<String>),
    /// No JSON, but Parquet files (a few named).
    ParquetOnly(String),
    /// Neither; a few of the files that are there.
    Nothing(String),
}

/// Picks the JSON and JSONL files of a dataset listing that are `path` or lie under it (the
/// whole repo without a path). A path naming one file selects it even if it is a metadata file.
pub(crate) fn select_data_files(listing: &[String], path: Option<&str>) -> DataSelection {
    let path = path.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty());
    let candidates: Vec<&String> = listing
        .iter()
        .filter(|f| match path {
            Some(p) => f.as_str() == p || f.starts_with(&format!("{p}/")),
            None => true,
        })
        .collect();
    let is_data = |f: &str| {
        let name = f.rsplit('/').next().unwrap_or(f);
        let named = path == Some(f);
        (f.ends_with(".json") || f.ends_with(".jsonl"))
            && (named || !DATASET_METADATA.contains(&name))
    };
    let mut files: Vec<String> = candidates
        .iter()
        .filter(|f| is_data(f) && is_safe_repo_path(f))
        .map(|f| f.to_string())
        .collect();
    files.sort();
    if !files.is_empty() {
        return DataSelection::Files(files);
    }
    let parquet: Vec<&String> = candidates
        .iter()
        .copied()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    if !parquet.is_empty() {
        return DataSelection::ParquetOnly(summary(&parquet));
    }
    DataSelection::Nothing(summary(&candidates))
}

/// A repo path that stays inside the snapshot directory: relative, no `..`, no backslash.
pub(crate) fn is_safe_repo_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A few names of a list, for messages.
fn summary(names: &[&String]) -> String {
    const SHOWN: usize = 3;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_single_file_model_takes_its_weights_config_and_tokenizer() {
        let repo = listing(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "onnx/model.safetensors",
        ]);
        let selection = select_model_files(&repo).unwrap();
        assert_eq!(
            selection.files,
            listing(&[
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ])
        );
        assert_eq!(
            selection.weights,
            Weights::Files(listing(&["model.safetensors"]))
        );
    }

    #[test]
    fn a_sharded_model_takes_its_index_and_leaves_other_safetensors() {
        let repo = listing(&[
            "config.json",
            "consolidated.safetensors",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            WEIGHTS_INDEX,
            "chat_template.jinja",
        ]);
        let selection = select_model_files(&repo).unwrap();
        assert_eq!(selection.weights, Weights::Sharded);
        assert!(selection.files.contains(&WEIGHTS_INDEX.to_string()));
        assert!(selection.files.contains(&"chat_template.jinja".to_string()));
        let index = r#"{"metadata": {}, "weight_map": {
            "a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            shards_from_index(index).unwrap(),
            listing(&[
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ])
        );
    }

    #[test]
    fn bad_indexes_are_refused() {
        assert!(shards_from_index("nope").is_err());
        assert!(shards_from_index("{}").is_err());
        assert!(shards_from_index(r#"{"weight_map": {}}"#).is_err());
        assert!(shards_from_index(r#"{"weight_map": {"a": 1}}"#).is_err());
        let err = shards_from_index(r#"{"weight_map": {"a": "../../x.safetensors"}}"#);
        assert!(err.unwrap_err().contains("unsafe"));
    }

    #[test]
    fn repos_that_are_not_loadable_models_say_why() {
        let err = select_model_files(&listing(&["config.json", "pytorch_model.bin"]));
        assert!(err.unwrap_err().contains("pytorch_model.bin"));
        let err = select_model_files(&listing(&[
            "adapter_config.json",
            "adapter_model.safetensors",
        ]));
        assert!(err.unwrap_err().contains("adapter"));
        let err = select_model_files(&listing(&["model.safetensors"]));
        assert!(err.unwrap_err().contains("config.json"));
    }

    #[test]
    fn dataset_files_are_json_under_the_path() {
        let repo = listing(&[
            "README.md",
            "dataset_infos.json",
            "data/train.jsonl",
            "data/test.jsonl",
            "data/extra/more.json",
            "other/x.jsonl",
            "data.parquet",
        ]);
        assert_eq!(
            select_data_files(&repo, Some("data/")),
            DataSelection::Files(listing(&[
                "data/extra/more.json",
                "data/test.jsonl",
                "data/train.jsonl"
            ]))
        );
        assert_eq!(
            select_data_files(&repo, Some("data/train.jsonl")),
            DataSelection::Files(listing(&["data/train.jsonl"]))
        );
        let all = select_data_files(&repo, None);
        let DataSelection::Files(all) = all else {
            panic!("{all:?}")
        };
        assert_eq!(all.len(), 4, "the metadata JSON is left out: {all:?}");
        // A prefix of a name is not a directory.
        assert_eq!(
            select_data_files(&repo, Some("dat")),
            DataSelection::Nothing(String::new())
        );
    }

    #[test]
    fn parquet_only_datasets_are_reported_as_such() {
        let repo = listing(&[
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "data/valid-00000-of-00001.parquet",
        ]);
        let DataSelection::ParquetOnly(names) = select_data_files(&repo, None) else {
            panic!("expected parquet only");
        };
        assert!(names.contains("train-00000-of-00002.parquet") && names.ends_with("1 more"));
        assert_eq!(
            select_data_files(&listing(&["README.md", "a.csv"]), None),
            DataSelection::Nothing("README.md, a.csv".into())
        );
    }

    #[test]
    fn unsafe_repo_paths_are_recognised() {
        for ok in ["a.json", "data/a.jsonl", "a/b/c.json"] {
            assert!(is_safe_repo_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/a.json",
            "../a.json",
            "a/../../b",
            "a//b",
            "a\\b",
            "./a",
        ] {
            assert!(!is_safe_repo_path(bad), "{bad}");
        }
    }
}
