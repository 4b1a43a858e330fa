//! The precision a model's frozen base weights are held in (`model.dtype` in recipes, `--dtype`
//! on the command line), and on GPUs the activations' too. Adapters, optimizer state and losses
//! stay f32. The default, `auto`, is bf16 on a GPU when the base is frozen and f32 otherwise;
//! `nf4` holds the layers' projections as 4-bit NormalFloat codes (QLoRA), their block maxima
//! double-quantized, and `nf4-plain` the same with the maxima as they are.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use burn::tensor::FloatDType;
use burn::tensor::backend::Backend;
use burnish_peft::on_cpu;
use serde::{Deserialize, Serialize};

use crate::Decoder;

/// Precision of the frozen base weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseDtype {
    /// bf16 on a GPU that computes in bf16 when the base is frozen (an adapter trains, or
    /// nothing does), f32 otherwise: see [`resolve`](Self::resolve).
    #[default]
    Auto,
    /// Full precision, as loaded.
    F32,
    /// bfloat16: half the memory. On GPUs the activations are bf16 too; on the CPU each
    /// product takes bf16 weights and returns f32 activations.
    Bf16,
    /// QLoRA's 4-bit base: every decoder layer's projections held as NF4 codes, quantized as
    /// bitsandbytes quantizes them, their block maxima double-quantized (bitsandbytes'
    /// `bnb_4bit_use_double_quant`, as the QLoRA paper, Axolotl and Unsloth quantize), and read
    /// back in the activations' precision for each product (bf16 on GPUs, f32 on the CPU); the
    /// embedding and LM head stay as for `bf16` on GPUs and in f32 on the CPU, as transformers
    /// leaves them unquantized.
    Nf4,
    /// [`Nf4`](Self::Nf4) with each block's maximum as it is (`BitsAndBytesConfig`'s default,
    /// TRL's without `use_bnb_nested_quant`).
    Nf4Plain,
}

impl BaseDtype {
    /// The concrete precision on a GPU that computes in bf16 (`on_gpu`) or elsewhere, for a base
    /// that stays frozen (`frozen`) or trains: `auto` is bf16 only for a frozen base on such a
    /// GPU, where it halves the weights' memory and their products run on bf16 tensor cores; on
    /// the CPU bf16 saves memory but costs time.
    pub fn resolve(self, on_gpu: bool, frozen: bool) -> Self {
        match self {
            Self::Auto if on_gpu && frozen => Self::Bf16,
            Self::Auto => Self::F32,
            concrete => concrete,
        }
    }

    /// Whether the layers' projections are held as NF4 codes.
    pub fn is_nf4(self) -> bool {
        matches!(self, Self::Nf4 | Self::Nf4Plain)
    }

    /// Holds `model`'s weights that are not NF4 codes, frozen, in
    /// [`dense_weights`](Self::dense_weights) (nothing to do for f32; an unresolved `auto`
    /// counts as f32), and runs the activations in [`activations`](Self::activations): on GPUs
    /// in the base's precision, as transformers does with a model loaded in bf16 (the CPU's
    /// kernels take f32 activations). [`Pretrained::load_in`](crate::Pretrained::load_in) holds
    /// the layers' projections as it reads them, then calls this for the rest. For inference
    /// and adapter training only: a weight held this way is never updated.
    pub(crate) fn hold_dense<B: Backend>(self, model: &mut Decoder<B>) {
        let dense = self.dense_weights::<B>();
        if dense != FloatDType::F32 {
            model.hold_base_in(dense);
        }
        model.compute_in(self.activations::<B>());
    }

    /// The precision of the frozen weights not held as NF4 codes on backend `B`: bf16 for a
    /// bf16 base, and for an NF4 base's unquantized weights the activations' precision (as
    /// transformers holds them in its compute dtype); f32 otherwise.
    pub fn dense_weights<B: Backend>(self) -> FloatDType {
        match self {
            Self::Bf16 => FloatDType::BF16,
            Self::Nf4 | Self::Nf4Plain => self.activations::<B>(),
            Self::Auto | Self::F32 => FloatDType::F32,
        }
    }

    /// The precision the activations run in over a base held in this precision on backend
    /// `B`: bf16 with a bf16 or NF4 base on a GPU (unless [`ACTIVATIONS_ENV`] is `f32`), f32
    /// otherwise.
    pub fn activations<B: Backend>(self) -> FloatDType {
        let sixteen_bit = self == Self::Bf16 || self.is_nf4();
        if sixteen_bit && !on_cpu::<B>() && !f32_activations_asked() {
            FloatDType::BF16
        } else {
            FloatDType::F32
        }
    }
}

/// The environment variable that keeps the activations in f32 under a bf16 base on a GPU
/// (`BURNISH_ACTIVATIONS=f32`), for side-by-side measurements; unset, they follow the base.
pub const ACTIVATIONS_ENV: &str = "BURNISH_ACTIVATIONS";

/// Whether [`ACTIVATIONS_ENV`] asks for f32 activations, read once per process; any other value
/// than `f32` or `bf16` is reported and leaves the default.
fn f32_activations_asked() -> bool {
    static ASKED: OnceLock<bool> = OnceLock::new();
    *ASKED.get_or_init(|| match std::env::var(ACTIVATIONS_ENV).as_deref() {
        Ok("f32") => true,
        Ok("bf16") | Err(_) => false,
        Ok(other) => {
            tracing::warn!("{ACTIVATIONS_ENV}={other} is neither `f32` nor `bf16`; ignored");
            false
        }
    })
}

impl FromStr for BaseDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "nf4" => Ok(Self::Nf4),
            "nf4-plain" => Ok(Self::Nf4Plain),
            other => Err(format!(
                "unknown dtype `{other}`: use auto, f32, bf16, nf4 or nf4-plain"
            )),
        }
    }
}

impl fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Nf4 => "nf4",
            Self::Nf4Plain => "nf4-plain",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_bf16_only_for_a_frozen_base_on_a_gpu() {
        assert_eq!(BaseDtype::Auto.resolve(true, true), BaseDtype::Bf16);
        assert_eq!(BaseDtype::Auto.resolve(true, false), BaseDtype::F32);
        assert_eq!(BaseDtype::Auto.resolve(false, true), BaseDtype::F32);
        for concrete in [
            BaseDtype::F32,
            BaseDtype::Bf16,
            BaseDtype::Nf4,
            BaseDtype::Nf4Plain,
        ] {
            assert_eq!(concrete.resolve(true, true), concrete);
            assert_eq!(concrete.resolve(false, false), concrete);
        }
    }

    #[test]
    fn the_cpu_keeps_f32_activations_under_a_bf16_base() {
        use burn::backend::{Autodiff, Flex};
        for dtype in [
            BaseDtype::F32,
            BaseDtype::Bf16,
            BaseDtype::Nf4,
            BaseDtype::Nf4Plain,
        ] {
            assert_eq!(dtype.activations::<Flex>(), FloatDType::F32);
            assert_eq!(dtype.activations::<Autodiff<Flex>>(), FloatDType::F32);
        }
    }

    #[test]
    fn names_round_trip() {
        for dtype in [
            BaseDtype::Auto,
            BaseDtype::F32,
            BaseDtype::Bf16,
            BaseDtype::Nf4,
            BaseDtype::Nf4Plain,
        ] {
            assert_eq!(dtype.to_string().parse(), Ok(dtype));
        }
        assert!(
            "fp16"
                .parse::<BaseDtype>()
                .unwrap_err()
                .contains("auto, f32, bf16, nf4 or nf4-plain")
        );
    }
}
