//! Safetensors element conversion and atomic file writes, shared by model checkpoints and
//! adapter files: F32 / BF16 / F16 bytes to f32 values and back.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// The element type tensors are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    /// The name transformers uses in `config.json`'s `dtype` / `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// The safetensors element type.
    pub fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    /// Little-endian bytes of `values` in this type.
    pub fn encode(self, values: &[f32]) -> (Dtype, Vec<u8>) {
        let bytes = match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Self::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        (self.dtype(), bytes)
    }
}

/// A tensor's values on the host as f32, in row-major order.
pub fn f32_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("data converted to f32 reads back as f32")
}

/// The first value of a tensor (a scalar result) as f64.
pub fn first_value<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> f64 {
    f64::from(f32_values(tensor.flatten::<1>(0, D - 1).narrow(0, 0, 1))[0])
}

/// The values of a F32, BF16 or F16 safetensors tensor as f32; any other dtype is returned as the error.
pub fn decode_f32(view: &TensorView<'_>) -> Result<Vec<f32>, Dtype> {
    let raw = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(other),
    })
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_together(&[(path, bytes)]).map_err(|(_, e)| e)
}

/// Writes files that belong together (an adapter's weights and config): every one to its
/// temporary name first, then the renames, so a failed write changes none of them. On failure
/// the error names the file it is about.
pub fn write_atomic_together(files: &[(&Path, &[u8])]) -> Result<(), (PathBuf, std::io::Error)> {
    let mut written = Vec::new();
    for (path, bytes) in files {
        let tmp = temporary_name(path);
        if let Err(e) = std::fs::write(&tmp, bytes) {
            for left in written.iter().chain([&tmp]) {
                let _ = std::fs::remove_file(left);
            }
            return Err((path.to_path_buf(), e));
        }
        written.push(tmp);
    }
    for ((path, _), tmp) in files.iter().zip(&written) {
        std::fs::rename(tmp, path).map_err(|e| (path.to_path_buf(), e))?;
    }
    Ok(())
}

/// Writes `path` through `write`, streamed to its temporary name and renamed into place once
/// complete: a failed or interrupted write, or a value `write` could not read, leaves no file
/// at `path`.
pub fn write_atomic_with<E>(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), StreamedWriteError<E>>,
) -> Result<(), StreamedWriteError<E>> {
    let tmp = temporary_name(path);
    let result = (|| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut out)?;
        std::io::Write::flush(&mut out)?;
        Ok(std::fs::rename(&tmp, path)?)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the named tensors `(name, shape)` to the safetensors file `path` in `dtype`, one at a
/// time: `read(i)` gives the `i`-th tensor's f32 values as it is written, so no more than one is
/// held. Written under a temporary name and renamed into place; a failed read (its error is
/// returned) or write leaves no file at `path`.
pub fn write_safetensors_streamed<E>(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    dtype: SaveDtype,
    read: impl Fn(usize) -> Result<Vec<f32>, E>,
) -> Result<(), StreamedWriteError<E>> {
    let failure = std::cell::RefCell::new(None);
    let views = tensors.iter().enumerate().map(|(index, (name, shape))| {
        let view = LazyView {
            index,
            shape,
            dtype,
            read: &read,
            failure: &failure,
        };
        (name.clone(), view)
    });
    let tmp = temporary_name(path);
    let serialized = safetensors::serialize_to_file(views, pytorch_metadata(), &tmp);
    let result = match (failure.into_inner(), serialized) {
        (Some(e), _) => Err(StreamedWriteError::Read(e)),
        (None, Err(e)) => Err(StreamedWriteError::Write(std::io::Error::other(e))),
        (None, Ok(())) => std::fs::rename(&tmp, path).map_err(StreamedWriteError::Write),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Why a streamed write ([`write_atomic_with`], [`write_safetensors_streamed`]) wrote nothing.
#[derive(Debug)]
pub enum StreamedWriteError<E> {
    /// A value to write could not be read.
    Read(E),
    /// The file could not be written.
    Write(std::io::Error),
}

impl<E> From<std::io::Error> for StreamedWriteError<E> {
    fn from(e: std::io::Error) -> Self {
        Self::Write(e)
    }
}

impl<E> StreamedWriteError<E> {
    /// The read's own error, or a write's made one by `written`.
    pub fn into_error(self, written: impl FnOnce(std::io::Error) -> E) -> E {
        match self {
            Self::Read(e) => e,
            Self::Write(e) => written(e),
        }
    }
}

/// The metadata transformers expects of a safetensors file: `{"format": "pt"}`.
fn pytorch_metadata() -> Option<std::collections::HashMap<String, String>> {
    Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]))
}

/// A tensor whose bytes are read and encoded when the writer asks for them; a failed read is
/// kept in `failure`, and the file is discarded.
struct LazyView<'a, E> {
    index: usize,
    shape: &'a [usize],
    dtype: SaveDtype,
    read: &'a dyn Fn(usize) -> Result<Vec<f32>, E>,
    failure: &'a std::cell::RefCell<Option<E>>,
}

impl<E> safetensors::View for LazyView<'_, E> {
    fn dtype(&self) -> Dtype {
        self.dtype.dtype()
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    /// The tensor's bytes; nothing once a read has failed (the file is discarded then).
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.failure.borrow().is_some() {
            return std::borrow::Cow::Borrowed(&[]);
        }
        match (self.read)(self.index) {
            Ok(values) => {
                let bytes = self.dtype.encode(&values).1;
                assert_eq!(
                    bytes.len(),
                    self.data_len(),
                    "tensor {}: values of another size than its shape",
                    self.index
                );
                std::borrow::Cow::Owned(bytes)
            }
            Err(e) => {
                *self.failure.borrow_mut() = Some(e);
                std::borrow::Cow::Borrowed(&[])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.dtype().bitsize() / 8
    }
}

/// The hidden name in `path`'s directory that a file is written under before its rename.
fn temporary_name(path: &Path) -> PathBuf {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()))
}

/// The name of the first of the named tensors `(name, shape, f32 values)` holding a NaN or an
/// infinity: what must never be written as weights.
pub fn first_non_finite(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Option<&str> {
    tensors
        .iter()
        .find(|(_, _, values)| values.iter().any(|x| !x.is_finite()))
        .map(|(name, _, _)| name.as_str())
}

/// Serializes named tensors `(name, shape, f32 values)` into safetensors bytes in `dtype`, with
/// the `{"format": "pt"}` metadata transformers expects.
pub fn serialize(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: SaveDtype,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let encoded: Vec<(Dtype, Vec<u8>)> = tensors.iter().map(|(_, _, v)| dtype.encode(v)).collect();
    let views = tensors
        .iter()
        .zip(&encoded)
        .map(|((name, shape, _), (dt, bytes))| {
            TensorView::new(*dt, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, pytorch_metadata())
}

#[cfg(test)]
mod tests {
    use safetensors::SafeTensors;

    use super::*;

    /// Tensors go in one at a time and read back as written; a failed read leaves no file.
    #[test]
    fn streamed_files_are_whole_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let tensors = vec![("a".to_string(), vec![2, 2]), ("b".to_string(), vec![3])];
        let values = |i: usize| -> Result<Vec<f32>, String> {
            Ok((0..[4, 3][i]).map(|v| (v + 10 * i) as f32).collect())
        };
        write_safetensors_streamed(&path, &tensors, SaveDtype::F32, values).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            decode_f32(&file.tensor("b").unwrap()).unwrap(),
            [10.0, 11.0, 12.0]
        );
        std::fs::remove_file(&path).unwrap();
        let failing = |i: usize| match i {
            0 => Ok(vec![0.0; 4]),
            _ => Err("tensor b is not finite".to_string()),
        };
        let err = write_safetensors_streamed(&path, &tensors, SaveDtype::BF16, failing);
        assert!(matches!(err, Err(StreamedWriteError::Read(e)) if e.contains("tensor b")));
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temporary left"
        );
    }
}
