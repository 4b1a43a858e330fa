//! `burnish train` end to end on the llama fixture: an SFT run and a DPO run from recipe files,
//! each learning its task on the CPU in seconds, writing a run directory whose adapter PEFT's
//! format readers (ours included) load; recipe errors name the key.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::cli::burnish;
use crate::fixtures::{assert_success, copy_fixture, edit_config, model_dir};

const WORDS: &[&str] = &[
    "red", "blue", "green", "cat", "dog", "bird", "sun", "moon", "tree", "fish",
];

/// `burnish train RECIPE --device cpu EXTRA...`.
pub(crate) fn train(recipe: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", recipe.to_str().unwrap(), "--device", "cpu"];
    args.extend_from_slice(extra);
    burnish(&args)
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Every line of a run's `metrics.jsonl`.
pub(crate) fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn recipe(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("recipe.toml");
    let text = format!(
        "[model]\nbase = \"{}\"\n\n[output]\ndir = \"run\"\n\n{body}",
        model_dir("llama").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn sft_run_learns_and_writes_a_peft_adapter() {
    let work = tempfile::tempdir().unwrap();
    // Answer with the word after the one asked about.
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("after {}?", WORDS[i])},
                {"role": "assistant", "content": WORDS[i + 1]},
            ]})
        })
        .collect();
    write_jsonl(&work.path().join("train.jsonl"), &rows);
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"train.jsonl\"\neval = \"train.jsonl\"\n\n[train]\nmax_steps = 25\nmicro_batch_size = 4\nlr = 2e-2\nschedule = \"constant\"\neval_every = 25\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);

    let run = work.path().join("run");
    let lines = metrics(&run);
    let steps: Vec<&Value> = lines.iter().filter(|l| l.get("step").is_some()).collect();
    assert_eq!(steps.len(), 25);
    let first = steps[0]["loss"].as_f64().unwrap();
    let eval = first_eval_loss(&lines);
    assert!(
        eval < 0.5 * first,
        "eval loss {eval} did not fall well below the first step's {first}"
    );
    for key in ["epoch", "lr", "grad_norm", "trained_tokens", "tokens_per_s"] {
        assert!(steps[0].get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.toml",
        "README.md",
    ] {
        assert!(
            run.join(file).exists(),
            "{file} missing from the run directory"
        );
    }
    // The run directory is a PEFT adapter: it loads with `--adapter` and changes the scores.
    let model = model_dir("llama");
    let score = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "score",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "40,41,42,43",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = burnish(&args);
        assert_success(&out);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["sum"]
            .as_f64()
            .unwrap()
    };
    assert_ne!(score(&["--adapter", run.to_str().unwrap()]), score(&[]));

    // The same run under other settings, into `run-<name>`, learns as well: its metrics.
    let learns = |name: &str, sets: &[&str]| -> Vec<Value> {
        let dir = format!("output.dir=\"run-{name}\"");
        let mut args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        args.extend(["--set", &dir]);
        let out = train(&path, &args);
        assert_success(&out);
        let lines = metrics(&work.path().join(format!("run-{name}")));
        let eval = first_eval_loss(&lines);
        assert!(
            eval < 0.5 * first,
            "{name}: eval loss {eval} did not fall well below the first step's {first}"
        );
        lines
    };

    // A base held in bf16.
    learns("bf16", &["model.dtype=\"bf16\""]);

    // QLoRA: the same over a 4-bit NF4 base; `score --dtype nf4` reads the base the same way.
    learns("nf4", &["model.dtype=\"nf4\""]);
    let nf4 = work.path().join("run-nf4");
    let nf4_adapter = ["--adapter", nf4.to_str().unwrap(), "--dtype", "nf4"];
    assert_ne!(score(&nf4_adapter), score(&["--dtype", "nf4"]));
    assert_ne!(score(&["--dtype", "nf4"]), score(&[]));

    // A checkpoint saved in 4 bits trains as QLoRA over its stored codes, `model.dtype` left
    // `auto`.
    let stored = format!("model.base=\"{}\"", model_dir("llama-bnb-4bit").display());
    learns("bnb", &[&stored]);

    // NEFTune's noisy embeddings: the first step's loss moves, and the run still learns.
    let lines = learns("neftune", &["train.neftune_noise_alpha=5.0"]);
    let noisy_first = lines[0]["loss"].as_f64().unwrap();
    assert!(
        (noisy_first - first).abs() > 1e-6,
        "{noisy_first} vs {first}"
    );

    // DoRA, with adapter dropout drawing: learns as well, and writes PEFT's DoRA adapter.
    learns("dora", &["adapter.use_dora=true", "adapter.dropout=0.1"]);
    let dora = work.path().join("run-dora");
    let config: Value =
        serde_json::from_slice(&std::fs::read(dora.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["use_dora"], true);
    assert_ne!(score(&["--adapter", dora.to_str().unwrap()]), score(&[]));
}

/// Eight conversational preference rows in `dir/pairs.jsonl`.
fn preference_rows(dir: &Path) {
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            json!({
                "prompt": [{"role": "user", "content": format!("is the {} big?", WORDS[i])}],
                "chosen": [{"role": "assistant", "content": "yes, very big"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            })
        })
        .collect();
    write_jsonl(&dir.join("pairs.jsonl"), &rows);
}

#[test]
fn dpo_run_prefers_the_chosen_answers() {
    let work = tempfile::tempdir().unwrap();
    preference_rows(work.path());
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"pairs.jsonl\"\neval = \"pairs.jsonl\"\n\n[train]\nstrategy = \"dpo\"\nmax_steps = 15\nmicro_batch_size = 4\nlr = 1e-2\nschedule = \"constant\"\n\n[dpo]\nbeta = 0.1\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    let first = &lines[0];
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
        "DPO starts at ln 2"
    );
    let eval = lines.iter().find(|l| l.get("eval_loss").is_some()).unwrap();
    assert!(
        eval["rewards/accuracies"].as_f64().unwrap() >= 0.9,
        "{eval}"
    );
    assert!(eval["rewards/margins"].as_f64().unwrap() > 0.0, "{eval}");

    // Reference log-probs computed once before training give the same run.
    let run = work.path().join("run");
    let without = metrics_without_timing(&run);
    let out = train(&path, &["--set", "dpo.precompute_ref=true"]);
    assert_success(&out);
    let with = metrics_without_timing(&run);
    assert_eq!(with.len(), without.len());
    for (a, b) in with.iter().zip(&without) {
        for key in ["loss", "eval_loss", "rewards/margins"] {
            if let (Some(x), Some(y)) = (
                a.get(key).and_then(Value::as_f64),
                b.get(key).and_then(Value::as_f64),
            ) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "{key}: {x} with precomputed reference, {y} without"
                );
            }
        }
    }

    // RPO adds the chosen answers' NLL to the loss: the first step is above ln 2 by that much.
    let out = train(
        &path,
        &["--set", "dpo.rpo_alpha=1.0", "--set", "train.max_steps=1"],
    );
    assert_success(&out);
    let first = metrics(&work.path().join("run"))[0]["loss"]
        .as_f64()
        .unwrap();
    assert!(
        first > std::f64::consts::LN_2 + 1.0,
        "RPO loss {first} lacks its NLL term"
    );

    // Other loss types train, alone or weighted together (MPO), under other divergences: the
    // sorting losses' gradients follow each value to its sorted place.
    for sets in [
        &["dpo.loss=\"aot\""][..],
        &[
            "dpo.loss=[\"sigmoid\", \"bco_pair\", \"sft\"]",
            "dpo.loss_weights=[0.8, 0.2, 1.0]",
        ],
        &[
            "dpo.loss=\"ipo\"",
            "dpo.f_divergence_type=\"js_divergence\"",
        ],
    ] {
        let mut args = vec!["--set", "train.max_steps=3"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = train(&path, &args);
        assert_success(&out);
        let losses: Vec<f64> = metrics(&work.path().join("run"))
            .iter()
            .filter_map(|l| l["loss"].as_f64())
            .collect();
        assert!(losses[2] < losses[0], "{sets:?}: {losses:?}");
    }

    // Continuing that adapter, the reference is still the base with the adapter off, computed
    // once or at every step alike: the first step is not at ln 2, where the adapter as it starts
    // would put it.
    let first_loss = |extra: &str| {
        let out = train(
            &path,
            &[
                "--set",
                "adapter.init_from=\"run\"",
                "--set",
                "train.max_steps=1",
                "--set",
                "output.dir=\"continued\"",
                "--set",
                extra,
            ],
        );
        assert_success(&out);
        metrics(&work.path().join("continued"))[0]["loss"]
            .as_f64()
            .unwrap()
    };
    let (once, every_step) = (
        first_loss("dpo.precompute_ref=true"),
        first_loss("dpo.precompute_ref=false"),
    );
    assert!((once - every_step).abs() < 1e-5, "{once} vs {every_step}");
    assert!((once - std::f64::consts::LN_2).abs() > 1e-3, "{once}");
    // With that adapter as the reference too (TRL's `ref_adapter_name`), policy and reference
    // agree at the first step: the loss starts at ln 2.
    let own = first_loss("dpo.reference_adapter=\"run\"");
    assert!((own - std::f64::consts::LN_2).abs() < 1e-5, "{own}");

    // A reference adapter that is not there is named; a resumed run keeps its reference.
    let with_reference = |reference: &str, extra: &[&str]| {
        let mut args = vec![
            "--set",
            "adapter.init_from=\"run\"",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.save_every=1",
            "--set",
            "output.dir=\"resumed\"",
        ];
        let reference = format!("dpo.reference_adapter=\"{reference}\"");
        args.extend(["--set", reference.as_str()]);
        args.extend_from_slice(extra);
        train(&path, &args)
    };
    let out = with_reference("nowhere", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`dpo.reference_adapter`") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    assert_success(&with_reference("run", &[]));
    let out = with_reference("continued", &["--resume"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reference adapter"), "{err}");
}

#[test]
fn full_fine_tuning_dpo_keeps_the_model_it_starts_from_as_reference() {
    let work = tempfile::tempdir().unwrap();
    preference_rows(work.path());
    let path = recipe(
        work.path(),
        "[data]\ntrain = \"pairs.jsonl\"\neval = \"pairs.jsonl\"\n\n[train]\nstrategy = \"dpo\"\nmax_steps = 6\nmicro_batch_size = 4\nlr = 1e-3\nschedule = \"constant\"\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    // A reference that followed the training weights would hold every step at ln 2.
    let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-5,
        "{losses:?}"
    );
    assert!(losses[5] < losses[0] - 0.05, "{losses:?}");
    let eval = lines.iter().find(|l| l.get("eval_loss").is_some()).unwrap();
    assert!(eval["rewards/margins"].as_f64().unwrap() > 0.0, "{eval}");
}

#[test]
fn reward_models_learn_to_score_the_chosen_reply_higher() {
    let work = tempfile::tempdir().unwrap();
    preference_rows(work.path());
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"pairs.jsonl\"\neval = \"pairs.jsonl\"\n\n[train]\nstrategy = \"reward\"\nmax_steps = 15\nmicro_batch_size = 4\nlr = 1e-2\nschedule = \"constant\"\n\n[reward]\ncenter_rewards_coefficient = 0.01\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    let eval = lines.iter().find(|l| l.get("eval_loss").is_some()).unwrap();
    assert_eq!(eval["accuracy"].as_f64().unwrap(), 1.0, "{eval}");
    assert!(eval["margin"].as_f64().unwrap() > 1.0, "{eval}");
    assert!(
        eval["eval_loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap() / 2.0,
        "{eval}"
    );

    // The adapter is PEFT's for a sequence classifier: the head is saved whole beside it.
    let run = work.path().join("run");
    let config: Value =
        serde_json::from_slice(&std::fs::read(run.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    let weights = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&weights)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(
        names.contains(&"base_model.model.score.weight".to_string()),
        "{names:?}"
    );
    let card = std::fs::read_to_string(run.join("README.md")).unwrap();
    assert!(card.contains("pipeline_tag: text-classification"), "{card}");

    // It continues only as a reward model, and is no reference for a language model.
    let dpo = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\ninit_from = \"run\"\n\n[data]\ntrain = \"pairs.jsonl\"\n\n[train]\nstrategy = \"dpo\"\nmax_steps = 1\n",
    );
    let out = train(&dpo, &["--set", "output.dir=\"dpo\""]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a reward model's adapter"), "{err}");
    let dpo = recipe(
        work.path(),
        "[adapter]\nr = 8\n\n[data]\ntrain = \"pairs.jsonl\"\n\n[train]\nstrategy = \"dpo\"\nmax_steps = 1\n\n[dpo]\nreference_adapter = \"run\"\n",
    );
    let out = train(&dpo, &["--set", "output.dir=\"dpo\""]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dpo.reference_adapter") && err.contains("reward model"),
        "{err}"
    );

    // Merged, it is a sequence-classifier checkpoint, which does not generate.
    let merged = work.path().join("merged");
    let out = burnish(&[
        "merge",
        "--model",
        model_dir("llama").to_str().unwrap(),
        "--adapter",
        run.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_success(&out);
    let config: Value =
        serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    let out = burnish(&[
        "generate",
        "--model",
        merged.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "hello",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reward model"), "{err}");
    // `score` gives its reward of a text instead, the merged model as the base with the adapter.
    let conversation = |reply: &str| {
        format!(
            "<|im_start|>user\nis the cat big?<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
        )
    };
    let (chosen, rejected) = (conversation("yes, very big"), conversation("no"));
    let reward = |text: &str, extra: &[&str]| {
        let mut args = vec!["score", "--device", "cpu", "--text", text, "--json"];
        args.extend_from_slice(extra);
        let out = burnish(&args);
        assert_success(&out);
        let scored: Value = serde_json::from_slice(&out.stdout).unwrap();
        scored["reward"].as_f64().unwrap()
    };
    let merged_reward = reward(&chosen, &["--model", merged.to_str().unwrap()]);
    let adapter_reward = reward(
        &chosen,
        &[
            "--model",
            model_dir("llama").to_str().unwrap(),
            "--adapter",
            run.to_str().unwrap(),
        ],
    );
    assert!(
        (merged_reward - adapter_reward).abs() < 1e-4,
        "{merged_reward} vs {adapter_reward}"
    );
    let rejected_reward = reward(&rejected, &["--model", merged.to_str().unwrap()]);
    assert!(
        merged_reward > rejected_reward,
        "the chosen reply scores above the rejected one: {merged_reward} vs {rejected_reward}"
    );

    // Trained in full, with checkpoints, and resumed: the checkpoint is a classifier too.
    let full = recipe(
        work.path(),
        "[data]\ntrain = \"pairs.jsonl\"\n\n[train]\nstrategy = \"reward\"\nmax_steps = 2\nsave_every = 1\nmicro_batch_size = 4\nlr = 1e-3\n",
    );
    let out = train(&full, &["--set", "output.dir=\"full\""]);
    assert_success(&out);
    let out = train(
        &full,
        &[
            "--set",
            "output.dir=\"full\"",
            "--set",
            "train.max_steps=3",
            "--resume",
        ],
    );
    assert_success(&out);
    let config: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("full/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(config["pad_token_id"], json!(0));
}

#[test]
fn grpo_runs_complete_prompts_score_them_and_resume_to_the_same_numbers() {
    let work = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": [{"role": "user", "content": format!("is the {} big?", WORDS[i])}]}))
        .collect();
    write_jsonl(&work.path().join("prompts.jsonl"), &rows);
    let reward_model = model_dir("llama-reward");
    let body = format!(
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"prompts.jsonl\"\n\n[train]\nstrategy = \"grpo\"\nmax_steps = 3\nmicro_batch_size = 4\ngradient_accumulation = 2\nlr = 1e-2\nschedule = \"constant\"\n\n[grpo]\nreward_models = [\"{}\"]\nnum_generations = 4\nmax_completion_length = 6\nbeta = 0.05\n",
        reward_model.display()
    );
    let path = recipe(work.path(), &body);
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert!(line["loss"].as_f64().unwrap().is_finite(), "{line}");
        for key in [
            "reward",
            "reward_std",
            "entropy",
            "kl",
            "rewards/llama-reward/mean",
            "rewards/llama-reward/std",
        ] {
            assert!(
                line[key].as_f64().is_some_and(f64::is_finite),
                "{key}: {line}"
            );
        }
        let length = line["completions/max_length"].as_f64().unwrap();
        assert!((1.0..=6.0).contains(&length), "{line}");
        // Completions that ended with an end token are no longer than the limit, and none at
        // all (every one cut) logs 0s.
        let terminated = line["completions/max_terminated_length"].as_f64().unwrap();
        let cut = line["completions/clipped_ratio"].as_f64().unwrap();
        assert!(terminated <= length, "{line}");
        assert_eq!(terminated == 0.0, cut == 1.0, "{line}");
    }
    assert!(work.path().join("run/adapter_model.safetensors").exists());

    // Completions are drawn from streams fixed by the step: a resumed run draws and learns the
    // same.
    let out = train(
        &path,
        &[
            "--set",
            "output.dir=\"parts\"",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.save_every=1",
        ],
    );
    assert_success(&out);
    // Under a reward model whose weights changed, the run would score otherwise: refused. The
    // same model at another path continues.
    let (changed, moved) = (copy_fixture("llama-reward"), copy_fixture("llama-reward"));
    let weights = changed.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let judge =
        |dir: &tempfile::TempDir| format!("grpo.reward_models=[\"{}\"]", dir.path().display());
    let resume = |reward_models: &str| {
        train(
            &path,
            &[
                "--set",
                "output.dir=\"parts\"",
                "--set",
                reward_models,
                "--resume",
            ],
        )
    };
    let out = resume(&judge(&changed));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the reward models (`grpo.reward_models`"),
        "{err}"
    );
    let out = resume(&judge(&moved));
    assert_success(&out);
    let resumed = metrics(&work.path().join("parts"));
    for key in ["loss", "reward", "grad_norm"] {
        assert_eq!(resumed[2][key], lines[2][key], "{key}");
    }

    // Two updates per draw (TRL's `num_iterations`): the second reuses the first's completions,
    // its ratios taken against the log-probabilities they were drawn with; a run resumed where
    // a draw begins learns the same.
    let reused = |dir: &str, extra: &[&str]| {
        let mut args = vec![
            "--set",
            "grpo.num_iterations=2",
            "--set",
            "train.max_steps=4",
            "--set",
            dir,
        ];
        args.extend_from_slice(extra);
        let out = train(&path, &args);
        assert_success(&out);
    };
    reused("output.dir=\"reused\"", &[]);
    let steps: Vec<Value> = metrics(&work.path().join("reused"))
        .into_iter()
        .filter(|l| l.get("step").is_some())
        .collect();
    assert_eq!(steps.len(), 4);
    for (i, line) in steps.iter().enumerate() {
        assert_eq!(
            line.get("reward").is_some(),
            i % 2 == 0,
            "drawn on odd steps: {line}"
        );
        let clipped = line["clip_ratio/region_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&clipped), "{line}");
    }
    assert_eq!(steps[0]["clip_ratio/region_mean"], 0.0);
    reused(
        "output.dir=\"reused-parts\"",
        &["--set", "train.max_steps=3", "--set", "train.save_every=2"],
    );
    reused("output.dir=\"reused-parts\"", &["--resume"]);
    let resumed: Vec<Value> = metrics(&work.path().join("reused-parts"))
        .into_iter()
        .filter(|l| l.get("step").is_some())
        .collect();
    for key in ["loss", "grad_norm", "clip_ratio/region_mean"] {
        assert_eq!(resumed[3][key], steps[3][key], "{key}");
    }

    // Continuing the adapter with itself as the KL term's reference: the first step's KL is 0.
    let out = train(
        &path,
        &[
            "--set",
            "output.dir=\"continued\"",
            "--set",
            "adapter.init_from=\"run\"",
            "--set",
            "grpo.reference_adapter=\"run\"",
            "--set",
            "train.max_steps=1",
        ],
    );
    assert_success(&out);
    let first = &metrics(&work.path().join("continued"))[0];
    assert!(first["kl"].as_f64().unwrap().abs() < 1e-6, "{first}");

    // Reward functions alone: the row's `answer` column, and TRL's format reward.
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            json!({
                "prompt": [{"role": "user", "content": format!("is the {} big?", WORDS[i])}],
                "answer": if i % 2 == 0 { "yes" } else { "no" },
            })
        })
        .collect();
    write_jsonl(&work.path().join("answers.jsonl"), &rows);
    let functions = "grpo.reward_functions=[{kind = \"contains\", field = \"answer\"}, {kind = \"think_format\", weight = 0.5}]";
    // Two steps on the answer rows, scored by `functions` alone, into `dir`.
    let scored_by = |functions: &str, dir: &str| {
        let dir = format!("output.dir=\"{dir}\"");
        let args = [
            "--set",
            "data.train=\"answers.jsonl\"",
            "--set",
            "grpo.reward_models=[]",
            "--set",
            functions,
            "--set",
            &dir,
            "--set",
            "train.max_steps=2",
        ];
        train(&path, &args)
    };
    assert_success(&scored_by(functions, "functions"));
    for line in metrics(&work.path().join("functions")) {
        for key in [
            "rewards/contains_answer/mean",
            "rewards/think_format_reward/mean",
        ] {
            let mean = line[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&mean), "{key}: {line}");
        }
    }
    // The same reward as a program of the user's, run by python3 (standard library only) where
    // the machine has it; the README's test command needs nothing but Rust.
    let python = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if python {
        // TRL's reward function of the `contains` rule, served by the Python bridge, scores as
        // the rule does, so the run learns the same.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let program = format!(
            "grpo.reward_functions=[{{kind = \"program\", name = \"contains_answer\", command = [\"python3\", \"{}\", \"{}:contains_answer\"]}}, {{kind = \"think_format\", weight = 0.5}}]",
            root.join("recipes/rewards/trl_reward.py").display(),
            root.join("tests/fixtures/rewards/contains_answer.py")
                .display(),
        );
        assert_success(&scored_by(&program, "program"));
        let (rule, served) = (
            metrics_without_timing(&work.path().join("functions")),
            metrics_without_timing(&work.path().join("program")),
        );
        assert_eq!(served, rule);
        // A program that stops answering is named, with what it said on its way out.
        let broken = program.replace(":contains_answer", ":no_such_function");
        let out = scored_by(&broken, "broken");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("defines no no_such_function")
                && err.contains("reward program `contains_answer`")
                && err.contains("ended (exit status: 1) without answering"),
            "{err}"
        );
    } else {
        eprintln!(
            "note: no python3: the reward program bridge (recipes/rewards/trl_reward.py) is not run"
        );
    }

    // A row without the column is named.
    let out = train(
        &path,
        &[
            "--set",
            "grpo.reward_models=[]",
            "--set",
            functions,
            "--set",
            "output.dir=\"missing\"",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prompts.jsonl:1") && err.contains("no `answer`"),
        "{err}"
    );

    // Evaluation draws completions for the held-out prompts, the same ones each time (seeds of
    // their own), and logs the loss and TRL's generation metrics: at a learning rate too small
    // to move a draw, two evaluations score the same completions.
    let out = train(
        &path,
        &[
            "--set",
            "data.eval_ratio=0.5",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.lr=1e-12",
            "--set",
            "train.max_steps=2",
            "--set",
            "output.dir=\"evaluated\"",
        ],
    );
    assert_success(&out);
    let evals: Vec<Value> = metrics(&work.path().join("evaluated"))
        .into_iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "{evals:?}");
    for key in [
        "eval_loss",
        "kl",
        "reward",
        "rewards/llama-reward/mean",
        "completions/mean_length",
    ] {
        assert!(
            evals[0][key].as_f64().is_some_and(f64::is_finite),
            "{key}: {evals:?}"
        );
    }
    for key in [
        "reward",
        "rewards/llama-reward/mean",
        "completions/mean_length",
    ] {
        assert_eq!(evals[0][key], evals[1][key], "{key}");
    }

    // A causal LM is no reward model.
    let out = train(
        &path,
        &[
            "--set",
            &format!("grpo.reward_models=[\"{}\"]", model_dir("llama").display()),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a one-label sequence classifier"), "{err}");
}

#[test]
fn kto_runs_learn_from_unpaired_labels() {
    let work = tempfile::tempdir().unwrap();
    preference_rows(work.path());
    // Preference pairs become a desirable and an undesirable completion each.
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"pairs.jsonl\"\neval = \"pairs.jsonl\"\n\n[train]\nstrategy = \"kto\"\nmax_steps = 15\nmicro_batch_size = 4\nlr = 1e-2\nschedule = \"constant\"\n\n[kto]\nbeta = 0.5\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("16 training and 16 evaluation items"),
        "8 pairs are 16 labeled completions: {said}"
    );
    let lines = metrics(&work.path().join("run"));
    // The adapter starts as a no-op: policy and reference agree, the KL estimate is 0 and
    // every completion's loss is 1 - σ(0).
    let first = &lines[0];
    assert!(
        (first["loss"].as_f64().unwrap() - 0.5).abs() < 1e-5,
        "{first}"
    );
    assert!(first["kl"].as_f64().unwrap().abs() < 1e-5, "{first}");
    let eval = lines.iter().find(|l| l.get("eval_loss").is_some()).unwrap();
    assert!(eval["rewards/margins"].as_f64().unwrap() > 0.0, "{eval}");
    assert!(eval["rewards/chosen"].as_f64().unwrap() > 0.0, "{eval}");
    assert!(eval["eval_loss"].as_f64().unwrap() < 0.45, "{eval}");

    // With the adapter it continues as the reference too, policy and reference agree at first.
    let out = train(
        &path,
        &[
            "--set",
            "adapter.init_from=\"run\"",
            "--set",
            "kto.reference_adapter=\"run\"",
            "--set",
            "train.max_steps=1",
            "--set",
            "output.dir=\"continued\"",
        ],
    );
    assert_success(&out);
    let first = &metrics(&work.path().join("continued"))[0];
    assert!(
        (first["loss"].as_f64().unwrap() - 0.5).abs() < 1e-5,
        "{first}"
    );
    assert!(
        first["rewards/margins"].as_f64().unwrap().abs() < 1e-5,
        "{first}"
    );

    // Rows labeled one by one, trained in full with a copy of the base as the reference.
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            json!({
                "prompt": [{"role": "user", "content": format!("is the {} big?", WORDS[i])}],
                "completion": [{"role": "assistant", "content": if i % 2 == 0 { "yes, very big" } else { "no" }}],
                "label": i % 2 == 0,
            })
        })
        .collect();
    write_jsonl(&work.path().join("labeled.jsonl"), &rows);
    let path = recipe(
        work.path(),
        "[data]\ntrain = \"labeled.jsonl\"\n\n[train]\nstrategy = \"kto\"\nmax_steps = 4\nmicro_batch_size = 3\nlr = 1e-3\nschedule = \"constant\"\n\n[kto]\ndesirable_weight = 1.5\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let losses: Vec<f64> = metrics(&work.path().join("run"))
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect();
    // A batch of 3 then one of 5 (a lone last row joins the batch before it): 2 steps an epoch.
    assert_eq!(losses.len(), 4, "{losses:?}");
    assert!(losses[2] < losses[0] - 0.01, "{losses:?}");

    // Unbalanced labels get the KTO paper's advice on the weights.
    let out = train(
        &path,
        &[
            "--set",
            "data.train=[\"labeled.jsonl\", \"pairs.jsonl\"]",
            "--set",
            "train.max_steps=1",
        ],
    );
    assert!(
        !out.status.success(),
        "labeled rows and pairs are two kinds of row"
    );
    let unbalanced: Vec<Value> = rows.iter().take(5).cloned().collect();
    write_jsonl(&work.path().join("unbalanced.jsonl"), &unbalanced);
    let out = train(
        &path,
        &[
            "--set",
            "data.train=\"unbalanced.jsonl\"",
            "--set",
            "train.max_steps=1",
        ],
    );
    assert_success(&out);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("3 desirable and 2 undesirable")
            && said.contains("`kto.undesirable_weight` in [1.69, 2.25]"),
        "{said}"
    );

    // The KL term needs two rows in a micro-batch.
    let out = train(&path, &["--set", "train.micro_batch_size=1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.micro_batch_size") && err.contains("apo_zero_unpaired"),
        "{err}"
    );
    // Conversations are no preference data.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]});
    write_jsonl(&work.path().join("chat.jsonl"), &[chat]);
    let out = train(&path, &["--set", "data.train=\"chat.jsonl\""]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("labeled completions (or preference pairs)"),
        "{err}"
    );
}

#[test]
fn orpo_and_simpo_runs_prefer_the_chosen_answers_without_a_reference() {
    let work = tempfile::tempdir().unwrap();
    preference_rows(work.path());
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"pairs.jsonl\"\neval = \"pairs.jsonl\"\n\n[train]\nstrategy = \"orpo\"\nmax_steps = 15\nmicro_batch_size = 4\nlr = 1e-2\nschedule = \"constant\"\n\n[orpo]\nbeta = 0.5\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    // The loss is the chosen sequences' NLL minus β times the mean log σ(log odds).
    let first = &lines[0];
    let value = |key: &str| first[key].as_f64().unwrap();
    let parts = value("nll_loss") - 0.5 * value("log_odds_ratio");
    assert!((value("loss") - parts).abs() < 1e-5, "{first}");
    let eval = lines.iter().find(|l| l.get("eval_loss").is_some()).unwrap();
    assert!(
        eval["rewards/accuracies"].as_f64().unwrap() >= 0.9,
        "{eval}"
    );
    assert!(eval["log_odds_chosen"].as_f64().unwrap() > 0.0, "{eval}");
    assert!(
        eval["eval_loss"].as_f64().unwrap() < value("loss"),
        "{eval}"
    );

    // DPO's settings do not apply to ORPO: saying so beats ignoring them.
    let out = train(&path, &["--set", "dpo.beta=0.2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`[dpo]`") && err.contains("orpo"), "{err}");

    // SimPO: CPO's `simpo` loss on average log-probs, with no NLL term.
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"pairs.jsonl\"\neval = \"pairs.jsonl\"\n\n[train]\nstrategy = \"cpo\"\nmax_steps = 15\nmicro_batch_size = 4\nlr = 1e-2\nschedule = \"constant\"\n\n[cpo]\nloss = \"simpo\"\nbeta = 2.0\nsimpo_gamma = 0.5\ncpo_alpha = 0.0\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    assert_eq!(lines[0]["nll_loss"], 0.0);
    let eval = lines.iter().find(|l| l.get("eval_loss").is_some()).unwrap();
    assert!(
        eval["rewards/accuracies"].as_f64().unwrap() >= 0.9,
        "{eval}"
    );
    // Past the target margin γ: βΔ - γ > 0.
    assert!(eval["rewards/margins"].as_f64().unwrap() > 0.5, "{eval}");
}

#[test]
fn recipe_and_data_mismatches_are_errors_naming_the_key() {
    let work = tempfile::tempdir().unwrap();
    let rows = vec![json!({"prompt": "q", "chosen": "a", "rejected": "b"})];
    write_jsonl(&work.path().join("pairs.jsonl"), &rows);
    let path = recipe(work.path(), "[data]\ntrain = \"pairs.jsonl\"\n");
    let out = train(&path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.strategy"), "{err}");

    // Every setting below is refused; the message names what is wrong.
    let refused = |setting: &str| {
        let out = train(&path, &["--set", setting]);
        assert!(!out.status.success(), "`{setting}` was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(refused("train.micro_batch_size=0").contains("train.micro_batch_size"));
    assert!(refused("trian.lr=1").contains("trian"));
    assert!(refused("train.schedul=linear").contains("did you mean `schedule`?"));
    // A bf16 or NF4 base is frozen: it needs an adapter to train.
    for dtype in ["bf16", "nf4"] {
        let err = refused(&format!("model.dtype=\"{dtype}\""));
        assert!(
            err.contains(&format!("model.dtype = \"{dtype}\"")) && err.contains("[adapter]"),
            "{err}"
        );
    }

    // A data file that is not there is named with the key and where paths are anchored.
    let err = refused("data.train=\"missing.jsonl\"");
    assert!(
        err.contains("`data.train` names") && err.contains("relative to the recipe file"),
        "{err}"
    );

    // A target module the model does not have is named with the ones it has.
    let err = refused("adapter.target_modules=[\"c_attn\"]");
    assert!(err.contains("c_attn") && err.contains("q_proj"), "{err}");
}

#[test]
fn a_run_says_what_it_cut_and_refuses_what_would_mix_or_misread() {
    let work = tempfile::tempdir().unwrap();
    let long = WORDS.join(" ").repeat(4);
    let rows = vec![
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}),
        json!({"messages": [{"role": "user", "content": "list"}, {"role": "assistant", "content": long}]}),
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    ];
    write_jsonl(&work.path().join("train.jsonl"), &rows);
    let path = recipe(
        work.path(),
        "[adapter]\nr = 4\n\n[data]\ntrain = \"train.jsonl\"\nmax_length = 24\non_bad_row = \"skip\"\n\n[train]\nmax_steps = 2\nwarmup_steps = 5\nsave_every = 1\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    for said in [
        "1 training rows were longer than `data.max_length`",
        "1 training rows were skipped",
        "train.jsonl:3:",
        "the warmup (5 steps) is as long as the run (2 steps)",
    ] {
        assert!(err.contains(said), "`{said}` missing from:\n{err}");
    }

    // A fresh run does not mix with the checkpoints of the one before.
    let out = train(&path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--resume") && err.contains("checkpoint"),
        "{err}"
    );

    // A resumed run keeps the batching, seed, adapter and data of the run it continues; what
    // it may change, it is told of.
    let resume_error = |extra: &[&str]| {
        let mut args = vec!["--resume"];
        args.extend_from_slice(extra);
        let out = train(&path, &args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = resume_error(&["--set", "train.micro_batch_size=2", "--set", "adapter.r=8"]);
    for said in [
        "step-000001",
        "`train.micro_batch_size` 4 → 2",
        "`adapter.r` 4 → 8",
    ] {
        assert!(err.contains(said), "`{said}` missing from:\n{err}");
    }
    let data = work.path().join("train.jsonl");
    let rows = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, rows.replace("red", "blue")).unwrap();
    let err = resume_error(&[]);
    assert!(err.contains("training data"), "{err}");
    std::fs::write(&data, rows).unwrap();
    let out = train(
        &path,
        &[
            "--resume",
            "--set",
            "train.lr=1e-3",
            "--set",
            "train.max_steps=3",
        ],
    );
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("resumed with changed settings")
            && err.contains("`train.lr` 0.0002 → 0.001")
            && err.contains("`train.max_steps` 2 → 3"),
        "{err}"
    );

    // An adapter continued with `init_from` trains as saved: a recipe value that says otherwise
    // is refused, not ignored.
    let continued = |extra: &[&str]| {
        let mut args = vec![
            "--set",
            "adapter.init_from=\"run\"",
            "--set",
            "output.dir=\"continued\"",
        ];
        args.extend_from_slice(extra);
        train(&path, &args)
    };
    let out = continued(&["--set", "adapter.r=8", "--set", "adapter.dropout=0.05"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`adapter.r = 8`, the adapter has 4") && !err.contains("dropout"),
        "{err}"
    );
    assert_success(&continued(&[]));
    let written =
        burnish_align::Recipe::from_file(&work.path().join("continued/recipe.toml"), &[]).unwrap();
    let mut keys = written.adapter.unwrap().given;
    keys.sort();
    assert_eq!(keys, ["init_from", "r"]);

    // A tokenizer whose ids the model has no embedding for is named before the model loads.
    let model = copy_fixture("llama");
    edit_config(model.path(), |c| c["vocab_size"] = json!(3));
    let out = train(
        &path,
        &[
            "--set",
            &format!("model.base=\"{}\"", model.path().display()),
            "--set",
            "output.dir=\"other\"",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.jsonl:1:") && err.contains("vocab_size"),
        "{err}"
    );
}

#[test]
fn non_finite_steps_stop_the_run_or_are_skipped() {
    use burnish_peft::{SaveDtype, decode_f32, serialize};

    let work = tempfile::tempdir().unwrap();
    // An adapter whose first B holds a NaN (burnish refuses to write one, so it is made by
    // hand): every step's loss is NaN.
    let adapter = model_dir("llama").join("../../adapters/llama-qv");
    let poisoned = work.path().join("poisoned");
    std::fs::create_dir_all(&poisoned).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        poisoned.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec(), decode_f32(&view).unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let b = tensors.iter_mut().find(|t| t.0.contains("lora_B")).unwrap();
    b.2[0] = f32::NAN;
    std::fs::write(
        poisoned.join("adapter_model.safetensors"),
        serialize(&tensors, SaveDtype::F32).unwrap(),
    )
    .unwrap();

    let rows = vec![
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}),
    ];
    write_jsonl(&work.path().join("train.jsonl"), &rows);
    let path = recipe(
        work.path(),
        "[adapter]\ninit_from = \"poisoned\"\n\n[data]\ntrain = \"train.jsonl\"\n\n[train]\nmax_steps = 3\n",
    );
    let out = train(&path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step 1") && err.contains("on_nonfinite"),
        "{err}"
    );

    // Skipped steps leave the poisoned adapter as it was, which is then not written.
    let out = train(&path, &["--set", "train.on_nonfinite=skip"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("non-finite") && err.contains("lora_B"),
        "{err}"
    );
    assert!(!work.path().join("run/adapter_model.safetensors").exists());
    let skipped = metrics(&work.path().join("run"))
        .iter()
        .filter(|l| l.get("skipped_step").is_some())
        .count();
    assert_eq!(
        skipped, 3,
        "every step is skipped and counted towards max_steps"
    );
}

#[test]
fn instruction_tuning_on_alpaca_rows_learns() {
    let work = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = (0..8)
        .map(|i| json!({"instruction": "Name the next word.", "input": WORDS[i], "output": WORDS[i + 1]}))
        .collect();
    write_jsonl(&work.path().join("alpaca.jsonl"), &rows);
    let path = recipe(
        work.path(),
        "[adapter]\nr = 8\nalpha = 16\ndropout = 0.0\n\n[data]\ntrain = \"alpaca.jsonl\"\neval = \"alpaca.jsonl\"\nformat = \"alpaca\"\n\n[train]\nstrategy = \"instruct\"\nmax_steps = 25\nmicro_batch_size = 4\nlr = 2e-2\nschedule = \"constant\"\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let lines = metrics(&work.path().join("run"));
    let first = lines[0]["loss"].as_f64().unwrap();
    let eval = first_eval_loss(&lines);
    assert!(
        eval < 0.5 * first,
        "eval loss {eval} did not fall well below the first step's {first}"
    );
}

/// metrics.jsonl without the timing fields, which differ from run to run.
/// The first evaluation's loss among a run's `metrics.jsonl` lines.
fn first_eval_loss(lines: &[Value]) -> f64 {
    lines
        .iter()
        .find_map(|l| l.get("eval_loss"))
        .and_then(Value::as_f64)
        .expect("an eval_loss line")
}

fn metrics_without_timing(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .map(|mut l| {
            if let Some(o) = l.as_object_mut() {
                o.remove("step_seconds");
                o.remove("tokens_per_s");
            }
            l
        })
        .collect()
}

fn chat_rows(dir: &Path) {
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"messages": [{"role": "user", "content": WORDS[i]}, {"role": "assistant", "content": WORDS[i + 1]}]}))
        .collect();
    write_jsonl(&dir.join("train.jsonl"), &rows);
}

#[test]
fn resuming_from_a_checkpoint_equals_an_uninterrupted_run() {
    let work = tempfile::tempdir().unwrap();
    chat_rows(work.path());
    // Dropout on, cosine schedule with warmup, accumulation: everything resume must restore.
    let path = recipe(
        work.path(),
        "[adapter]\nr = 4\nalpha = 8\ndropout = 0.1\n\n[data]\ntrain = \"train.jsonl\"\n\n[train]\nmax_steps = 6\nmicro_batch_size = 2\ngradient_accumulation = 2\nlr = 1e-2\nwarmup_steps = 2\nsave_every = 2\nkeep_checkpoints = 5\n",
    );
    let run = work.path().join("run");
    let tensorboard = ["--set", "output.tensorboard=true"];
    let out = train(&path, &tensorboard);
    assert_success(&out);
    let uninterrupted = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let uninterrupted_metrics = metrics_without_timing(&run);

    // As if the run had died after its step-2 checkpoint.
    std::fs::remove_dir_all(run.join("checkpoints/step-000004")).unwrap();
    std::fs::remove_file(run.join("adapter_model.safetensors")).unwrap();
    let out = train(&path, &[&tensorboard[..], &["--resume"]].concat());
    assert_success(&out);
    // Each session wrote TensorBoard events of its own steps; the resumed one opens with a
    // session start at step 3, from which TensorBoard drops the first session's points.
    let mut sessions: Vec<Vec<u8>> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    sessions.sort_by_key(|bytes| bytes.len());
    let count =
        |bytes: &[u8], what: &[u8]| bytes.windows(what.len()).filter(|w| *w == what).count();
    let [resumed, first] = &sessions[..] else {
        panic!("{} event files", sessions.len())
    };
    assert_eq!(count(first, b"train/loss"), 6);
    assert_eq!(count(resumed, b"train/loss"), 4);
    assert_eq!(
        count(resumed, &[0x10, 3, 0x3a, 2, 0x08, 1]),
        1,
        "session start at 3"
    );
    assert_eq!(
        std::fs::read(run.join("adapter_model.safetensors")).unwrap(),
        uninterrupted,
        "adapters differ"
    );
    assert_eq!(metrics_without_timing(&run), uninterrupted_metrics);

    // Recomputing the layers in the backward pass draws the same dropout masks again: the run
    // takes the same steps.
    let recomputed = work.path().join("recomputed");
    let out = train(
        &path,
        &[
            "--set",
            "train.gradient_checkpointing=true",
            "--set",
            &format!("output.dir=\"{}\"", recomputed.display()),
        ],
    );
    assert_success(&out);
    let recomputed = metrics_without_timing(&recomputed);
    assert_eq!(recomputed.len(), uninterrupted_metrics.len());
    for (a, b) in uninterrupted_metrics.iter().zip(&recomputed) {
        for key in ["loss", "grad_norm", "eval_loss"] {
            let (Some(x), Some(y)) = (a.get(key), b.get(key)) else {
                assert_eq!(a.get(key), b.get(key), "{key} in one run only");
                continue;
            };
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs(),
                "{key}: {x} vs {y} recomputed"
            );
        }
    }
}

#[test]
fn killing_a_run_leaves_a_checkpoint_it_resumes_from() {
    let work = tempfile::tempdir().unwrap();
    chat_rows(work.path());
    let path = recipe(
        work.path(),
        "[adapter]\nr = 4\n\n[data]\ntrain = \"train.jsonl\"\n\n[train]\nmax_steps = 2000\nmicro_batch_size = 2\nsave_every = 1\nkeep_checkpoints = 2\n",
    );
    let run = work.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(["train", path.to_str().unwrap(), "--device", "cpu"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while burnish_align::checkpoints(&run).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoints appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Kill it mid-run, most likely while it writes a checkpoint.
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();

    let latest = burnish_align::checkpoints(&run)
        .pop()
        .expect("a complete checkpoint survives");
    let (progress, _) = burnish_align::read_checkpoint(&latest).unwrap();
    assert!(progress.step >= 2);
    let out = train(
        &path,
        &[
            "--resume",
            "--set",
            &format!("train.max_steps={}", progress.step + 2),
        ],
    );
    assert_success(&out);
    let steps = metrics(&run)
        .iter()
        .filter(|l| l.get("step").is_some())
        .count();
    assert_eq!(steps, progress.step + 2);
    assert!(run.join("adapter_model.safetensors").exists());
}

#[test]
fn full_fine_tuning_writes_a_complete_model_directory() {
    let work = tempfile::tempdir().unwrap();
    chat_rows(work.path());
    let path = recipe(
        work.path(),
        "[data]\ntrain = \"train.jsonl\"\neval = \"train.jsonl\"\n\n[train]\nmax_steps = 10\nmicro_batch_size = 3\nlr = 3e-3\nschedule = \"constant\"\n",
    );
    let out = train(&path, &[]);
    assert_success(&out);
    let run = work.path().join("run");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
    ] {
        assert!(
            run.join(file).exists(),
            "{file} missing from a full fine-tune's run directory"
        );
    }
    assert!(!run.join("adapter_config.json").exists());
    let lines = metrics(&run);
    let first = lines[0]["loss"].as_f64().unwrap();
    let eval = first_eval_loss(&lines);
    assert!(eval < 0.5 * first, "eval loss {eval} vs first step {first}");
    // The written model is a checkpoint like any other.
    let out = burnish(&[
        "score",
        "--model",
        run.to_str().unwrap(),
        "--ids",
        "3,4,5",
        "--json",
    ]);
    assert_success(&out);
}

#[test]
fn every_shipped_recipe_validates_and_the_fixture_recipes_run() {
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&recipes).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            burnish_align::Recipe::from_file(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            names.push(path);
        }
    }
    assert!(!names.is_empty());
    let work = tempfile::tempdir().unwrap();
    for path in names.iter().filter(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fixture-")
    }) {
        let out_dir = work.path().join(path.file_stem().unwrap());
        let out = train(
            path,
            &[
                "--set",
                &format!("output.dir=\"{}\"", out_dir.display()),
                "--set",
                "train.max_steps=3",
            ],
        );
        assert_success(&out);
        assert!(
            out_dir.join("adapter_model.safetensors").exists(),
            "{}",
            path.display()
        );
    }
}

/// `data.chat_template` trains through a template of the recipe's choice instead of the
/// model's own: a multi-turn conversation that Qwen3's template cannot mask (it renders earlier
/// turns differently once later ones follow) trains through its training variant with
/// `{% generation %}` blocks, and the run directory keeps the template it was trained with.
#[test]
fn a_recipe_chooses_the_chat_template() {
    let model = copy_fixture("llama");
    let templates = model_dir("llama").join("../../data/templates");
    std::fs::copy(
        templates.join("qwen3.jinja"),
        model.path().join("chat_template.jinja"),
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = (0..4)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": WORDS[i]},
                {"role": "assistant", "content": WORDS[i + 1]},
                {"role": "user", "content": WORDS[i + 2]},
                {"role": "assistant", "content": WORDS[i + 3]},
            ]})
        })
        .collect();
    write_jsonl(&work.path().join("train.jsonl"), &rows);
    let path = work.path().join("recipe.toml");
    std::fs::write(
        &path,
        format!(
            "[model]\nbase = \"{}\"\n\n[adapter]\nr = 4\n\n[data]\ntrain = \"train.jsonl\"\n\n[train]\nmax_steps = 2\nmicro_batch_size = 2\n\n[output]\ndir = \"run\"\n",
            model.path().display()
        ),
    )
    .unwrap();
    let out = train(&path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("differently once later messages follow")
            && err.contains("data.chat_template"),
        "{err}"
    );
    let training = templates.join("qwen3_training.jinja");
    let set = format!("data.chat_template=\"{}\"", training.display());
    let out = train(&path, &["--set", &set]);
    assert_success(&out);
    let kept = std::fs::read_to_string(work.path().join("run/chat_template.jinja")).unwrap();
    assert_eq!(kept, std::fs::read_to_string(&training).unwrap());
    assert!(!work.path().join("run/checkpoints").exists());
    // The template goes with the adapter: merged into a model directory as it is, and into a
    // GGUF file without the generation tags llama.cpp does not read.
    let (base, run) = (model.path().to_str().unwrap(), work.path().join("run"));
    let merged = work.path().join("merged");
    let out = burnish(&[
        "merge",
        "--model",
        base,
        "--adapter",
        run.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_success(&out);
    assert_eq!(
        std::fs::read_to_string(merged.join("chat_template.jinja")).unwrap(),
        kept
    );
    let gguf = work.path().join("run.gguf");
    let out = burnish(&[
        "export",
        "--model",
        base,
        "--adapter",
        run.to_str().unwrap(),
        "--pre-tokenizer",
        "gpt-2",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    assert_success(&out);
    let bytes = std::fs::read(&gguf).unwrap();
    let holds = |text: &str| bytes.windows(text.len()).any(|w| w == text.as_bytes());
    assert!(holds("{%- if true %}") && !holds("generation %}"));

    // A built-in by name.
    let out = train(
        &path,
        &[
            "--set",
            "data.chat_template=\"chatml\"",
            "--set",
            "output.dir=\"builtin\"",
        ],
    );
    assert_success(&out);
    let kept = std::fs::read_to_string(work.path().join("builtin/chat_template.jinja")).unwrap();
    assert!(kept.contains("<|im_start|>") && kept.contains("generation"));
    // A file that is not there is named.
    let out = train(
        &path,
        &[
            "--set",
            "data.chat_template=\"missing.jinja\"",
            "--set",
            "output.dir=\"missing\"",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jinja"));
}
