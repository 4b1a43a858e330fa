//! Where a decoder's weights come from: a Hugging Face checkpoint (`model.safetensors` or a
//! sharded `model.safetensors.index.json`, in F32, BF16 or F16, converted to f32; projections
//! bitsandbytes stored as 4-bit NF4 codes are read as codes or read back to f32) or a seeded
//! random source for benchmarks. Every tensor is checked against the shape the config implies.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use burnish_peft::{NF4_LEVELS, decode_f32, nested_maxima};
use memmap2::{Mmap, UncheckedAdvice};
use rand::{Rng, SeedableRng, rngs::StdRng};
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::bnb_4bit::{NF4_STATE, QuantState, StoredNf4, unpack_codes};
use crate::error::{ModelError, Result};

pub(crate) const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// A source of named weight tensors, read as f32.
pub trait TensorSource {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Tensor `name`, which must have exactly `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData>;
    /// Tensor `name`'s 4-bit codes and block maxima when the source stores it quantized (a
    /// bitsandbytes NF4 checkpoint), `None` when it stores it in floats.
    fn read_nf4(&self, _name: &str, _shape: &[usize]) -> Result<Option<StoredNf4>> {
        Ok(None)
    }
    /// Whether the source was quantized before it was saved: then the projections it stores
    /// in floats were left unquantized on purpose, and stay so.
    fn stores_nf4(&self) -> bool {
        false
    }
}

/// The safetensors files of a checkpoint, mapped into memory (the system reads the pages a
/// tensor needs as it is read, and may drop them again), with the file that holds each key.
pub struct Weights {
    files: Vec<Shard>,
    /// tensor name -> index into `files`
    location: HashMap<String, usize>,
    /// Whether any tensor is stored as 4-bit NF4 codes.
    stores_nf4: bool,
}

/// One safetensors file, mapped, and its parsed header.
struct Shard {
    path: PathBuf,
    bytes: Mmap,
    /// Where the tensors' bytes start: after the length and the header.
    data_start: usize,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Weights {
    /// Reads the weights of the checkpoint in `dir`, single-file or sharded.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let paths: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let mut shards: Vec<&String> = index.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single_path.is_file() {
            vec![single_path]
        } else {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };

        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only and lives as long as `Weights`; as with any reader of
            // a checkpoint, rewriting the file while it is read gives undefined contents.
            let bytes = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header, metadata) =
                SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            for name in metadata.tensors().into_keys() {
                location.insert(name, i);
            }
            files.push(Shard {
                path,
                bytes,
                data_start: 8 + header,
                metadata,
            });
        }
        let stores_nf4 = location.keys().any(|name| name.ends_with(NF4_STATE));
        Ok(Self {
            files,
            location,
            stores_nf4,
        })
    }

    /// Tensor `name` and the file that holds it.
    fn view(&self, name: &str) -> Result<(&Path, TensorView<'_>)> {
        let (shard, info, bytes) = self.locate(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.blame(name),
            name: name.to_string(),
        })?;
        let data = &shard.bytes[bytes];
        // The header was validated when the file was opened: offsets within the file, sizes
        // that match dtypes and shapes.
        let view = TensorView::new(info.dtype, info.shape.clone(), data).map_err(|e| {
            ModelError::Safetensors {
                path: shard.path.clone(),
                detail: e.to_string(),
            }
        })?;
        Ok((&shard.path, view))
    }

    /// The shard holding tensor `name`, its header entry, and where its bytes lie in the
    /// shard's map.
    fn locate(&self, name: &str) -> Option<(&Shard, &TensorInfo, std::ops::Range<usize>)> {
        let shard = &self.files[*self.location.get(name)?];
        let info = shard.metadata.info(name)?;
        let (start, end) = info.data_offsets;
        Some((
            shard,
            info,
            shard.data_start + start..shard.data_start + end,
        ))
    }

    /// Lets the pages of tensor `name` go from this process's memory once its values are copied
    /// out: a mapped checkpoint then does not stay resident beside the model built from it. The
    /// pages are read from the file again if the tensor is read again.
    fn release(&self, name: &str) {
        let Some((shard, _, bytes)) = self.locate(name) else {
            return;
        };
        // SAFETY: the map is read-only and of a file nothing writes, and every reader has copied
        // the values out before this call: a view still borrowing these bytes is not read
        // again, and if it were, dropped pages of a file mapping are read from the file again,
        // the same bytes. Advice only: a failure changes nothing.
        let _ = unsafe {
            shard
                .bytes
                .unchecked_advise_range(UncheckedAdvice::DontNeed, bytes.start, bytes.len())
        };
    }

    /// Tensor `name`'s `count` values as f32, whatever its shape: a 4-bit weight's statistics.
    fn statistics(&self, weight: &str, name: &str, count: usize) -> Result<Vec<f32>> {
        let (path, view) = self.view(name)?;
        let values = decode_f32(&view).ok().filter(|v| v.len() == count);
        values.ok_or_else(|| ModelError::Quantized {
            path: path.to_path_buf(),
            name: weight.to_string(),
            detail: format!(
                "`{name}` should hold {count} floats, and holds {:?} {:?}",
                view.dtype(),
                view.shape()
            ),
        })
    }

    /// The file a missing or malformed tensor is reported against.
    fn blame(&self, name: &str) -> PathBuf {
        match self.location.get(name) {
            Some(&i) => self.files[i].path.clone(),
            None if self.files.len() == 1 => self.files[0].path.clone(),
            None => self.files[0]
                .path
                .parent()
                .map(|d| d.join(INDEX_FILE))
                .unwrap_or_default(),
        }
    }
}

impl TensorSource for Weights {
    /// Whether the checkpoint holds a tensor of that name.
    fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Reads tensor `name` as f32, checking it has exactly `shape`; a 4-bit weight is read back
    /// as bitsandbytes dequantizes it.
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        if let Some(stored) = self.read_nf4(name, shape)? {
            return Ok(TensorData::new(stored.dequantize(), shape.to_vec()));
        }
        let (path, view) = self.view(name)?;
        let path = path.to_path_buf();
        if view.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let values = decode_f32(&view).map_err(|dtype| ModelError::UnsupportedDtype {
            path: path.clone(),
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
        })?;
        self.release(name);
        Ok(TensorData::new(values, shape.to_vec()))
    }

    fn read_nf4(&self, name: &str, shape: &[usize]) -> Result<Option<StoredNf4>> {
        let state_name = format!("{name}{NF4_STATE}");
        if !self.location.contains_key(&state_name) {
            return Ok(None);
        }
        let (path, state) = self.view(&state_name)?;
        let malformed = |detail: String| ModelError::Quantized {
            path: path.to_path_buf(),
            name: name.to_string(),
            detail,
        };
        let state: QuantState = serde_json::from_slice(state.data()).map_err(|e| {
            malformed(format!(
                "its quantization state is not the JSON bitsandbytes writes ({e})"
            ))
        })?;
        if state.quant_type != "nf4" {
            return Err(malformed(format!(
                "codes of type `{}`; only NF4 is implemented",
                state.quant_type
            )));
        }
        if state.shape != shape {
            return Err(ModelError::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: state.shape,
            });
        }
        if state.blocksize == 0 || state.nested_blocksize == Some(0) {
            return Err(malformed("a block size of 0".into()));
        }
        let count: usize = shape.iter().product();
        let blocks = count.div_ceil(state.blocksize);
        let (_, packed) = self.view(name)?;
        if packed.data().len() != count.div_ceil(2) {
            return Err(malformed(format!(
                "{} bytes of codes for {count} values (two to a byte)",
                packed.data().len()
            )));
        }
        let levels = self.statistics(name, &format!("{name}.quant_map"), NF4_LEVELS.len())?;
        if levels != NF4_LEVELS {
            return Err(malformed(
                "its `quant_map` is not NF4's sixteen levels".into(),
            ));
        }
        let absmax = format!("{name}.absmax");
        let maxima = match (state.nested_blocksize, state.nested_offset) {
            (Some(nested_block), Some(offset)) => {
                let (_, codes) = self.view(&absmax)?;
                if codes.dtype() != Dtype::U8 || codes.data().len() != blocks {
                    return Err(malformed(format!(
                        "`{absmax}` should hold {blocks} 8-bit codes (double quantization), and \
                         holds {:?} {:?}",
                        codes.dtype(),
                        codes.shape()
                    )));
                }
                let nested_absmax = self.statistics(
                    name,
                    &format!("{name}.nested_absmax"),
                    blocks.div_ceil(nested_block),
                )?;
                let map = self.statistics(name, &format!("{name}.nested_quant_map"), 256)?;
                nested_maxima(
                    codes.data(),
                    &nested_absmax,
                    &map,
                    nested_block,
                    offset as f32,
                )
            }
            (None, None) => self.statistics(name, &absmax, blocks)?,
            _ => {
                return Err(malformed(
                    "its state has a nested block size or an offset without the other".into(),
                ));
            }
        };
        let codes = unpack_codes(packed.data(), count);
        self.release(name);
        Ok(Some(StoredNf4 {
            codes,
            maxima,
            block: state.blocksize,
        }))
    }

    fn stores_nf4(&self) -> bool {
        self.stores_nf4
    }
}

/// Weights drawn uniformly with standard deviation `std` from a seed; norms are ones. Used to
/// build models of real shapes for benchmarks without downloading them.
pub struct RandomWeights {
    pub seed: u64,
    pub std: f32,
}

impl TensorSource for RandomWeights {
    fn contains(&self, _name: &str) -> bool {
        false
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let count = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(TensorData::new(vec![1.0f32; count], shape.to_vec()));
        }
        // A distinct stream per tensor, so shapes and order do not shift each other's values.
        let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = StdRng::seed_from_u64(self.seed ^ salt);
        let bound = self.std * 3f32.sqrt();
        let values = (0..count)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(TensorData::new(values, shape.to_vec()))
    }
}
