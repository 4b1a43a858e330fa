//! `burnish export` against llama.cpp's own converter: for each fixture model and element type,
//! the GGUF file's metadata and tensors (types, dimensions, the data's SHA-256) equal what
//! `convert_hf_to_gguf.py` wrote (`tests/fixtures/gguf/`, by `scripts/golden/make_gguf.py`, which
//! also ran llama.cpp on burnish's exports against transformers' log-probabilities).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cli::burnish;
use crate::fixtures::{assert_success, copy_fixture, model_dir};

/// A GGUF file as the fixtures describe one: metadata, and per tensor its type, dimensions
/// (innermost first) and data hash.
struct Gguf {
    metadata: BTreeMap<String, Value>,
    tensors: BTreeMap<String, Value>,
    /// Each tensor's data.
    data: BTreeMap<String, Vec<u8>>,
}

/// Reads a GGUF file (version 3, the value and tensor types burnish writes).
fn read_gguf(bytes: &[u8]) -> Gguf {
    let mut at = 0usize;
    let mut take = |n: usize| {
        let slice = &bytes[at..at + n];
        at += n;
        slice
    };
    assert_eq!(take(4), b"GGUF");
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    assert_eq!(u32_at(take(4)), 3);
    let tensor_count = u64_at(take(8)) as usize;
    let kv_count = u64_at(take(8)) as usize;
    fn string(take: &mut impl FnMut(usize) -> Vec<u8>) -> String {
        let len = u64::from_le_bytes(take(8).try_into().unwrap()) as usize;
        String::from_utf8(take(len)).unwrap()
    }
    fn value(kind: u32, take: &mut impl FnMut(usize) -> Vec<u8>) -> Value {
        match kind {
            4 => json!(u32::from_le_bytes(take(4).try_into().unwrap())),
            5 => json!(i32::from_le_bytes(take(4).try_into().unwrap())),
            6 => json!(f64::from(f32::from_le_bytes(take(4).try_into().unwrap()))),
            7 => json!(take(1)[0] != 0),
            8 => json!(string(take)),
            9 => {
                let inner = u32::from_le_bytes(take(4).try_into().unwrap());
                let n = u64::from_le_bytes(take(8).try_into().unwrap());
                Value::Array((0..n).map(|_| value(inner, take)).collect())
            }
            other => panic!("value type {other}"),
        }
    }
    let mut owned = |n: usize| take(n).to_vec();
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = string(&mut owned);
        let kind = u32::from_le_bytes(owned(4).try_into().unwrap());
        metadata.insert(key, value(kind, &mut owned));
    }
    let mut infos = Vec::new();
    for _ in 0..tensor_count {
        let name = string(&mut owned);
        let n_dims = u32::from_le_bytes(owned(4).try_into().unwrap());
        let dims: Vec<u64> = (0..n_dims)
            .map(|_| u64::from_le_bytes(owned(8).try_into().unwrap()))
            .collect();
        let kind = u32::from_le_bytes(owned(4).try_into().unwrap());
        let offset = u64::from_le_bytes(owned(8).try_into().unwrap()) as usize;
        infos.push((name, dims, kind, offset));
    }
    let data_start = at.next_multiple_of(32);
    let mut raw = BTreeMap::new();
    let tensors = infos
        .into_iter()
        .map(|(name, dims, kind, offset)| {
            let n: u64 = dims.iter().product();
            let (type_name, len) = match kind {
                0 => ("F32", 4 * n),
                1 => ("F16", 2 * n),
                8 => ("Q8_0", n / 32 * 34),
                30 => ("BF16", 2 * n),
                other => panic!("tensor type {other}"),
            };
            assert_eq!(offset % 32, 0, "{name} is aligned");
            let data = &bytes[data_start + offset..data_start + offset + len as usize];
            let digest: String = Sha256::digest(data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let info = json!({"type": type_name, "dims": dims, "sha256": digest});
            raw.insert(name.clone(), data.to_vec());
            (name, info)
        })
        .collect();
    Gguf {
        metadata,
        tensors,
        data: raw,
    }
}

fn fixture(model: &str) -> Value {
    let path = model_dir("llama")
        .join("../../gguf")
        .join(format!("{model}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn exports_equal_llama_cpps_conversions() {
    let work = tempfile::tempdir().unwrap();
    for model in ["llama", "mistral", "qwen2", "qwen3"] {
        let expected = fixture(model);
        let dir = model_dir(model);
        for (kind, theirs) in expected["types"].as_object().unwrap() {
            let out = work.path().join(format!("{model}-{kind}.gguf"));
            let done = burnish(&[
                "export",
                "--model",
                dir.to_str().unwrap(),
                "--pre-tokenizer",
                "gpt-2",
                "--type",
                kind,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert_success(&done);
            let ours = read_gguf(&std::fs::read(&out).unwrap());
            assert_equals_conversion(ours, theirs, model, &format!("{model} {kind}"));
        }
    }
}

/// `ours` holds the metadata and tensors of llama.cpp's conversion `theirs`, and is named
/// `name`.
fn assert_equals_conversion(ours: Gguf, theirs: &Value, name: &str, label: &str) {
    let mut metadata = ours.metadata;
    assert_eq!(metadata.remove("general.name"), Some(json!(name)));
    let theirs_metadata: BTreeMap<String, Value> =
        serde_json::from_value(theirs["metadata"].clone()).unwrap();
    for (key, value) in &theirs_metadata {
        assert_eq!(metadata.get(key), Some(value), "{label}: {key}");
    }
    assert_eq!(
        metadata.keys().collect::<Vec<_>>(),
        theirs_metadata.keys().collect::<Vec<_>>(),
        "{label}: the same keys"
    );
    let theirs_tensors: BTreeMap<String, Value> =
        serde_json::from_value(theirs["tensors"].clone()).unwrap();
    assert_eq!(
        ours.tensors.keys().collect::<Vec<_>>(),
        theirs_tensors.keys().collect::<Vec<_>>(),
        "{label}: the same tensors"
    );
    for (tensor, info) in &theirs_tensors {
        assert_eq!(&ours.tensors[tensor], info, "{label}: {tensor}");
    }
}

/// The llama fixture with the tokenizer files of `tests/fixtures/gguf/<variant>/`, exported in
/// f32 with `extra` arguments.
fn export_variant(variant: &str, extra: &[&str]) -> Gguf {
    let model = copy_fixture("llama");
    let files = model_dir("llama").join("../../gguf").join(variant);
    for entry in std::fs::read_dir(&files).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.path().join(entry.file_name())).unwrap();
    }
    if variant == "llama-bos" {
        // Its chat template is in its tokenizer config.
        std::fs::remove_file(model.path().join("chat_template.jinja")).unwrap();
    }
    let out = model.path().join("out.gguf");
    let mut args = vec![
        "export",
        "--model",
        model.path().to_str().unwrap(),
        "--type",
        "f32",
        "--name",
        variant,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    assert_success(&burnish(&args));
    read_gguf(&std::fs::read(&out).unwrap())
}

/// A tokenizer that adds its BOS token to every input (as Llama 3's does), with its chat
/// template in its config: the flags and template llama.cpp's converter writes.
#[test]
fn a_tokenizer_adding_bos_exports_as_llama_cpp_converts_it() {
    let ours = export_variant("llama-bos", &["--pre-tokenizer", "gpt-2"]);
    assert_eq!(ours.metadata["tokenizer.ggml.add_bos_token"], json!(true));
    assert_equals_conversion(ours, &fixture("llama-bos"), "llama-bos", "llama-bos");
}

/// A SentencePiece vocabulary (Llama 2's, TinyLlama's, Mistral 7B's kind) goes in from its
/// `tokenizer.model`, with scores, byte tokens and the padding up to the config's size, as
/// llama.cpp's converter writes it; no pre-tokenizer is asked for.
#[test]
fn a_sentencepiece_vocabulary_exports_as_llama_cpp_converts_it() {
    let ours = export_variant("llama-spm", &[]);
    assert_eq!(ours.metadata["tokenizer.ggml.model"], json!("llama"));
    let kinds = ours.metadata["tokenizer.ggml.token_type"]
        .as_array()
        .unwrap();
    assert!(
        kinds.contains(&json!(6)) && kinds.contains(&json!(5)),
        "bytes and padding"
    );
    assert_equals_conversion(ours, &fixture("llama-spm"), "llama-spm", "llama-spm");
}

/// The pre-tokenizer is told by llama.cpp's hash of the tokenizer's ids of a fixed text: the
/// fixtures' is not in llama.cpp's table, and the refusal gives the hash transformers' tokenizer
/// gives; an adapter is folded in first; nothing is written over an existing file.
#[test]
fn export_tells_the_pre_tokenizer_and_folds_adapters() {
    let work = tempfile::tempdir().unwrap();
    let dir = model_dir("llama");
    let out = work.path().join("llama.gguf");
    let done = burnish(&[
        "export",
        "--model",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!done.status.success());
    let err = String::from_utf8_lossy(&done.stderr);
    let hash = fixture("llama")["pre_tokenizer_hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&hash) && err.contains("--pre-tokenizer"),
        "{err}"
    );
    assert!(!out.exists());

    let adapter = dir.join("../../adapters/llama-qv");
    let export = |out: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "export".to_string(),
            "--model".into(),
            dir.display().to_string(),
            "--pre-tokenizer".into(),
            "gpt-2".into(),
            "--type".into(),
            "f32".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(adapter) = adapter {
            args.extend(["--adapter".into(), adapter.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        burnish(&args)
    };
    let (plain, adapted) = (
        work.path().join("plain.gguf"),
        work.path().join("adapted.gguf"),
    );
    assert_success(&export(&plain, None));
    assert_success(&export(&adapted, Some(&adapter)));
    let (plain, adapted) = (
        read_gguf(&std::fs::read(&plain).unwrap()),
        read_gguf(&std::fs::read(&adapted).unwrap()),
    );
    // llama-qv adapts the query and value projections: those change, nothing else does.
    for (name, info) in &plain.tensors {
        let changed = info["sha256"] != adapted.tensors[name]["sha256"];
        let adapted_kind = name.contains("attn_q.") || name.contains("attn_v.");
        assert_eq!(changed, adapted_kind, "{name}");
    }
    assert_eq!(adapted.metadata["general.name"], json!("llama-qv"));

    // Over a bf16 checkpoint (held as stored), each adapted projection is folded in f32 as it
    // is written: the weights equal PEFT's merge_and_unload of the f32 base.
    let qwen2 = model_dir("qwen2");
    let out = work.path().join("qwen2-all.gguf");
    let adapter = qwen2.join("../../adapters/qwen2-all");
    let args = [
        "export",
        "--model",
        qwen2.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--pre-tokenizer",
        "gpt-2",
        "--type",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ];
    assert_success(&burnish(&args));
    let ours = read_gguf(&std::fs::read(&out).unwrap());
    let bytes = std::fs::read(adapter.join("merged.safetensors")).unwrap();
    let merged = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut compared = 0;
    for (name, view) in merged.tensors() {
        let theirs = burnish_peft::decode_f32(&view).unwrap();
        let (layer, module) = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .unwrap();
        let short = match module.trim_end_matches(".weight") {
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => panic!("{other}"),
        };
        let ours: Vec<f32> = ours.data[&format!("blk.{layer}.{short}.weight")]
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let worst = crate::fixtures::max_abs_diff(&ours, &theirs);
        assert!(worst <= 1e-6, "{name}: max |Δ| {worst:e} from PEFT's merge");
        compared += 1;
    }
    assert_eq!(compared, 14);
    let again = export(&work.path().join("plain.gguf"), None);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}
