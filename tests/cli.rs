//! The `burnish` binary end to end: `score --json` keeps its interface and agrees with the
//! golden log-probs; `generate` prints only the continuation; `bench --json` runs every mode and
//! keeps its fields; bad arguments are clear errors.

use std::process::Command;

use crate::fixtures::{assert_success, golden, max_abs_diff, model_dir};

pub(crate) fn burnish(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn score_json_is_one_object_matching_transformers() {
    let case = &golden("qwen2").score[0];
    let dir = model_dir("qwen2");
    let out = burnish(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        case.text.as_deref().unwrap(),
        "--device",
        "cpu",
        "--json",
    ]);
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(value["token_ids"].clone()).unwrap();
    let logprobs: Vec<f32> = serde_json::from_value(value["logprobs"].clone()).unwrap();
    assert_eq!(ids, case.token_ids);
    assert_eq!(logprobs.len(), ids.len() - 1);
    for (a, b) in logprobs.iter().zip(&case.logprobs) {
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
    assert!((value["sum"].as_f64().unwrap() - case.sum).abs() < 1e-3);
}

#[test]
fn score_by_ids_agrees_with_golden() {
    let case = &golden("mistral").score[2];
    let ids = case
        .token_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let dir = model_dir("mistral");
    let out = burnish(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        &ids,
        "--json",
    ]);
    assert_success(&out);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((value["sum"].as_f64().unwrap() - case.sum).abs() < 1e-3);
}

/// Runs `burnish generate` on the llama fixture and checks it prints exactly the text of the
/// golden greedy case `case`, followed by a newline.
fn assert_generates_golden(prompt_args: &[&str], case: usize) {
    let dir = model_dir("llama");
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--max-new-tokens",
        "32",
    ];
    args.extend_from_slice(prompt_args);
    let out = burnish(&args);
    assert_success(&out);
    let tokenizer = burnish_data::Tokenizer::from_dir(&dir).unwrap();
    let expected = tokenizer
        .decode(&golden("llama").greedy[case].new_ids, true)
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{expected}\n")
    );
}

#[test]
fn generate_prints_the_greedy_continuation() {
    let dir = model_dir("llama");
    let tokenizer = burnish_data::Tokenizer::from_dir(&dir).unwrap();
    let prompt = tokenizer
        .decode(&golden("llama").greedy[0].prompt_ids, false)
        .unwrap();
    assert_generates_golden(&["--prompt", &prompt], 0);
}

#[test]
fn chat_generation_uses_the_template_and_stops_at_end_of_turn() {
    // Golden case 1 is the ChatML render of "Hi!" with the generation prompt; it stops on EOS.
    assert_generates_golden(&["--prompt", "Hi!", "--chat"], 1);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let out = burnish(&[
        "score",
        "--model",
        "/nonexistent",
        "--ids",
        "1,2",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.json"));

    let out = burnish(&["score", "--model", "x", "--ids", "1,2", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device `tpu`"));

    let dir = model_dir("llama");
    let out = burnish(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        "1,99999",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("99999"));
}

/// `burnish score --json` on `model` (plus `extra` arguments): the log-probs.
pub(crate) fn score_logprobs(model: &std::path::Path, ids: &[u32], extra: &[&str]) -> Vec<f32> {
    let ids = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = burnish(&args);
    assert_success(&out);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(value["logprobs"].clone()).unwrap()
}

/// The PEFT reference log-probs of the llama-qv adapter's first score case.
fn llama_qv_reference() -> (Vec<u32>, Vec<f32>) {
    let path = model_dir("llama").join("../../adapters/llama-qv/golden.json");
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let case = &golden["score"][0];
    (
        serde_json::from_value(case["token_ids"].clone()).unwrap(),
        serde_json::from_value(case["logprobs"].clone()).unwrap(),
    )
}

fn assert_logprobs_close(ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len());
    let worst = max_abs_diff(ours, theirs);
    assert!(worst <= 1e-4, "max |Δ logprob| = {worst:e}");
}

#[test]
fn score_with_a_peft_adapter_matches_peft() {
    let (ids, expected) = llama_qv_reference();
    let adapter = model_dir("llama").join("../../adapters/llama-qv");
    let ours = score_logprobs(
        &model_dir("llama"),
        &ids,
        &["--adapter", adapter.to_str().unwrap()],
    );
    assert_logprobs_close(&ours, &expected);
}

#[test]
fn merged_models_score_like_base_plus_adapter() {
    let (ids, expected) = llama_qv_reference();
    let adapter = model_dir("llama").join("../../adapters/llama-qv");
    let work = tempfile::tempdir().unwrap();

    let folded = work.path().join("folded");
    let fold = || {
        burnish(&[
            "merge",
            "--model",
            model_dir("llama").to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            folded.to_str().unwrap(),
        ])
    };
    assert_success(&fold());
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        assert!(
            folded.join(file).exists(),
            "{file} missing from the merged model"
        );
    }
    assert_logprobs_close(&score_logprobs(&folded, &ids, &[]), &expected);

    // Task arithmetic with one adapter at weight 1 is the same fold.
    let merged = work.path().join("task-arithmetic");
    let out = burnish(&[
        "merge",
        "--method",
        "task-arithmetic",
        "--base",
        model_dir("llama").to_str().unwrap(),
        "--inputs",
        &format!("{}:1.0", adapter.display()),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_success(&out);
    assert_logprobs_close(&score_logprobs(&merged, &ids, &[]), &expected);

    // Nothing is overwritten, and a bad merge leaves nothing behind.
    let out = fold();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let slerp = work.path().join("slerp");
    let out = burnish(&[
        "merge",
        "--method",
        "slerp",
        "--base",
        model_dir("llama").to_str().unwrap(),
        "--inputs",
        adapter.to_str().unwrap(),
        "--out",
        slerp.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exactly two"));
    assert!(!slerp.exists());
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        2,
        "no temporary directory may remain"
    );
}

#[test]
fn template_render_prints_exactly_the_template_output() {
    let work = tempfile::tempdir().unwrap();
    let messages = work.path().join("messages.json");
    std::fs::write(&messages, r#"[{"role": "user", "content": "Hi!"}]"#).unwrap();
    let dir = model_dir("llama");
    let out = burnish(&[
        "template",
        "render",
        "--model",
        dir.to_str().unwrap(),
        "--messages",
        messages.to_str().unwrap(),
        "--add-generation-prompt",
    ]);
    assert_success(&out);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );

    // A template that raises exits non-zero with the template's message.
    let raising = work.path().join("raising.jinja");
    std::fs::write(
        &raising,
        "{{ raise_exception('Conversation roles must alternate') }}",
    )
    .unwrap();
    let out = burnish(&[
        "template",
        "render",
        "--template",
        raising.to_str().unwrap(),
        "--messages",
        messages.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Conversation roles must alternate"));
}

#[test]
fn chat_streams_replies_and_resets_the_conversation() {
    use std::io::Write;
    let dir = model_dir("llama");
    let mut child = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args([
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-new-tokens",
            "32",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Two turns, a reset, the first turn again, then /exit: what follows is never read.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi!\nHi!\n/reset\nHi!\n/exit\nHi!\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(replies.len(), 3, "{stdout:?}");
    // The first reply is transformers' greedy answer to the ChatML render of "Hi!".
    let tokenizer = burnish_data::Tokenizer::from_dir(&dir).unwrap();
    let expected = tokenizer
        .decode(&golden("llama").greedy[1].new_ids, true)
        .unwrap();
    assert_eq!(replies[0], expected);
    // After /reset the conversation starts over, so the same turn gets the same reply.
    assert_eq!(replies[2], replies[0]);
}

/// Every mode of `bench` runs on the tiny shape and prints the object the GPU scripts read.
#[test]
fn bench_runs_every_mode_and_prints_its_json_fields() {
    for mode in ["forward", "sft", "dpo", "orpo", "cpo", "kto", "reward"] {
        let out = burnish(&[
            "bench", "--shape", "tiny", "--mode", mode, "--batch", "2", "--seq", "16", "--warmup",
            "0", "--steps", "1", "--device", "cpu", "--json",
        ]);
        assert_success(&out);
        let line = String::from_utf8(out.stdout).unwrap();
        let report: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(report["mode"], mode, "{report}");
        for key in ["tokens_per_s", "step_ms", "peak_memory_bytes"] {
            assert!(
                report[key].as_f64().is_some_and(|v| v > 0.0),
                "{mode}: {key}: {report}"
            );
        }
    }
}
