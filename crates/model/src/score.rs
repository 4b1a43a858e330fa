//! Per-token log-likelihood: `log p(ids[i+1] | ids[..=i])` for every position of a sequence.
//! This is the parity probe behind `burnish score`, and the quantity DPO sums. For a sequence
//! classifier (a reward model), sequences' rewards instead.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use burnish_peft::f32_values;

use crate::decoder::{Decoder, scoring_batch};
use crate::error::{ModelError, Result};

/// Refuses a token of `ids` outside `model`'s vocabulary, naming it as a `what` ("token",
/// "prompt token").
pub(crate) fn check_vocabulary<'a, B: Backend>(
    model: &Decoder<B>,
    ids: impl IntoIterator<Item = &'a u32>,
    what: &str,
) -> Result<()> {
    let vocab = model.config.vocab_size;
    match ids.into_iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(ModelError::Input(format!(
            "{what} {bad} is outside the vocabulary (size {vocab})"
        ))),
        None => Ok(()),
    }
}

/// `ids` as a one-row batch for `model`, refused if a token is outside its vocabulary.
fn one_row<B: Backend>(model: &Decoder<B>, ids: &[u32]) -> Result<Tensor<B, 2, Int>> {
    check_vocabulary(model, ids, "token")?;
    Ok(Tensor::from_data(
        TensorData::new(ids.iter().map(|&t| t as i64).collect(), [1, ids.len()]),
        &model.embed_tokens.val().device(),
    ))
}

/// The log-probability of each token of `ids` given the tokens before it (length `n - 1`).
pub fn token_logprobs<B: Backend>(model: &Decoder<B>, ids: &[u32]) -> Result<Vec<f32>> {
    let n = ids.len();
    if n < 2 {
        return Err(ModelError::Input(
            "scoring needs at least two tokens".into(),
        ));
    }
    if model.is_classifier() {
        return Err(ModelError::Input(
            "the model is a sequence classifier (a reward model), which has no LM head to give \
             token log-probabilities; use `batch_rewards`"
                .into(),
        ));
    }
    let to_tensor = |slice: &[u32]| one_row(model, slice);
    // [1, n-1, vocab]: predictions for positions 1..n
    let logits = model.forward(to_tensor(&ids[..n - 1])?);
    let logprobs = log_softmax(logits, 2);
    // [1, n-1, 1]
    let targets = to_tensor(&ids[1..])?.unsqueeze_dim::<3>(2);
    Ok(f32_values(logprobs.gather(2, targets)))
}

/// The first label's score (a reward model's reward) of each of `rows`, read at each row's last
/// token that is not the pad token, as transformers reads it; the rows are padded at the end
/// with the model's pad token into one batch.
pub fn batch_rewards<B: Backend>(model: &Decoder<B>, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
    if !model.is_classifier() {
        return Err(ModelError::Input(
            "the model is a causal LM, not a sequence classifier: it has no scores".into(),
        ));
    }
    if rows.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("scoring needs at least one token".into()));
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    check_vocabulary(model, rows.iter().flatten(), "token")?;
    let device = model.embed_tokens.val().device();
    let (ids, positions) = scoring_batch::<B>(rows, model.config.pad_token_id, &device);
    let scores = model.scores(model.hidden_states(ids), &positions);
    let labels = scores.dims()[1];
    Ok(f32_values(scores).into_iter().step_by(labels).collect())
}
