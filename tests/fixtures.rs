//! Access to the committed fixture models and their `golden.json` reference outputs.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The CPU backend the tests run on.
pub type B = burn::backend::Flex;

/// Every fixture model directory under `tests/fixtures/models/`.
pub const MODELS: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "llama-linear"];

pub fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

#[derive(Debug, Deserialize)]
pub struct ScoreCase {
    pub text: Option<String>,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub sum: f64,
}

#[derive(Debug, Deserialize)]
pub struct GreedyCase {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
}

/// Reference outputs of transformers for one fixture.
#[derive(Debug, Deserialize)]
pub struct Golden {
    pub score: Vec<ScoreCase>,
    pub greedy: Vec<GreedyCase>,
}

/// A writable copy of a fixture model directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, out.path().join(path.file_name().unwrap())).unwrap();
    }
    out
}

/// Rewrites `dir`'s `config.json` through `edit`.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
}

pub fn golden(name: &str) -> Golden {
    let path = model_dir(name).join("golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts a `burnish` invocation succeeded, showing its stderr when it did not.
#[track_caller]
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The largest absolute difference between two equally long lists of values.
pub fn max_abs_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "compared lists differ in length");
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}
