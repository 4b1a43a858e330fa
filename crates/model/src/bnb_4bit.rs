//! Checkpoints saved from a model that bitsandbytes quantized to 4 bits (the `*-bnb-4bit` models
//! on the Hub). `config.json`'s `quantization_config` names the method; each quantized
//! projection's `<module>.weight` is stored as
//! - `<module>.weight`: the NF4 codes, two to a byte, the first value's in the high four bits,
//!   whatever dtype the tensor is labelled with (`bnb_4bit_quant_storage`);
//! - `.absmax`: each block's absolute maximum in f32; or, with double quantization
//!   (`bnb_4bit_use_double_quant`), 8-bit codes of `maximum − offset`, read back through
//!   `.nested_quant_map` and one `.nested_absmax` per block of them;
//! - `.quant_map`: the sixteen NF4 levels;
//! - `.quant_state.bitsandbytes__nf4`: JSON bytes with the block sizes, the weight's shape and
//!   the offset.
//!
//! The maxima read back as bitsandbytes computes them, in f32:
//! `nested_quant_map[q] · nested_absmax[block] + offset`; a value is `level[code] · maximum`.

use burnish_peft::{NF4_BLOCK, NF4_LEVELS};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;

/// The suffix, after `<module>.weight`, of a 4-bit NF4 weight's quantization state.
pub(crate) const NF4_STATE: &str = ".quant_state.bitsandbytes__nf4";

/// What `config.json`'s `quantization_config` says of the weights: `Ok(false)` without one,
/// `Ok(true)` for bitsandbytes' 4-bit NF4, otherwise why the checkpoint cannot be loaded.
pub(crate) fn stored_in_nf4(config: Option<&Value>) -> Result<bool, String> {
    let Some(config) = config else {
        return Ok(false);
    };
    let text = |key: &str| config.get(key).and_then(Value::as_str);
    let flag = |key: &str| config.get(key).and_then(Value::as_bool) == Some(true);
    let method = text("quant_method").unwrap_or("bitsandbytes");
    if method != "bitsandbytes" {
        return Err(format!(
            "`quant_method = \"{method}\"`: burnish loads bitsandbytes' 4-bit NF4 checkpoints \
             only; use the unquantized model (QLoRA quantizes it with `model.dtype = \"nf4\"`)"
        ));
    }
    if flag("load_in_8bit") {
        return Err(
            "an 8-bit (LLM.int8) checkpoint: burnish loads bitsandbytes' 4-bit NF4 \
                    checkpoints only; use the unquantized model"
                .into(),
        );
    }
    if !flag("load_in_4bit") {
        return Err("bitsandbytes without `load_in_4bit`: nothing burnish can read".into());
    }
    match text("bnb_4bit_quant_type").unwrap_or("fp4") {
        "nf4" => Ok(true),
        other => Err(format!(
            "`bnb_4bit_quant_type = \"{other}\"`: only NF4 codes are implemented; use the \
             unquantized model"
        )),
    }
}

/// A weight's `.quant_state.bitsandbytes__nf4`, as JSON.
#[derive(Debug, Deserialize)]
pub(crate) struct QuantState {
    pub quant_type: String,
    pub blocksize: usize,
    pub shape: Vec<usize>,
    pub nested_blocksize: Option<usize>,
    pub nested_offset: Option<f64>,
}

/// A weight's codes, one per value, and its blocks' maxima, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredNf4 {
    /// One code per value of the weight, row-major.
    pub codes: Vec<u8>,
    /// One per block of `block` values.
    pub maxima: Vec<f32>,
    pub block: usize,
}

impl StoredNf4 {
    /// The weight's values as bitsandbytes dequantizes them: `level[code] · maximum`, in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .par_iter()
            .enumerate()
            .map(|(i, &code)| NF4_LEVELS[usize::from(code)] * self.maxima[i / self.block])
            .collect()
    }

    /// Whether its blocks are [`NF4_BLOCK`] values long, as NF4 weights are held.
    pub fn has_held_blocks(&self) -> bool {
        self.block == NF4_BLOCK
    }
}

/// The first `count` codes of `packed`, two to a byte with the first in the high four bits.
pub(crate) fn unpack_codes(packed: &[u8], count: usize) -> Vec<u8> {
    let mut codes: Vec<u8> = packed
        .par_iter()
        .flat_map_iter(|byte| [byte >> 4, byte & 0xF])
        .collect();
    codes.truncate(count);
    codes
}

#[cfg(test)]
mod tests {
    use super::*;
    use burnish_peft::nested_maxima;
    use serde_json::json;

    #[test]
    fn only_bitsandbytes_nf4_in_four_bits_is_read() {
        let nf4 = json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
                         "bnb_4bit_quant_type": "nf4"});
        assert_eq!(stored_in_nf4(None), Ok(false));
        assert_eq!(stored_in_nf4(Some(&nf4)), Ok(true));
        for (config, says) in [
            (json!({"quant_method": "gptq", "bits": 4}), "gptq"),
            (
                json!({"quant_method": "bitsandbytes", "load_in_8bit": true}),
                "8-bit",
            ),
            (
                json!({"quant_method": "bitsandbytes", "load_in_4bit": true}),
                "fp4",
            ),
            (
                json!({"load_in_4bit": true, "bnb_4bit_quant_type": "fp4"}),
                "only NF4",
            ),
        ] {
            let why = stored_in_nf4(Some(&config)).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
    }

    #[test]
    fn codes_unpack_high_nibble_first_and_maxima_add_the_offset_last() {
        assert_eq!(unpack_codes(&[0x3A, 0xF0], 3), vec![3, 10, 15]);
        let map = [0.5f32, -0.25];
        let maxima = nested_maxima(&[0, 1, 1], &[2.0, 4.0], &map, 2, 0.125);
        assert_eq!(maxima, vec![1.125, -0.375, -0.875]);
        let stored = StoredNf4 {
            codes: vec![0, 15, 7],
            maxima: vec![2.0, 3.0],
            block: 2,
        };
        assert_eq!(stored.dequantize(), vec![-2.0, 2.0, 0.0]);
        assert!(!stored.has_held_blocks());
    }
}
