//! The README's quickstart end to end: `recipes/quickstart.toml` teaches the shipped base model
//! (`quickstart/base`) to answer questions in a chat, then `recipes/quickstart-dpo.toml`
//! continues that adapter with DPO. Both must show learning on held-out prompts they never
//! trained on, read from the check lines of their `metrics.jsonl`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fixtures::assert_success;
use crate::train::{metrics, train};

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../recipes")
        .join(name)
}

/// The `(before, after)` check lines of a run's metrics.
fn checks(run: &Path) -> (Value, Value) {
    let lines: Vec<Value> = metrics(run)
        .into_iter()
        .filter(|l| l.get("check").is_some())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (&lines[0]["check"], &lines[1]["check"]),
        (&"before".into(), &"after".into())
    );
    (lines[0].clone(), lines[1].clone())
}

#[test]
fn quickstart_sft_then_dpo_learn_the_held_out_prompts() {
    let work = tempfile::tempdir().unwrap();
    let sft = work.path().join("quickstart");
    let dpo = work.path().join("quickstart-dpo");

    let out = train(
        &recipe("quickstart.toml"),
        &["--set", &format!("output.dir=\"{}\"", sft.display())],
    );
    assert_success(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("exact match: "), "{table}");
    let (before, after) = checks(&sft);
    let (b, a) = (
        before["exact_match"].as_f64().unwrap(),
        after["exact_match"].as_f64().unwrap(),
    );
    assert!(b <= 0.1 && a >= 0.75, "exact match {b} -> {a}\n{table}");

    let out = train(
        &recipe("quickstart-dpo.toml"),
        &[
            "--set",
            &format!("adapter.init_from=\"{}\"", sft.display()),
            "--set",
            &format!("dpo.reference_adapter=\"{}\"", sft.display()),
            "--set",
            &format!("output.dir=\"{}\"", dpo.display()),
        ],
    );
    assert_success(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    let (before, after) = checks(&dpo);
    let (b, a) = (
        before["prefers_chosen"].as_f64().unwrap(),
        after["prefers_chosen"].as_f64().unwrap(),
    );
    assert!(b <= 0.25 && a >= 0.9, "prefers chosen {b} -> {a}\n{table}");
    assert!(
        after["exact_match"].as_f64().unwrap() >= 0.75,
        "{after}\n{table}"
    );
}
