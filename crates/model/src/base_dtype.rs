//! The precision a model's frozen base weights are held in (`model.dtype` in recipes, `--dtype`
//! on the command line). Activations, adapters, optimizer state and losses stay f32.

use std::fmt;
use std::str::FromStr;

use burn::tensor::FloatDType;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::Decoder;

/// Precision of the frozen base weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseDtype {
    /// Full precision, as loaded.
    #[default]
    F32,
    /// bfloat16: half the memory; each product takes bf16 inputs and returns f32 activations.
    Bf16,
}

impl BaseDtype {
    /// Holds `model`'s linear base weights in this precision, frozen (nothing to do for f32).
    /// For inference and adapter training only: a weight held this way is never updated.
    pub fn apply<B: Backend>(self, model: &mut Decoder<B>) {
        if self == Self::Bf16 {
            model.hold_base_in(FloatDType::BF16);
        }
    }
}

impl FromStr for BaseDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown dtype `{other}`: use f32 or bf16")),
        }
    }
}

impl fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}
