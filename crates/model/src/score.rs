//! Per-token log-likelihood: `log p(ids[i+1] | ids[..=i])` for every position of a sequence.
//! This is the parity probe behind `burnish score`, and the quantity DPO sums.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use burnish_peft::f32_values;

use crate::decoder::Decoder;
use crate::error::{ModelError, Result};

/// The log-probability of each token of `ids` given the tokens before it (length `n - 1`).
pub fn token_logprobs<B: Backend>(model: &Decoder<B>, ids: &[u32]) -> Result<Vec<f32>> {
    let n = ids.len();
    if n < 2 {
        return Err(ModelError::Input(
            "scoring needs at least two tokens".into(),
        ));
    }
    let vocab = model.config.vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    let device = model.embed_tokens.val().device();
    let to_tensor = |slice: &[u32]| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(slice.iter().map(|&t| t as i64).collect(), [1, slice.len()]),
            &device,
        )
    };
    // [1, n-1, vocab]: predictions for positions 1..n
    let logits = model.forward(to_tensor(&ids[..n - 1]));
    let logprobs = log_softmax(logits, 2);
    // [1, n-1, 1]
    let targets = to_tensor(&ids[1..]).unsqueeze_dim::<3>(2);
    Ok(f32_values(logprobs.gather(2, targets)))
}
