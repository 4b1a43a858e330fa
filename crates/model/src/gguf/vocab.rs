//! A tokenizer as GGUF metadata, as llama.cpp's converter writes it: a SentencePiece model
//! (`tokenizer.model`, see `sentencepiece`) when the model has one, else a byte-level BPE
//! tokenizer (`tokenizer.json`: the tokens by id with their kinds, and the merges); then the
//! special tokens' ids and whether they are added to every input, and the chat template.
//! Tokenizers of another kind (WordPiece, Unigram, ...) are refused.

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::file::Value;
use super::sentencepiece;
use crate::error::{ModelError, Result};

/// llama.cpp's token kinds.
pub(super) const NORMAL: i32 = 1;
pub(super) const CONTROL: i32 = 3;
pub(super) const USER_DEFINED: i32 = 4;
pub(super) const UNUSED: i32 = 5;

/// The special tokens a converter looks for, with the GGUF key each id is written under (`None`
/// where llama.cpp has none).
const SPECIAL: [(&str, Option<&str>); 7] = [
    ("bos", Some("tokenizer.ggml.bos_token_id")),
    ("eos", Some("tokenizer.ggml.eos_token_id")),
    ("unk", Some("tokenizer.ggml.unknown_token_id")),
    ("sep", Some("tokenizer.ggml.seperator_token_id")),
    ("pad", Some("tokenizer.ggml.padding_token_id")),
    ("cls", None),
    ("mask", Some("tokenizer.ggml.mask_token_id")),
];

/// A JSON object file, `None` when there is no such file.
pub(super) fn read_json(path: &Path) -> Result<Option<Map<String, Json>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether an added token that is not marked special looks like one all the same.
pub(super) fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// Whether the model in `dir` is exported with its SentencePiece vocabulary (it has one).
pub fn uses_sentencepiece(dir: &Path) -> bool {
    dir.join(sentencepiece::MODEL_FILE).is_file()
}

/// The tokenizer metadata of the model in `dir` whose config names `vocab_size` tokens, for
/// llama.cpp's pre-tokenizer `pre` (of a BPE tokenizer); `config` is its `config.json`.
pub fn metadata(
    dir: &Path,
    config: &Map<String, Json>,
    vocab_size: usize,
    pre: &str,
) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let tokenizer = read_json(&path)?.unwrap_or_default();
    let added: Vec<&Map<String, Json>> = tokenizer
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(|list| list.iter().filter_map(Json::as_object).collect())
        .unwrap_or_default();
    let mut out = match uses_sentencepiece(dir) {
        true => sentencepiece::metadata(dir, vocab_size)?,
        false => bpe(dir, &tokenizer, &added, vocab_size, pre)?,
    };
    out.extend(special_tokens(dir, &tokenizer, &added, config, vocab_size)?);
    Ok(out)
}

/// The tokens, kinds and merges of the byte-level BPE tokenizer `tokenizer` (read from `dir`).
fn bpe(
    dir: &Path,
    tokenizer: &Map<String, Json>,
    added: &[&Map<String, Json>],
    vocab_size: usize,
    pre: &str,
) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let unsupported = |detail: String| ModelError::Unsupported {
        path: path.clone(),
        key: "model".into(),
        detail,
    };
    if tokenizer.is_empty() {
        return Err(ModelError::Input(format!(
            "{}: no tokenizer.json (nor tokenizer.model); GGUF export needs the model's tokenizer",
            dir.display()
        )));
    }
    let model = tokenizer
        .get("model")
        .and_then(Json::as_object)
        .ok_or_else(|| unsupported("no `model` object".into()))?;
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("");
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    if kind != "BPE" || byte_fallback {
        return Err(unsupported(format!(
            "a {kind} tokenizer{}: GGUF export writes byte-level BPE vocabularies (Llama 3, \
             Qwen2, SmolLM2, ...) and SentencePiece ones from their {}",
            if byte_fallback {
                " with byte fallback, a SentencePiece vocabulary without its model file"
            } else {
                ""
            },
            sentencepiece::MODEL_FILE
        )));
    }
    let mut by_id: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    if let Some(vocab) = model.get("vocab").and_then(Json::as_object) {
        for (token, id) in vocab {
            if let Some(slot) = id.as_u64().and_then(|id| by_id.get_mut(id as usize)) {
                *slot = Some((token.clone(), NORMAL));
            }
        }
    }
    for token in added {
        let (Some(id), Some(content)) = (
            token.get("id").and_then(Json::as_u64),
            token.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        let special = token.get("special").and_then(Json::as_bool) == Some(true);
        let (text, kind) = if special || looks_special(content) {
            (content.to_string(), CONTROL)
        } else {
            (content.replace('\u{2581}', " "), USER_DEFINED)
        };
        match by_id.get_mut(id as usize) {
            Some(slot) => *slot = Some((text, kind)),
            None => {
                return Err(unsupported(format!(
                    "added token {content:?} has id {id}, past the config's vocab_size \
                     {vocab_size}"
                )));
            }
        }
    }
    let (tokens, kinds): (Vec<String>, Vec<i32>) = by_id
        .into_iter()
        .enumerate()
        .map(|(i, entry)| entry.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED)))
        .unzip();
    let merges = merges(model).map_err(unsupported)?;
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::I32s(kinds)),
        ("tokenizer.ggml.merges".into(), Value::Strs(merges)),
    ])
}

/// The merges as `"left right"` strings (spaces within a part written as U+0120).
fn merges(model: &Map<String, Json>) -> std::result::Result<Vec<String>, String> {
    let Some(list) = model.get("merges").and_then(Json::as_array) else {
        return Err("no merges".into());
    };
    list.iter()
        .map(|merge| match merge {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => {
                    let part = |s: &str| s.replace(' ', "\u{120}");
                    Ok(format!("{} {}", part(a), part(b)))
                }
                _ => Err(format!("a merge is {merge}, not two strings")),
            },
            _ => Err(format!("a merge is {merge}, not a string or a pair")),
        })
        .collect()
}

/// The special tokens' ids, whether the tokenizer adds them, and the chat template: from
/// `tokenizer_config.json` (and the tokenizer's post-processor), then `config.json`'s ids.
fn special_tokens(
    dir: &Path,
    tokenizer: &Map<String, Json>,
    added: &[&Map<String, Json>],
    config: &Map<String, Json>,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
    let mut ids: Vec<(&str, u32)> = Vec::new();
    let mut adds: Vec<(&str, bool)> = Vec::new();
    let set = |ids: &mut Vec<(&'static str, u32)>, kind: &'static str, id: Option<u64>| {
        if let Some(id) = id
            && (id as usize) < vocab_size
            && !ids.iter().any(|(k, _)| *k == kind)
        {
            ids.push((kind, id as u32));
        }
    };
    let add = |adds: &mut Vec<(&'static str, bool)>, kind: &'static str, value: bool| match adds
        .iter_mut()
        .find(|(k, _)| *k == kind)
    {
        Some(entry) => entry.1 = value,
        None => adds.push((kind, value)),
    };
    let mut template = None;
    if let Some(tc) = &tokenizer_config {
        let content = |kind: &str| match tc.get(&format!("{kind}_token")) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(String::from),
            _ => None,
        };
        // A post-processor that puts a special token first (or last) adds it to every input;
        // one between a pair's two sequences is a separator.
        if let Some((single, pair)) = templates(tokenizer) {
            let special = |item: &Json| {
                item.pointer("/SpecialToken/id")
                    .and_then(Json::as_str)
                    .map(String::from)
            };
            let sequence = |item: &Json| {
                item.pointer("/Sequence/id")
                    .and_then(Json::as_str)
                    .map(String::from)
            };
            let (bos, cls, eos, sep) = (
                content("bos"),
                content("cls"),
                content("eos"),
                content("sep"),
            );
            let (mut first, mut last) = (None, None);
            if single.len() > 1 {
                first = special(&single[0]);
                if let Some(first) = &first {
                    let known = Some(first) == bos.as_ref() || Some(first) == cls.as_ref();
                    add(&mut adds, "bos", known);
                }
                last = special(&single[single.len() - 1]);
                if let Some(last) = &last {
                    add(&mut adds, "eos", Some(last) == eos.as_ref());
                }
            }
            let mut pair: &[Json] = pair;
            if first.is_some() && pair.first().and_then(special) == first {
                pair = &pair[1..];
            }
            if last.is_some() && pair.last().and_then(special) == last {
                pair = &pair[..pair.len() - 1];
            }
            let separates = |item: &Json| {
                special(item).is_some_and(|t| Some(&t) == sep.as_ref() || Some(&t) == eos.as_ref())
            };
            if pair.len() > 2
                && sequence(&pair[0]).as_deref() == Some("A")
                && sequence(&pair[pair.len() - 1]).as_deref() == Some("B")
            {
                let middle = &pair[1..pair.len() - 1];
                let by_first = separates(&middle[0]) && last.is_none();
                let by_second = middle.len() == 2 && separates(&middle[1]);
                add(&mut adds, "sep", by_first || by_second);
            }
        }
        for (kind, _) in SPECIAL {
            if let Some(value) = tc.get(&format!("add_{kind}_token")).and_then(Json::as_bool) {
                add(&mut adds, kind, value);
            }
            if let Some(content) = content(kind) {
                let id = added
                    .iter()
                    .find(|t| t.get("content").and_then(Json::as_str) == Some(content.as_str()))
                    .and_then(|t| t.get("id").and_then(Json::as_u64));
                set(&mut ids, kind, id);
            }
        }
        template = match tc.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
    }
    for (kind, _) in SPECIAL {
        set(
            &mut ids,
            kind,
            config
                .get(&format!("{kind}_token_id"))
                .and_then(Json::as_u64),
        );
    }
    let mut out = Vec::new();
    for (kind, id) in ids {
        if let Some((_, Some(key))) = SPECIAL.iter().find(|(k, _)| *k == kind) {
            out.push((key.to_string(), Value::U32(id)));
        }
    }
    for (kind, value) in adds {
        if matches!(kind, "bos" | "eos" | "sep") {
            out.push((
                format!("tokenizer.ggml.add_{kind}_token"),
                Value::Bool(value),
            ));
        }
    }
    if let Some(template) = template {
        out.push(("tokenizer.chat_template".into(), Value::Str(template)));
    }
    Ok(out)
}

/// The single-sequence and pair templates of a `TemplateProcessing` post-processor, if the
/// tokenizer has one (alone or in a sequence of processors).
fn templates(tokenizer: &Map<String, Json>) -> Option<(&[Json], &[Json])> {
    let processor = tokenizer.get("post_processor")?;
    let processors = match processor.get("processors").and_then(Json::as_array) {
        Some(list) => list.iter().collect::<Vec<_>>(),
        None => vec![processor],
    };
    let template = processors
        .into_iter()
        .find(|p| p.get("type").and_then(Json::as_str) == Some("TemplateProcessing"))?;
    let list = |key: &str| {
        template
            .get(key)
            .and_then(Json::as_array)
            .map_or(&[][..], Vec::as_slice)
    };
    Some((list("single"), list("pair")))
}
