//! A checkpoint directory as transformers writes it, loaded into a ready [`Decoder`].

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burnish_peft::SaveDtype;

use crate::base_dtype::BaseDtype;
use crate::build::build_decoder;
use crate::config::HfConfig;
use crate::decoder::Decoder;
use crate::error::Result;
use crate::generation_config::GenerationConfig;
use crate::weights::{RandomWeights, Weights};

/// A decoder loaded from a local directory, with the configs it came with.
#[derive(Debug)]
pub struct Pretrained<B: Backend> {
    pub model: Decoder<B>,
    pub config: HfConfig,
    pub generation: GenerationConfig,
    pub dir: PathBuf,
}

impl<B: Backend> Pretrained<B> {
    /// Loads `config.json`, `generation_config.json` (if any) and the safetensors weights of
    /// `dir` onto `device`, in f32 (a 4-bit checkpoint's projections read back to f32).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Self::load_in(dir, BaseDtype::F32, device)
    }

    /// [`load`](Self::load) with the base held in `dtype` (resolved: f32, bf16 or nf4; see
    /// [`BaseDtype`]), each layer converted as it is read, so the device never holds the
    /// whole model in f32. Under `nf4` a pre-quantized checkpoint's stored codes are held as
    /// they are.
    pub fn load_in(dir: &Path, dtype: BaseDtype, device: &B::Device) -> Result<Self> {
        let config = HfConfig::from_file(&dir.join("config.json"))?;
        let generation =
            GenerationConfig::from_file_or_default(&dir.join("generation_config.json"))?;
        let weights = Weights::open(dir)?;
        let model = build_decoder(&config.decoder, &weights, dtype, device)?;
        tracing::debug!(dir = %dir.display(), model_type = %config.decoder.model_type, "loaded checkpoint");
        Ok(Self {
            model,
            config,
            generation,
            dir: dir.to_path_buf(),
        })
    }

    /// A model with `dir`'s `config.json` (and generation config) but fresh weights drawn from
    /// `seed`, with the config's `initializer_range` as standard deviation (0.02 when absent):
    /// the start of pre-training from scratch. No weight file is read.
    pub fn random(dir: &Path, seed: u64, device: &B::Device) -> Result<Self> {
        Self::random_in(dir, seed, BaseDtype::F32, device)
    }

    /// [`random`](Self::random) with the base held in `dtype`, as [`load_in`](Self::load_in)
    /// holds it.
    pub fn random_in(dir: &Path, seed: u64, dtype: BaseDtype, device: &B::Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = HfConfig::from_file(&config_path)?;
        let generation =
            GenerationConfig::from_file_or_default(&dir.join("generation_config.json"))?;
        let std = config.initializer_range(&config_path)?;
        let model = build_decoder(&config.decoder, &RandomWeights { seed, std }, dtype, device)?;
        Ok(Self {
            model,
            config,
            generation,
            dir: dir.to_path_buf(),
        })
    }

    /// Loads the base model in `dir`, held in `dtype` as [`load_in`](Self::load_in) holds it,
    /// and, when given, the PEFT-format adapter in `adapter` on top of it (the base is then
    /// frozen).
    pub fn load_with_adapter(
        dir: &Path,
        adapter: Option<&Path>,
        dtype: BaseDtype,
        device: &B::Device,
    ) -> Result<Self> {
        let mut loaded = Self::load_in(dir, dtype, device)?;
        if let Some(adapter) = adapter {
            let (model, _) = loaded.model.with_adapter(adapter)?;
            loaded.model = model;
        }
        Ok(loaded)
    }

    /// The dtype `config.json` declares for the weights (see [`HfConfig::declared_dtype`]).
    pub fn declared_dtype(&self) -> Option<SaveDtype> {
        self.config.declared_dtype()
    }

    /// The tokens that end generation: `generation_config.json`'s `eos_token_id`, else
    /// `config.json`'s.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.generation.eos_token_id {
            Some(ids) => ids.to_vec(),
            None => self.config.decoder.eos_token_ids.clone(),
        }
    }
}
