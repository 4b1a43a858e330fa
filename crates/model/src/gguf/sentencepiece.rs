//! A SentencePiece vocabulary (`tokenizer.model`, Llama 2, TinyLlama, Mistral 7B, ...) as GGUF
//! metadata, as llama.cpp's converter writes it: every piece with its score and kind, padded to
//! the config's vocabulary size, the added tokens of `added_tokens.json` and of
//! `tokenizer_config.json` over them. The model file is a `sentencepiece.ModelProto` protobuf,
//! read here for its pieces only.

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::file::Value;
use super::vocab::{CONTROL, NORMAL, UNUSED, USER_DEFINED, looks_special, read_json};
use crate::error::{ModelError, Result};

/// The model file's name.
pub const MODEL_FILE: &str = "tokenizer.model";

/// llama.cpp's token kinds that only SentencePiece vocabularies have.
const UNKNOWN: i32 = 2;
const BYTE: i32 = 6;

/// One piece of the model: its text, score and kind (llama.cpp's codes, which are
/// SentencePiece's: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6).
#[derive(Debug, Clone, PartialEq)]
struct Piece {
    text: String,
    score: f32,
    kind: i32,
}

/// A protobuf varint at `bytes[*at..]`, or `None` past the end.
fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// One field of a protobuf message.
struct Field<'a> {
    number: u64,
    wire: u64,
    /// The bytes of a length-delimited or fixed-size field; empty for a varint.
    payload: &'a [u8],
    /// A varint's value; 0 for other fields.
    value: u64,
}

/// The fields of one protobuf message, or `None` if it does not parse.
fn fields(bytes: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        let (payload, value) = match wire {
            0 => (&bytes[at..at], varint(bytes, &mut at)?),
            1 | 5 => {
                let len = if wire == 1 { 8 } else { 4 };
                let payload = bytes.get(at..at.checked_add(len)?)?;
                at += len;
                (payload, 0)
            }
            2 => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                let payload = bytes.get(at..at.checked_add(len)?)?;
                at += len;
                (payload, 0)
            }
            _ => return None,
        };
        out.push(Field {
            number,
            wire,
            payload,
            value,
        });
    }
    Some(out)
}

/// The pieces of a `ModelProto` (its field 1, each a `SentencePiece`: piece 1, score 2,
/// type 3 defaulting to normal).
fn pieces(bytes: &[u8]) -> Option<Vec<Piece>> {
    let mut out = Vec::new();
    for field in fields(bytes)? {
        if (field.number, field.wire) != (1, 2) {
            continue;
        }
        let mut piece = Piece {
            text: String::new(),
            score: 0.0,
            kind: NORMAL,
        };
        for inner in fields(field.payload)? {
            match (inner.number, inner.wire) {
                (1, 2) => piece.text = String::from_utf8(inner.payload.to_vec()).ok()?,
                (2, 5) => piece.score = f32::from_le_bytes(inner.payload.try_into().ok()?),
                (3, 0) => piece.kind = inner.value as i32,
                _ => {}
            }
        }
        // A user-defined piece reads as a normal one through SentencePiece's processor, which
        // is how llama.cpp's converter reads them.
        if !matches!(piece.kind, UNKNOWN | CONTROL | UNUSED | BYTE) {
            piece.kind = NORMAL;
        }
        out.push(piece);
    }
    Some(out)
}

/// The tokens, scores and kinds of the SentencePiece model in `dir` for a vocabulary of
/// `vocab_size`, with the added tokens over them.
pub fn metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join(MODEL_FILE);
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let pieces = pieces(&bytes).ok_or_else(|| ModelError::Unsupported {
        path: path.clone(),
        key: "pieces".into(),
        detail: "not a SentencePiece model (its protobuf does not parse)".into(),
    })?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut kinds = vec![UNUSED; vocab_size];
    for (id, piece) in pieces.into_iter().take(vocab_size).enumerate() {
        (tokens[id], scores[id], kinds[id]) = (piece.text, piece.score, piece.kind);
    }
    let mut set = |id: usize, text: &str, kind: i32| {
        if id < vocab_size {
            (tokens[id], scores[id], kinds[id]) = (text.to_string(), -1000.0, kind);
        }
    };
    if let Some(added) = read_json(&dir.join("added_tokens.json"))? {
        for (text, id) in &added {
            if let Some(id) = id.as_u64() {
                set(id as usize, text, USER_DEFINED);
            }
        }
    }
    let config: Option<Map<String, Json>> = read_json(&dir.join("tokenizer_config.json"))?;
    let decoder = config
        .as_ref()
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Json::as_object);
    for (id, token) in decoder.into_iter().flatten() {
        let (Ok(id), Some(text)) = (
            id.parse::<usize>(),
            token.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        let special = token.get("special").and_then(Json::as_bool) == Some(true);
        if special || looks_special(text) {
            set(id, text, CONTROL);
        } else {
            set(id, &text.replace('\u{2581}', " "), USER_DEFINED);
        }
    }
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::Str("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::Str("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Strs(tokens)),
        ("tokenizer.ggml.scores".into(), Value::F32s(scores)),
        ("tokenizer.ggml.token_type".into(), Value::I32s(kinds)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `ModelProto` of two pieces, the second with every field, and an unrelated field.
    #[test]
    fn pieces_read_from_the_protobuf() {
        let mut bytes = Vec::new();
        let mut piece = |text: &str, score: Option<f32>, kind: Option<u8>| {
            let mut inner = vec![0x0a, text.len() as u8];
            inner.extend_from_slice(text.as_bytes());
            if let Some(score) = score {
                inner.push(0x15);
                inner.extend_from_slice(&score.to_le_bytes());
            }
            if let Some(kind) = kind {
                inner.extend_from_slice(&[0x18, kind]);
            }
            bytes.extend_from_slice(&[0x0a, inner.len() as u8]);
            bytes.extend_from_slice(&inner);
        };
        piece("<unk>", None, Some(2));
        piece("\u{2581}the", Some(-3.5), None);
        piece("<0x0A>", Some(0.0), Some(6));
        piece("<tool>", Some(0.0), Some(4));
        bytes.extend_from_slice(&[0x12, 2, 0x08, 1]);
        let read = pieces(&bytes).unwrap();
        let expected = [
            ("<unk>", 0.0, UNKNOWN),
            ("\u{2581}the", -3.5, NORMAL),
            ("<0x0A>", 0.0, BYTE),
            ("<tool>", 0.0, NORMAL),
        ];
        for (piece, (text, score, kind)) in read.iter().zip(expected) {
            assert_eq!(
                (piece.text.as_str(), piece.score, piece.kind),
                (text, score, kind)
            );
        }
        assert_eq!(read.len(), 4);
        assert_eq!(pieces(&[0x0a, 9, 1]), None, "a truncated message");
        let huge = [
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert_eq!(pieces(&huge), None, "a length past any file");
    }
}
