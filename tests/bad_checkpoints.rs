//! Broken checkpoints give errors that name the file and the tensor or key, never a panic and
//! never a silently wrong model.

use std::path::Path;

use burnish_model::Pretrained;

use crate::fixtures::{B, copy_fixture, edit_config};

fn load_error(dir: &Path) -> String {
    Pretrained::<B>::load(dir, &Default::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_config_names_the_file() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_weights_say_what_was_expected() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.safetensors.index.json"),
        "{msg}"
    );
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = copy_fixture("llama");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = copy_fixture("mistral");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("model-00002-of-00003.safetensors"), "{msg}");
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |c| c["intermediate_size"] = 128.into());
    let msg = load_error(dir.path());
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[128, 64]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_names_it() {
    // An untied model whose lm_head is absent: the tied fixture's file, config said untied.
    let dir = copy_fixture("qwen2");
    edit_config(dir.path(), |c| c["tie_word_embeddings"] = false.into());
    let msg = load_error(dir.path());
    assert!(
        msg.contains("lm_head.weight") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn unsupported_model_type_and_rope_are_named() {
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |c| c["model_type"] = "gemma".into());
    let msg = load_error(dir.path());
    assert!(msg.contains("model_type") && msg.contains("gemma"), "{msg}");

    let dir = copy_fixture("llama");
    edit_config(dir.path(), |c| {
        c["rope_parameters"]["rope_type"] = "yarn".into()
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("rope_parameters") && msg.contains("yarn"),
        "{msg}"
    );
}

#[test]
fn malformed_config_names_the_file() {
    let dir = copy_fixture("llama");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn a_random_start_refuses_an_initializer_range_that_is_no_deviation() {
    for bad in [
        serde_json::json!(0.0),
        serde_json::json!(-0.02),
        serde_json::json!(1e40),
    ] {
        let dir = copy_fixture("llama");
        edit_config(dir.path(), |c| c["initializer_range"] = bad.clone());
        let msg = Pretrained::<B>::random(dir.path(), 0, &Default::default())
            .err()
            .unwrap_or_else(|| panic!("initializer_range {bad} was accepted"))
            .to_string();
        assert!(
            msg.contains("config.json") && msg.contains("initializer_range"),
            "{msg}"
        );
    }
}
