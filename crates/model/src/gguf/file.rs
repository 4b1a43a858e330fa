//! The GGUF container (version 3), as llama.cpp reads it: a header, typed metadata key/values,
//! the tensors' names, dimensions (innermost first), element types and offsets, then each
//! tensor's data, every section aligned to 32 bytes. Little-endian throughout.

use std::io::Write;

use super::encoding::{encode, encoded_len};

/// Tensors' data start at, and are padded to, multiples of this (GGUF's default alignment).
pub const ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An array of strings.
    Strs(Vec<String>),
    /// An array of 32-bit floats.
    F32s(Vec<f32>),
    /// An array of 32-bit integers.
    I32s(Vec<i32>),
}

impl Value {
    /// GGUF's code of the value's type.
    fn type_code(&self) -> u32 {
        match self {
            Self::U32(_) => 4,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Strs(_) | Self::F32s(_) | Self::I32s(_) => 9,
        }
    }
}

/// A tensor's element type, by ggml's codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    BF16 = 30,
}

/// A tensor as the file lists it; its values are asked for as it is written.
#[derive(Debug)]
pub struct TensorEntry {
    pub name: String,
    /// The shape as PyTorch gives it (outermost first).
    pub shape: Vec<usize>,
    pub kind: TensorType,
}

impl TensorEntry {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::Str(s) => put_str(out, s),
        Value::Strs(items) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                put_str(out, s);
            }
        }
        Value::F32s(items) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Value::I32s(items) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Zeros up to the next multiple of [`ALIGNMENT`] past `len` bytes.
fn padding(len: usize) -> Vec<u8> {
    vec![0; len.next_multiple_of(ALIGNMENT) - len]
}

/// Writes the whole file to `out`: `metadata` in its order, then `tensors` in theirs, each
/// tensor's values (`values(i)` for the `i`-th, f32, as many as its shape holds) encoded as it
/// is written.
pub fn write<E: From<std::io::Error>>(
    out: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
    mut values: impl FnMut(usize) -> Result<Vec<f32>, E>,
) -> Result<(), E> {
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|t| encoded_len(t.kind, t.len()))
        .collect();
    out.write_all(&header(metadata, tensors, &sizes))?;
    for (i, (tensor, size)) in tensors.iter().zip(sizes).enumerate() {
        let data = encode(tensor.kind, &values(i)?);
        assert_eq!(data.len(), size, "{}: values of another size", tensor.name);
        out.write_all(&data)?;
        out.write_all(&padding(size))?;
    }
    Ok(())
}

/// Everything before the tensors' data, padded.
fn header(metadata: &[(String, Value)], tensors: &[TensorEntry], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        out.extend_from_slice(&value.type_code().to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    for (tensor, size) in tensors.iter().zip(sizes) {
        put_str(&mut out, &tensor.name);
        out.extend_from_slice(&(tensor.shape.len() as u32).to_le_bytes());
        for &dim in tensor.shape.iter().rev() {
            out.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        out.extend_from_slice(&(tensor.kind as u32).to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += size.next_multiple_of(ALIGNMENT);
    }
    let len = out.len();
    out.extend_from_slice(&padding(len));
    out
}
