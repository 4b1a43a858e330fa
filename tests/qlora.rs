//! QLoRA's 4-bit base against bitsandbytes, transformers and PEFT (`tests/fixtures/qlora`, made
//! by `scripts/golden/make_qlora.py`): the NF4 codes and block maxima of every projection of the
//! llama fixture, and the log-probs and adapter gradients of that model loaded in 4 bits with a
//! LoRA and a DoRA adapter.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burnish_model::{BaseDtype, Pretrained, token_logprobs};
use burnish_peft::{f32_values, nf4_codes};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::adapters::{adapter_dir, assert_adapter_gradients, mean_nll, read_tensors};
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
        let loss = mean_nll(&model, &golden.score[0].token_ids);
        let ours = loss.clone().into_scalar();
        assert!(
            (ours - golden.loss).abs() <= 1e-5,
            "{adapter}: loss {ours} vs {}",
            golden.loss
        );
        let grads = loss.backward();
        seen += assert_adapter_gradients(&model, &grads, &expected, &format!("{adapter}/"));
    }
    assert_eq!(seen, expected.len());
}
