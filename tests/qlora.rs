//! QLoRA's 4-bit base against bitsandbytes, transformers and PEFT (`tests/fixtures/qlora`, made
//! by `scripts/golden/make_qlora.py`): the NF4 codes and block maxima of every projection of the
//! llama fixture, plain and double-quantized; a checkpoint saved in 4 bits with double
//! quantization (`llama-bnb-4bit`) read as bitsandbytes reads it; and the log-probs and adapter
//! gradients of those 4-bit models with a LoRA and a DoRA adapter.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burnish_model::{BaseDtype, Pretrained, TensorSource, Weights, token_logprobs};
use burnish_peft::{decode_f32, double_quantized, dynamic_map, f32_values, nf4_codes};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use serde::Deserialize;

use crate::adapters::{adapter_dir, assert_adapter_gradients, mean_nll, read_tensors};
use crate::cli::{burnish, score_logprobs};
use crate::fixtures::{B, assert_success, copy_fixture, max_abs_diff, model_dir};

/// The checkpoint transformers saved from the llama fixture loaded in 4 bits.
const STORED: &str = "llama-bnb-4bit";

fn qlora_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qlora")
}

#[derive(Deserialize)]
struct Golden {
    score: Vec<Case>,
    loss: f32,
}

#[derive(Deserialize)]
struct Case {
    token_ids: Vec<u32>,
    logprobs: Vec<f32>,
}

fn goldens() -> std::collections::BTreeMap<String, Golden> {
    serde_json::from_str(&std::fs::read_to_string(qlora_dir().join("golden.json")).unwrap())
        .unwrap()
}

/// Every projection's codes and maxima are bitsandbytes', bit for bit, and so is the dynamic map
/// of the maxima's double quantization; the double-quantized maxima are theirs to 1e-6 of their
/// size. The LM head stays unquantized, as transformers leaves it.
#[test]
fn nf4_codes_and_maxima_equal_bitsandbytes() {
    let stored_bytes = std::fs::read(model_dir(STORED).join("model.safetensors")).unwrap();
    let stored = SafeTensors::deserialize(&stored_bytes).unwrap();
    let map = stored
        .tensor("model.layers.0.self_attn.q_proj.weight.nested_quant_map")
        .unwrap();
    assert_eq!(dynamic_map(), decode_f32(&map).unwrap(), "the dynamic map");
    let double_quantized_maxima = read_tensors(&qlora_dir().join("stored_maxima.safetensors"));
    let bytes = std::fs::read(qlora_dir().join("codes.safetensors")).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    let device = Default::default();
    let model = Pretrained::<B>::load(&model_dir("llama"), &device)
        .unwrap()
        .model;
    let quantized = Pretrained::<B>::load_in(&model_dir("llama"), BaseDtype::Nf4Plain, &device)
        .unwrap()
        .model;
    let mut seen = 0;
    for ((name, linear), (_, held)) in model.linears().into_iter().zip(quantized.linears()) {
        if name == "lm_head" {
            assert!(!held.weight.is_quantized());
            continue;
        }
        assert!(held.weight.is_quantized(), "{name}");
        let (codes, maxima) = nf4_codes(&f32_values(linear.weight.val()));
        let theirs_codes = golden.tensor(&format!("{name}.codes")).unwrap();
        let count = theirs_codes.data().len();
        assert_eq!(&codes[..count], theirs_codes.data(), "{name}: codes");
        let theirs_maxima = golden.tensor(&format!("{name}.absmax")).unwrap();
        assert_eq!(
            maxima,
            decode_f32(&theirs_maxima).unwrap(),
            "{name}: maxima"
        );
        let dequantized = f32_values(held.weight.val());
        let expected: Vec<f32> = (0..count)
            .map(|i| burnish_peft::NF4_LEVELS[usize::from(codes[i])] * maxima[i / 64])
            .collect();
        assert_eq!(dequantized, expected, "{name}: held weight");
        // The maxima's mean, which they are coded relative to, is rounded once here and summed
        // in f32 lanes by torch: the two may differ in the last place, and so may every maximum.
        let ours = double_quantized(&maxima);
        let theirs = &double_quantized_maxima[&name].1;
        for (a, b) in ours.iter().zip(theirs) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{name}: double-quantized maximum {a} vs {b}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen * 2, golden.len());
}

/// A checkpoint saved in 4 bits with double quantization reads as bitsandbytes reads it: the
/// same codes as the projections quantized here, and the maxima bitsandbytes reads back from
/// their 8-bit codes, bit for bit; held under `nf4` as stored, its LM head left as it is.
#[test]
fn stored_4bit_checkpoints_read_as_bitsandbytes_reads_them() {
    let bytes = std::fs::read(qlora_dir().join("codes.safetensors")).unwrap();
    let codes = SafeTensors::deserialize(&bytes).unwrap();
    let maxima = read_tensors(&qlora_dir().join("stored_maxima.safetensors"));
    let weights = Weights::open(&model_dir(STORED)).unwrap();
    assert!(weights.stores_nf4());
    let device = Default::default();
    let plain = Pretrained::<B>::load(&model_dir("llama"), &device).unwrap();
    let held = Pretrained::<B>::load_in(&model_dir(STORED), BaseDtype::Nf4, &device).unwrap();
    let mut seen = 0;
    for ((name, linear), (_, held)) in plain.model.linears().into_iter().zip(held.model.linears()) {
        let dims = linear.weight.dims();
        let stored = weights.read_nf4(&format!("{name}.weight"), &dims).unwrap();
        if name == "lm_head" {
            assert!(stored.is_none() && !held.weight.is_quantized());
            assert_eq!(
                f32_values(held.weight.val()),
                f32_values(linear.weight.val())
            );
            continue;
        }
        let stored = stored.unwrap_or_else(|| panic!("{name} is stored in 4 bits"));
        let theirs_codes = codes.tensor(&format!("{name}.codes")).unwrap();
        assert_eq!(stored.codes, theirs_codes.data(), "{name}: codes");
        assert_eq!(stored.maxima, maxima[&name].1, "{name}: maxima");
        assert!(held.weight.is_quantized(), "{name}");
        assert_eq!(
            f32_values(held.weight.val()),
            stored.dequantize(),
            "{name}: held weight"
        );
        seen += 1;
    }
    assert_eq!(seen, maxima.len());
}

/// PEFT's llama-qv (LoRA) and llama-dora (DoRA) adapters over the llama fixture held in 4 bits
/// with plain maxima, and llama-qv over the checkpoint saved in 4 bits with double
/// quantization, held as stored or quantized here from the llama fixture, give transformers +
/// PEFT + bitsandbytes' log-probs, loss and adapter gradients.
#[test]
fn qlora_logprobs_and_gradients_equal_peft_on_bitsandbytes() {
    type AD = Autodiff<B>;
    let expected = read_tensors(&qlora_dir().join("grads.safetensors"));
    let mut seen = 0;
    for (name, golden) in &goldens() {
        let (adapter, bases) = match name.split_once('@') {
            Some((adapter, stored)) => (
                adapter,
                vec![(stored, BaseDtype::Nf4), ("llama", BaseDtype::Nf4)],
            ),
            None => (name.as_str(), vec![("llama", BaseDtype::Nf4Plain)]),
        };
        for (base, dtype) in bases {
            let label = format!("{name} over {base} as {dtype}");
            let base = model_dir(base);
            let loaded = Pretrained::<B>::load_in(&base, dtype, &Default::default()).unwrap();
            let (model, _) = loaded.model.with_adapter(&adapter_dir(adapter)).unwrap();
            for (i, case) in golden.score.iter().enumerate() {
                let ours = token_logprobs(&model, &case.token_ids).unwrap();
                let worst = max_abs_diff(&ours, &case.logprobs);
                assert!(
                    worst <= 1e-4,
                    "{label} case {i}: max |Δ logprob| = {worst:e}"
                );
            }

            let loaded = Pretrained::<AD>::load_in(&base, dtype, &Default::default()).unwrap();
            let (model, _) = loaded.model.with_adapter(&adapter_dir(adapter)).unwrap();
            let loss = mean_nll(&model, &golden.score[0].token_ids);
            let ours = loss.clone().into_scalar();
            assert!(
                (ours - golden.loss).abs() <= 1e-5,
                "{label}: loss {ours} vs {}",
                golden.loss
            );
            let grads = loss.backward();
            let checked = assert_adapter_gradients(&model, &grads, &expected, &format!("{name}/"));
            if dtype == BaseDtype::Nf4Plain || base == model_dir(STORED) {
                seen += checked;
            }
        }
    }
    assert_eq!(seen, expected.len());
}

/// `score` and `generate` hold a 4-bit checkpoint's codes by default and read them back to f32
/// on request, to the same log-probs and the same greedy tokens; `merge` folds an adapter into the weights read back and writes an
/// unquantized model; training every weight of it is refused with what to do instead.
#[test]
fn stored_4bit_checkpoints_score_merge_and_refuse_full_training() {
    let golden = &goldens()["llama-qv@llama-bnb-4bit"].score[0];
    let adapter = adapter_dir("llama-qv");
    let with_adapter = ["--adapter", adapter.to_str().unwrap()];
    let held = score_logprobs(&model_dir(STORED), &golden.token_ids, &with_adapter);
    assert!(max_abs_diff(&held, &golden.logprobs) <= 1e-4);
    let mut read_back = with_adapter.to_vec();
    read_back.extend(["--dtype", "f32"]);
    let read_back = score_logprobs(&model_dir(STORED), &golden.token_ids, &read_back);
    assert!(max_abs_diff(&read_back, &held) <= 1e-5);
    let generate = |dtype: &str| {
        let model = model_dir(STORED);
        let args = [
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "one two",
        ];
        let out = burnish(&[&args[..], &["--max-new-tokens", "8", "--dtype", dtype]].concat());
        assert_success(&out);
        out.stdout
    };
    assert_eq!(generate("auto"), generate("f32"));

    let work = tempfile::tempdir().unwrap();
    let folded = work.path().join("folded");
    let out = burnish(&[
        "merge",
        "--model",
        model_dir(STORED).to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        folded.to_str().unwrap(),
    ]);
    assert_success(&out);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folded.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none(), "{config}");
    let merged = score_logprobs(&folded, &golden.token_ids, &[]);
    assert!(max_abs_diff(&merged, &golden.logprobs) <= 1e-4);

    std::fs::write(work.path().join("rows.jsonl"), "{\"text\": \"one two\"}\n").unwrap();
    let recipe = work.path().join("full.toml");
    let text = format!(
        "[model]\nbase = \"{}\"\n\n[data]\ntrain = \"rows.jsonl\"\n\n[train]\nmax_steps = \
         1\n\n[output]\ndir = \"run\"\n",
        model_dir(STORED).display()
    );
    std::fs::write(&recipe, text).unwrap();
    let out = burnish(&["train", recipe.to_str().unwrap(), "--device", "cpu"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("4-bit checkpoint") && stderr.contains("[adapter]"),
        "{stderr}"
    );
    assert!(!work.path().join("run").exists());
}

/// A damaged 4-bit weight is refused with the file, the tensor and what is wrong.
#[test]
fn damaged_4bit_weights_name_the_file_and_tensor() {
    let dir = copy_fixture(STORED);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let damaged = "model.layers.1.mlp.up_proj.weight.quant_map";
    let zeros = vec![0u8; 16 * 4];
    let tensors: Vec<(String, TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| match name == damaged {
            true => {
                let view = TensorView::new(view.dtype(), view.shape().to_vec(), &zeros).unwrap();
                (name, view)
            }
            false => (name, view),
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let error = Pretrained::<B>::load_in(dir.path(), BaseDtype::Nf4, &Default::default())
        .unwrap_err()
        .to_string();
    for part in [
        "model.safetensors",
        "model.layers.1.mlp.up_proj.weight",
        "quant_map",
    ] {
        assert!(error.contains(part), "{error}");
    }
}
