//! Saving in Hugging Face layout: save → load round-trips bit-exactly, keeps transformers'
//! key names, and a checkpoint saved in its own dtype reproduces the original tensor bytes.

use std::collections::BTreeSet;

use burnish_model::{
    Pretrained, TensorSource, Weights, named_weights, save_decoder, token_logprobs,
};
use burnish_peft::SaveDtype;
use safetensors::SafeTensors;

use crate::fixtures::{B, MODELS, golden, model_dir};

/// Tensor name -> (dtype, shape, bytes) of every safetensors file in `dir`.
fn tensors_on_disk(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(
                    name,
                    (
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data().to_vec(),
                    ),
                );
            }
        }
    }
    out
}

#[test]
fn save_then_load_is_bit_exact_and_keeps_hf_keys() {
    for name in MODELS {
        let dir = model_dir(name);
        let original = Pretrained::<B>::load(&dir, &Default::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_decoder(
            &original.model,
            &original.config,
            out.path(),
            SaveDtype::F32,
        )
        .unwrap();

        let reloaded = Pretrained::<B>::load(out.path(), &Default::default()).unwrap();
        let before = named_weights(&original.model);
        let after = named_weights(&reloaded.model);
        assert_eq!(before.len(), after.len(), "{name}");
        for ((n1, s1, v1), (n2, s2, v2)) in before.iter().zip(&after) {
            assert_eq!((n1, s1), (n2, s2), "{name}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(v1), bits(v2), "{name}: {n1} changed in the round trip");
        }

        let keys_in = tensors_on_disk(&dir).into_keys().collect::<BTreeSet<_>>();
        let keys_out = tensors_on_disk(out.path())
            .into_keys()
            .collect::<BTreeSet<_>>();
        assert_eq!(
            keys_in, keys_out,
            "{name}: saved keys differ from transformers'"
        );

        // The saved config is the original one, with only the dtype rewritten.
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], "float32", "{name}");
        assert_eq!(
            config["model_type"], original.config.raw["model_type"],
            "{name}"
        );
        assert_eq!(reloaded.config.decoder, original.config.decoder, "{name}");

        let case = &golden(name).score[0];
        assert_eq!(
            token_logprobs(&original.model, &case.token_ids).unwrap(),
            token_logprobs(&reloaded.model, &case.token_ids).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn saving_in_the_checkpoint_dtype_reproduces_its_bytes() {
    for (name, dtype) in [
        ("qwen2", SaveDtype::BF16),
        ("qwen3", SaveDtype::BF16),
        ("mistral", SaveDtype::F16),
        ("llama", SaveDtype::F32),
    ] {
        let dir = model_dir(name);
        let model = Pretrained::<B>::load(&dir, &Default::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_decoder(&model.model, &model.config, out.path(), dtype).unwrap();
        assert_eq!(tensors_on_disk(&dir), tensors_on_disk(out.path()), "{name}");
        // The written file is a complete checkpoint on its own.
        assert!(
            Weights::open(out.path())
                .unwrap()
                .contains("model.norm.weight")
        );
    }
}

#[test]
fn non_finite_weights_are_never_written() {
    let dir = model_dir("llama");
    let mut model = Pretrained::<B>::load(&dir, &Default::default()).unwrap();
    let norm = model.model.norm.weight.val();
    let poisoned = norm.clone().div_scalar(0.0).mul(norm.zeros_like());
    model.model.norm.weight = burn::module::Param::from_tensor(poisoned);
    let out = tempfile::tempdir().unwrap();
    let err = save_decoder(&model.model, &model.config, out.path(), SaveDtype::F32).unwrap_err();
    assert!(err.to_string().contains("model.norm.weight"), "{err}");
    assert!(
        !out.path().join("model.safetensors").exists(),
        "nothing may be left behind"
    );
}
