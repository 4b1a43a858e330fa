//! QLoRA's 4-bit base against bitsandbytes, transformers and PEFT (`tests/fixtures/qlora`, made
//! by `scripts/golden/make_qlora.py`): the NF4 codes and block maxima of every projection of the
//! llama fixture, and the log-probs and adapter gradients of that model loaded in 4 bits with a
//! LoRA and a DoRA adapter.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_model::{BaseDtype, Pretrained, token_logprobs};
use burnish_peft::{f32_values, nf4_codes};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::adapters::{adapter_dir, read_tensors};
use crate::fixtures::{B, max_abs_diff, model_dir};

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

/// Every projection's codes and maxima are bitsandbytes', bit for bit; the LM head stays
/// unquantized, as transformers leaves it.
#[test]
fn nf4_codes_and_maxima_equal_bitsandbytes() {
    let bytes = std::fs::read(qlora_dir().join("codes.safetensors")).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    let model = Pretrained::<B>::load(&model_dir("llama"), &Default::default())
        .unwrap()
        .model;
    let mut quantized = model.clone();
    BaseDtype::Nf4.apply(&mut quantized);
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
        let theirs_maxima = burnish_peft::decode_f32(&theirs_maxima).unwrap();
        assert_eq!(maxima, theirs_maxima, "{name}: maxima");
        seen += 1;
    }
    assert_eq!(seen * 2, golden.len());
}

/// The llama fixture held in 4 bits with PEFT's llama-qv (LoRA) and llama-dora (DoRA)
/// adapters gives transformers + PEFT + bitsandbytes' log-probs, loss and adapter gradients.
#[test]
fn qlora_logprobs_and_gradients_equal_peft_on_bitsandbytes() {
    type AD = Autodiff<B>;
    let goldens: std::collections::BTreeMap<String, Golden> =
        serde_json::from_str(&std::fs::read_to_string(qlora_dir().join("golden.json")).unwrap())
            .unwrap();
    let expected = read_tensors(&qlora_dir().join("grads.safetensors"));
    let mut seen = 0;
    for (adapter, golden) in &goldens {
        let base = Pretrained::<B>::load(&model_dir("llama"), &Default::default()).unwrap();
        let (mut model, _) = base.model.with_adapter(&adapter_dir(adapter)).unwrap();
        BaseDtype::Nf4.apply(&mut model);
        for (i, case) in golden.score.iter().enumerate() {
            let ours = token_logprobs(&model, &case.token_ids).unwrap();
            let worst = max_abs_diff(&ours, &case.logprobs);
            assert!(
                worst <= 1e-4,
                "{adapter} case {i}: max |Δ logprob| = {worst:e}"
            );
        }

        let device = Default::default();
        let base = Pretrained::<AD>::load(&model_dir("llama"), &device).unwrap();
        let (mut model, _) = base.model.with_adapter(&adapter_dir(adapter)).unwrap();
        BaseDtype::Nf4.apply(&mut model);
        let ids: Vec<i64> = golden.score[0]
            .token_ids
            .iter()
            .map(|&id| i64::from(id))
            .collect();
        let n = ids.len();
        let input = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
        let targets = Tensor::<AD, 2, Int>::from_data(
            TensorData::new(ids[1..].to_vec(), [n - 1, 1]),
            &device,
        );
        let logits: Tensor<AD, 2> = model.forward(input).squeeze_dim(0).narrow(0, 0, n - 1);
        let logprobs = burn::tensor::activation::log_softmax(logits, 1);
        let loss = logprobs.gather(1, targets).mean().neg();
        let ours = loss.clone().into_scalar();
        assert!(
            (ours - golden.loss).abs() <= 1e-5,
            "{adapter}: loss {ours} vs {}",
            golden.loss
        );
        let grads = loss.backward();
        for (module, linear) in model.linears() {
            assert!(
                linear.weight.val().grad(&grads).is_none(),
                "{module}: the base trained"
            );
            let Some(lora) = &linear.lora else { continue };
            let mut tensors = vec![
                ("lora_A.weight", lora.lora_a.val().grad(&grads)),
                ("lora_B.weight", lora.lora_b.val().grad(&grads)),
            ];
            if let Some(magnitude) = &lora.magnitude {
                let grad = magnitude.val().grad(&grads).map(|g| g.unsqueeze::<2>());
                tensors.push(("lora_magnitude_vector", grad));
            }
            for (tensor, grad) in tensors {
                let key = format!("{adapter}/base_model.model.{module}.{tensor}");
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
    }
    assert_eq!(seen, expected.len());
}
