//! LoRA and DoRA against PEFT 0.21 (fixtures from `scripts/golden/make_adapters.py`): PEFT-saved
//! adapters reproduce PEFT's log-probs (1e-4) and merged weights (1e-6), DoRA its gradients
//! (1e-4 of the largest), trainable-parameter counts equal PEFT's, fresh adapters leave the
//! model unchanged, only adapter tensors get gradients, the on/off switch restores the base, our
//! writer reproduces PEFT's files, and bad configs fail. A reward model's adapter (SEQ_CLS, its
//! `score` head saved whole) reproduces PEFT's rewards (1e-5), merges into transformers' own
//! sequence-classifier checkpoint (1e-6), and is written back as PEFT wrote it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_model::{Decoder, Pretrained, token_logprobs};
use burnish_peft::{
    LoraConfig, Targets, decode_f32, load_adapter, save_adapter, trainable_parameters,
};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::fixtures::{B, golden, max_abs_diff, model_dir};

const ADAPTERS: &[&str] = &["llama-qv", "qwen2-all", "mistral-layer1", "llama-dora"];

pub(crate) fn adapter_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters")
        .join(name)
}

#[derive(Deserialize)]
struct AdapterGolden {
    base_model: String,
    trainable_parameters: usize,
    adapted_modules: Vec<String>,
    score: Vec<ScoreCase>,
}

#[derive(Deserialize)]
struct ScoreCase {
    token_ids: Vec<u32>,
    logprobs: Vec<f32>,
}

fn adapter_golden(name: &str) -> AdapterGolden {
    let text = std::fs::read_to_string(adapter_dir(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub(crate) fn read_tensors(path: &std::path::Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), decode_f32(&view).unwrap())))
        .collect()
}

fn with_adapter(name: &str) -> Pretrained<B> {
    let golden = adapter_golden(name);
    let mut model =
        Pretrained::<B>::load(&model_dir(&golden.base_model), &Default::default()).unwrap();
    load_adapter(&adapter_dir(name), &mut model.model.linears_mut()).unwrap();
    model
}

#[test]
fn peft_adapters_reproduce_peft_logprobs_and_parameter_counts() {
    for name in ADAPTERS {
        let golden = adapter_golden(name);
        let model = with_adapter(name);
        let linears = model.model.linears();
        let adapted: Vec<&String> = linears
            .iter()
            .filter(|(_, l)| l.lora.is_some())
            .map(|(n, _)| n)
            .collect();
        let mut expected = golden.adapted_modules.iter().collect::<Vec<_>>();
        expected.sort();
        let mut adapted_sorted = adapted.clone();
        adapted_sorted.sort();
        assert_eq!(adapted_sorted, expected, "{name}");
        assert_eq!(
            trainable_parameters(&linears),
            golden.trainable_parameters,
            "{name}"
        );
        for (i, case) in golden.score.iter().enumerate() {
            let ours = token_logprobs(&model.model, &case.token_ids).unwrap();
            let worst = max_abs_diff(&ours, &case.logprobs);
            assert!(
                worst <= 1e-4,
                "{name} case {i}: max |Δ logprob| = {worst:e}"
            );
        }
    }
}

#[test]
fn merged_weights_match_peft_merge_and_unload() {
    for name in ADAPTERS {
        let mut model = with_adapter(name);
        let case = &adapter_golden(name).score[0];
        let before = token_logprobs(&model.model, &case.token_ids).unwrap();
        model.model.merge_and_unload().unwrap();
        assert!(model.model.linears().iter().all(|(_, l)| l.lora.is_none()));
        let expected = read_tensors(&adapter_dir(name).join("merged.safetensors"));
        let ours: BTreeMap<_, _> = burnish_model::named_weights(&model.model)
            .into_iter()
            .map(|(n, s, v)| (n, (s, v)))
            .collect();
        for (key, (shape, values)) in &expected {
            let (our_shape, our_values) = &ours[key];
            assert_eq!(our_shape, shape, "{name} {key}");
            let worst = max_abs_diff(our_values, values);
            assert!(worst <= 1e-6, "{name} {key}: max |Δ| = {worst:e}");
        }
        // The merged model scores like base + adapter.
        let after = token_logprobs(&model.model, &case.token_ids).unwrap();
        let worst = max_abs_diff(&before, &after);
        assert!(worst <= 1e-4, "{name}: merged vs unmerged {worst:e}");
    }
}

#[test]
fn switching_adapters_off_gives_the_base_model_back() {
    let golden = adapter_golden("qwen2-all");
    let base = Pretrained::<B>::load(&model_dir("qwen2"), &Default::default()).unwrap();
    let ids = &golden.score[0].token_ids;
    let base_scores = token_logprobs(&base.model, ids).unwrap();
    let mut model = with_adapter("qwen2-all");
    assert_ne!(token_logprobs(&model.model, ids).unwrap(), base_scores);
    model.model.set_adapters_enabled(false);
    assert_eq!(token_logprobs(&model.model, ids).unwrap(), base_scores);
}

#[test]
fn fresh_adapters_change_nothing_and_match_peft_counts() {
    // Same configs as the PEFT fixtures; PEFT's counts come from get_nb_trainable_parameters.
    for (name, targets, base) in [
        (
            "llama-qv",
            Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            "llama",
        ),
        ("qwen2-all", Targets::AllLinear, "qwen2"),
        (
            "llama-dora",
            Targets::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
            "llama",
        ),
    ] {
        let golden = adapter_golden(name);
        let peft_config =
            LoraConfig::from_file(&adapter_dir(name).join("adapter_config.json")).unwrap();
        let config = LoraConfig {
            targets,
            ..peft_config
        };
        let model = Pretrained::<B>::load(&model_dir(base), &Default::default())
            .unwrap()
            .model;
        let ids = &golden.score[1].token_ids;
        let before = token_logprobs(&model, ids).unwrap();
        let (model, _) = model.with_lora(&config, 42).unwrap();
        assert_eq!(
            trainable_parameters(&model.linears()),
            golden.trainable_parameters,
            "{name}"
        );
        assert_eq!(
            token_logprobs(&model, ids).unwrap(),
            before,
            "{name}: step 0 must equal the base"
        );
    }
}

#[test]
fn only_adapter_tensors_receive_gradients() {
    type AD = Autodiff<B>;
    let device = Default::default();
    let model = Pretrained::<AD>::load(&model_dir("llama"), &device)
        .unwrap()
        .model;
    let config = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        targets: Targets::List(vec!["q_proj".into(), "down_proj".into()]),
        ..Default::default()
    };
    let (mut model, _) = model.with_lora(&config, 0).unwrap();
    // Make B non-zero so A's gradient is non-zero too.
    for (_, linear) in model.linears_mut() {
        if let Some(lora) = &mut linear.lora {
            let b = lora.lora_b.val().inner().ones_like().mul_scalar(0.01);
            lora.lora_b = burn::module::Param::from_tensor(Tensor::from_inner(b).require_grad());
        }
    }
    let ids =
        Tensor::<AD, 2, Int>::from_data(TensorData::new(vec![3i64, 17, 40, 9, 2], [1, 5]), &device);
    let grads = model.forward(ids).sum().backward();
    assert!(
        model.embed_tokens.val().grad(&grads).is_none(),
        "embeddings must be frozen"
    );
    assert!(
        model.norm.weight.val().grad(&grads).is_none(),
        "norms must be frozen"
    );
    let mut adapted = 0;
    for (name, linear) in model.linears() {
        assert!(
            linear.weight.val().grad(&grads).is_none(),
            "{name}: frozen base weight got a gradient"
        );
        if let Some(lora) = &linear.lora {
            adapted += 1;
            for (m, t) in [("A", lora.lora_a.val()), ("B", lora.lora_b.val())] {
                let g = t
                    .grad(&grads)
                    .unwrap_or_else(|| panic!("{name}.{m} got no gradient"));
                assert!(
                    g.abs().sum().into_scalar() > 0.0,
                    "{name}.{m} gradient is zero"
                );
            }
        }
    }
    assert_eq!(adapted, 4, "q_proj and down_proj of both layers");
}

/// DoRA's gradients (A, B and the magnitudes; the row norms held constant) equal PEFT's for
/// the first score case's mean negative log-prob.
/// The mean negative log-prob of `ids` (each token after the first) under `model`.
pub(crate) fn mean_nll(model: &Decoder<Autodiff<B>>, ids: &[u32]) -> Tensor<Autodiff<B>, 1> {
    let device = Default::default();
    let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    let n = ids.len();
    let input =
        Tensor::<Autodiff<B>, 2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
    let targets = Tensor::<Autodiff<B>, 2, Int>::from_data(
        TensorData::new(ids[1..].to_vec(), [n - 1, 1]),
        &device,
    );
    let logits: Tensor<Autodiff<B>, 2> = model.forward(input).squeeze_dim(0).narrow(0, 0, n - 1);
    let logprobs = burn::tensor::activation::log_softmax(logits, 1);
    logprobs.gather(1, targets).mean().neg()
}

/// Checks every adapter tensor's gradient in `grads` (LoRA's A and B, DoRA's magnitudes)
/// against `expected`, keyed `{prefix}base_model.model.<module>.<tensor>` as PEFT names them, to
/// 1e-4 of each tensor's largest value; asserts the frozen base weights got none. Returns how
/// many tensors it checked.
pub(crate) fn assert_adapter_gradients(
    model: &Decoder<Autodiff<B>>,
    grads: &<Autodiff<B> as burn::tensor::backend::AutodiffBackend>::Gradients,
    expected: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    prefix: &str,
) -> usize {
    let mut seen = 0;
    for (module, linear) in model.linears() {
        assert!(
            linear.weight.val().grad(grads).is_none(),
            "{module}: the frozen base got a gradient"
        );
        let Some(lora) = &linear.lora else { continue };
        let mut tensors = vec![
            ("lora_A.weight", lora.lora_a.val().grad(grads)),
            ("lora_B.weight", lora.lora_b.val().grad(grads)),
        ];
        if let Some(magnitude) = &lora.magnitude {
            let grad = magnitude.val().grad(grads).map(|g| g.unsqueeze::<2>());
            tensors.push(("lora_magnitude_vector", grad));
        }
        for (tensor, grad) in tensors {
            let key = format!("{prefix}base_model.model.{module}.{tensor}");
            let ours = grad.unwrap_or_else(|| panic!("{key}: no gradient"));
            let ours = ours.into_data().to_vec::<f32>().unwrap();
            let (_, theirs) = &expected[&key];
            let scale = theirs.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let worst = max_abs_diff(&ours, theirs);
            assert!(
                worst <= 1e-4 * scale,
                "{key}: max |Δ| = {worst:e} (largest {scale:e})"
            );
            seen += 1;
        }
    }
    seen
}

#[test]
fn dora_gradients_match_peft() {
    type AD = Autodiff<B>;
    let name = "llama-dora";
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir(name).join("golden.json")).unwrap(),
    )
    .unwrap();
    let device = Default::default();
    let base = Pretrained::<AD>::load(&model_dir("llama"), &device)
        .unwrap()
        .model;
    let (model, config) = base.with_adapter(&adapter_dir(name)).unwrap();
    assert!(config.use_dora);
    let loss = mean_nll(&model, &adapter_golden(name).score[0].token_ids);
    let ours = loss.clone().into_scalar();
    let theirs = golden["loss"].as_f64().unwrap() as f32;
    assert!(
        (ours - theirs).abs() <= 1e-5,
        "loss {ours} vs PEFT {theirs}"
    );
    let grads = loss.backward();
    let expected = read_tensors(&adapter_dir(name).join("grads.safetensors"));
    let seen = assert_adapter_gradients(&model, &grads, &expected, "");
    assert_eq!(seen, expected.len());
}

#[test]
fn our_writer_reproduces_peft_files() {
    for name in ADAPTERS {
        let model = with_adapter(name);
        let config = LoraConfig::from_file(&adapter_dir(name).join("adapter_config.json")).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_adapter(out.path(), &config, &model.model.linears(), &[]).unwrap();
        // For scripts/golden/check_adapter_in_peft.py, which loads these into PEFT.
        if let Some(export) = std::env::var_os("BURNISH_EXPORT_ADAPTERS") {
            save_adapter(
                &PathBuf::from(export).join(name),
                &config,
                &model.model.linears(),
                &[],
            )
            .unwrap();
        }
        let theirs = read_tensors(&adapter_dir(name).join("adapter_model.safetensors"));
        let ours = read_tensors(&out.path().join("adapter_model.safetensors"));
        assert_eq!(theirs, ours, "{name}: tensors differ");
        // Our config reads back to the same settings, and loads into the model identically.
        let reread = LoraConfig::from_file(&out.path().join("adapter_config.json")).unwrap();
        assert_eq!(
            (reread.r, reread.lora_alpha, reread.use_rslora),
            (config.r, config.lora_alpha, config.use_rslora)
        );
        assert_eq!(
            (&reread.rank_pattern, &reread.alpha_pattern),
            (&config.rank_pattern, &config.alpha_pattern)
        );
        let golden = adapter_golden(name);
        let mut again =
            Pretrained::<B>::load(&model_dir(&golden.base_model), &Default::default()).unwrap();
        load_adapter(out.path(), &mut again.model.linears_mut()).unwrap();
        let ids = &golden.score[0].token_ids;
        assert_eq!(
            token_logprobs(&again.model, ids).unwrap(),
            token_logprobs(&model.model, ids).unwrap()
        );
    }
}

#[derive(Deserialize)]
struct RewardAdapterGolden {
    trainable_parameters: usize,
    rewards: Vec<RewardCase>,
}

#[derive(Deserialize)]
struct RewardCase {
    token_ids: Vec<u32>,
    reward: f32,
}

/// Each case's reward under a classifier `model`, read where transformers reads it.
fn rewards_of(model: &burnish_model::Decoder<B>, cases: &[RewardCase]) -> Vec<f32> {
    cases
        .iter()
        .map(|c| {
            let n = c.token_ids.len();
            let ids: Vec<i64> = c.token_ids.iter().map(|&t| i64::from(t)).collect();
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
            let at = burnish_model::scored_position(&c.token_ids, model.config.pad_token_id);
            let scores = model.scores(model.hidden_states(ids), &[at]);
            scores.into_data().to_vec::<f32>().unwrap()[0]
        })
        .collect()
}

#[test]
fn reward_adapters_reproduce_peft_and_merge_into_a_transformers_classifier() {
    let name = "llama-reward";
    let golden: RewardAdapterGolden = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir(name).join("golden.json")).unwrap(),
    )
    .unwrap();
    let base = Pretrained::<B>::load(&model_dir("llama"), &Default::default()).unwrap();
    let (model, config) = base.model.with_adapter(&adapter_dir(name)).unwrap();
    assert!(model.is_classifier() && model.lm_head.is_none());
    let theirs: Vec<f32> = golden.rewards.iter().map(|c| c.reward).collect();
    let close = |ours: &[f32], tolerance: f32| {
        ours.iter()
            .zip(&theirs)
            .all(|(a, b)| (a - b).abs() <= tolerance)
    };
    let ours = rewards_of(&model, &golden.rewards);
    assert!(close(&ours, 1e-5), "{ours:?} vs PEFT {theirs:?}");
    // Rows of different lengths padded into one batch score as each alone.
    let rows: Vec<Vec<u32>> = golden.rewards.iter().map(|c| c.token_ids.clone()).collect();
    let batched = burnish_model::batch_rewards(&model, &rows).unwrap();
    assert!(close(&batched, 1e-5), "{batched:?} vs PEFT {theirs:?}");
    let head = model.score.as_ref().unwrap().val().dims()[1];
    assert_eq!(
        trainable_parameters(&model.linears()) + head,
        golden.trainable_parameters
    );

    // Written back: PEFT's tensors, the head among them, and a SEQ_CLS config.
    let out = tempfile::tempdir().unwrap();
    save_adapter(
        out.path(),
        &config,
        &model.linears(),
        &model.whole_modules(),
    )
    .unwrap();
    // For scripts/golden/check_adapter_in_peft.py, which loads it into PEFT.
    if let Some(export) = std::env::var_os("BURNISH_EXPORT_ADAPTERS") {
        let dir = PathBuf::from(export).join(name);
        save_adapter(&dir, &config, &model.linears(), &model.whole_modules()).unwrap();
    }
    assert_eq!(
        read_tensors(&adapter_dir(name).join("adapter_model.safetensors")),
        read_tensors(&out.path().join("adapter_model.safetensors"))
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(written["task_type"], "SEQ_CLS");
    assert_eq!(
        written["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );

    // Merged, it is transformers' own merged classifier, which burnish also loads as one.
    let mut merged = model.clone();
    merged.merge_and_unload().unwrap();
    let reference = model_dir("llama-reward");
    let theirs_weights = read_tensors(&reference.join("model.safetensors"));
    let ours_weights: BTreeMap<String, (Vec<usize>, Vec<f32>)> =
        burnish_model::named_weights(&merged)
            .into_iter()
            .map(|(name, shape, values)| (name, (shape, values)))
            .collect();
    assert_eq!(
        theirs_weights.keys().collect::<Vec<_>>(),
        ours_weights.keys().collect::<Vec<_>>()
    );
    for (key, (shape, values)) in &theirs_weights {
        assert_eq!(&ours_weights[key].0, shape, "{key}");
        assert!(max_abs_diff(&ours_weights[key].1, values) <= 1e-6, "{key}");
    }
    let loaded = Pretrained::<B>::load(&reference, &Default::default()).unwrap();
    assert!(loaded.model.is_classifier());
    let ours = rewards_of(&loaded.model, &golden.rewards);
    assert!(close(&ours, 1e-5), "{ours:?} vs transformers {theirs:?}");

    // Saved by burnish, it is a classifier's checkpoint again.
    let saved = tempfile::tempdir().unwrap();
    burnish_model::save_decoder(
        &merged,
        &loaded.config,
        saved.path(),
        burnish_peft::SaveDtype::F32,
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(saved.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(config["id2label"], serde_json::json!({"0": "LABEL_0"}));
    let again = Pretrained::<B>::load(saved.path(), &Default::default()).unwrap();
    assert_eq!(
        rewards_of(&again.model, &golden.rewards),
        rewards_of(&merged, &golden.rewards)
    );
}

#[test]
fn bad_adapters_are_clear_errors() {
    let copy = || {
        let out = tempfile::tempdir().unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter_dir("llama-qv").join(f), out.path().join(f)).unwrap();
        }
        out
    };
    let edit = |dir: &std::path::Path, key: &str, value: serde_json::Value| {
        let path = dir.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&path, v.to_string()).unwrap();
    };
    let load = |dir: &std::path::Path| {
        let mut model = Pretrained::<B>::load(&model_dir("llama"), &Default::default()).unwrap();
        load_adapter(dir, &mut model.model.linears_mut())
            .unwrap_err()
            .to_string()
    };

    let dir = copy();
    // A DoRA config over plain LoRA weights: the magnitudes are missing.
    edit(dir.path(), "use_dora", true.into());
    let msg = load(dir.path());
    assert!(msg.contains("q_proj.lora_magnitude_vector"), "{msg}");

    let dir = copy();
    edit(dir.path(), "fan_in_fan_out", true.into());
    assert!(load(dir.path()).contains("fan_in_fan_out"));

    let dir = copy();
    edit(dir.path(), "r", 8.into());
    let msg = load(dir.path());
    assert!(
        msg.contains("lora_A.weight") && msg.contains("[8, 64]"),
        "{msg}"
    );

    let dir = copy();
    edit(dir.path(), "target_modules", serde_json::json!(["c_attn"]));
    let msg = load(dir.path());
    assert!(msg.contains("c_attn") && msg.contains("q_proj"), "{msg}");

    let dir = copy();
    edit(dir.path(), "target_modules", serde_json::json!(["q_proj"]));
    let msg = load(dir.path());
    assert!(
        msg.contains("v_proj.lora_A.weight") && msg.contains("does not belong"),
        "{msg}"
    );

    let dir = copy();
    std::fs::write(dir.path().join("adapter_model.safetensors"), b"garbage").unwrap();
    assert!(load(dir.path()).contains("adapter_model.safetensors"));
}

#[test]
fn module_names_are_known_from_the_config_alone() {
    for name in crate::fixtures::MODELS {
        let model = Pretrained::<B>::load(&model_dir(name), &Default::default()).unwrap();
        let from_model: Vec<String> = model.model.linears().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            burnish_model::linear_module_names(&model.config.decoder),
            from_model,
            "{name}"
        );
    }
}

#[test]
fn golden_fixture_sanity() {
    // The adapter fixtures are built on the model fixtures' own score cases.
    assert_eq!(
        adapter_golden("llama-qv").score[0].token_ids,
        golden("llama").score[0].token_ids
    );
}
