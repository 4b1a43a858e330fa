//! Where a decoder's weights come from: a Hugging Face checkpoint (`model.safetensors` or a
//! sharded `model.safetensors.index.json`, in F32, BF16 or F16, converted to f32) or a seeded
//! random source for benchmarks. Every tensor is checked against the shape the config implies.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use burnish_peft::decode_f32;
use rand::{Rng, SeedableRng, rngs::StdRng};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::error::{ModelError, Result};

pub(crate) const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// A source of named weight tensors, read as f32.
pub trait TensorSource {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Tensor `name`, which must have exactly `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData>;
}

/// The safetensors files of a checkpoint, read into memory, with the file that holds each key.
pub struct Weights {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name -> index into `files`
    location: HashMap<String, usize>,
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
            let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            let names = SafeTensors::deserialize(&bytes)
                .map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    detail: e.to_string(),
                })?
                .names()
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>();
            for name in names {
                location.insert(name, i);
            }
            files.push((path, bytes));
        }
        Ok(Self { files, location })
    }

    /// The file a missing or malformed tensor is reported against.
    fn blame(&self, name: &str) -> PathBuf {
        match self.location.get(name) {
            Some(&i) => self.files[i].0.clone(),
            None if self.files.len() == 1 => self.files[0].0.clone(),
            None => self.files[0]
                .0
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

    /// Reads tensor `name` as f32, checking it has exactly `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.blame(name),
                name: name.to_string(),
            })?;
        let (path, bytes) = &self.files[i];
        let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            detail: e.to_string(),
        })?;
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
        Ok(TensorData::new(values, shape.to_vec()))
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
