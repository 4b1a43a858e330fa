//! Autoregressive generation with a KV cache: greedy decoding or seeded sampling with
//! temperature, top-k and top-p (applied in that order, as transformers does), stopping on any
//! of the given end tokens.

use std::ops::ControlFlow;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_peft::f32_values;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::decoder::{Decoder, KvCache};
use crate::error::{ModelError, Result};
use crate::score::check_vocabulary;

/// How the next token is chosen and when generation stops.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

impl GenerateOptions {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ModelError::Input(m.into()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if self.top_k == Some(0) {
            return bad("top-k must be at least 1");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("top-p must be in (0, 1]");
        }
        Ok(())
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new token as it
/// is chosen (return `ControlFlow::Break` to stop early). Returns the new tokens, the stop token
/// included when one was produced.
pub fn generate<B: Backend>(
    model: &Decoder<B>,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>> {
    options.validate()?;
    check_prompt(model, prompt)?;
    let device = model.embed_tokens.val().device();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut cache = KvCache::new(model.layers.len());
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < options.max_new_tokens {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(input.iter().map(|&t| t as i64).collect(), [1, input.len()]),
            &device,
        );
        let logits = model.forward_cached(ids, &mut cache);
        let [_, seq, _] = logits.dims();
        let last = f32_values(logits.narrow(1, seq - 1, 1));
        let token = choose(&last, options, &mut rng);
        out.push(token);
        if options.stop_tokens.contains(&token) || on_token(token).is_break() {
            break;
        }
        input = vec![token];
    }
    Ok(out)
}

/// `count` completions of `prompt` sampled side by side in one batch (a GRPO group): row `i`
/// draws from its own stream, seeded with `options.seed + i`, and stops on a stop token (which
/// it keeps) or at `max_new_tokens`; rows that stopped ride along until every row has.
pub fn sample_group<B: Backend>(
    model: &Decoder<B>,
    prompt: &[u32],
    count: usize,
    options: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    options.validate()?;
    check_prompt(model, prompt)?;
    let device = model.embed_tokens.val().device();
    let mut rngs: Vec<StdRng> = (0..count)
        .map(|i| StdRng::seed_from_u64(options.seed.wrapping_add(i as u64)))
        .collect();
    let mut cache = KvCache::new(model.layers.len());
    let mut input: Vec<u32> = prompt.repeat(count);
    let mut width = prompt.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); count];
    let mut done = vec![false; count];
    for _ in 0..options.max_new_tokens {
        if done.iter().all(|&d| d) {
            break;
        }
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(input.iter().map(|&t| t as i64).collect(), [count, width]),
            &device,
        );
        let logits = model.forward_cached(ids, &mut cache);
        let [_, seq, _] = logits.dims();
        let last = f32_values(logits.narrow(1, seq - 1, 1));
        input.clear();
        for (row, logits) in last.chunks(model.config.vocab_size).enumerate() {
            let token = choose(logits, options, &mut rngs[row]);
            if !done[row] {
                out[row].push(token);
                done[row] = options.stop_tokens.contains(&token);
            }
            input.push(token);
        }
        width = 1;
    }
    Ok(out)
}

/// Refuses an empty prompt and tokens outside `model`'s vocabulary.
fn check_prompt<B: Backend>(model: &Decoder<B>, prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    check_vocabulary(model, prompt, "prompt token")
}

/// Picks the next token from one position's logits.
fn choose(logits: &[f32], options: &GenerateOptions, rng: &mut StdRng) -> u32 {
    if options.temperature == 0.0 {
        return argmax(logits);
    }
    if options.top_k.is_none() && options.top_p.is_none() {
        // The whole distribution: one pass in token order, no sort of the vocabulary.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| f64::from((l - max) / options.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut draw = f64::from(rng.random::<f32>()) * total;
        let mut last = argmax(logits);
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                if draw < *w {
                    return i as u32;
                }
                last = i as u32;
            }
            draw -= w;
        }
        return last;
    }
    // (token, scaled logit), most likely first; ties keep the lower id first.
    let mut ranked: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / options.temperature))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = options.top_k {
        ranked.truncate(k.max(1));
    }
    let max = ranked[0].1;
    let weights: Vec<f32> = ranked.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut keep = weights.len();
    if let Some(p) = options.top_p {
        let mut cumulative = 0.0;
        for (i, w) in weights.iter().enumerate() {
            if cumulative >= p {
                keep = i.max(1);
                break;
            }
            cumulative += w / total;
        }
    }
    let kept_total: f32 = weights[..keep].iter().sum();
    let mut draw = rng.random::<f32>() * kept_total;
    for (i, w) in weights[..keep].iter().enumerate() {
        if draw < *w {
            return ranked[i].0;
        }
        draw -= w;
    }
    ranked[keep - 1].0
}

/// The index of the largest logit; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(options: &GenerateOptions, logits: &[f32], draws: usize) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(options.seed);
        (0..draws)
            .map(|_| choose(logits, options, &mut rng))
            .collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let options = GenerateOptions {
            temperature: 5.0,
            top_k: Some(1),
            ..Default::default()
        };
        assert!(
            sample(&options, &[0.0, 2.0, 1.0], 50)
                .iter()
                .all(|&t| t == 1)
        );
    }

    /// Without top-k or top-p, tokens are drawn in proportion to `softmax(logits / T)`.
    #[test]
    fn plain_sampling_follows_the_softmax() {
        let options = GenerateOptions {
            temperature: 2.0,
            ..Default::default()
        };
        let logits = [2.0f32, 1.0, 0.0];
        let weights: Vec<f32> = logits.iter().map(|l| (l / 2.0f32).exp()).collect();
        let total: f32 = weights.iter().sum();
        let draws = 20_000;
        let drawn = sample(&options, &logits, draws);
        for (token, w) in weights.iter().enumerate() {
            let share =
                drawn.iter().filter(|&&t| t as usize == token).count() as f32 / draws as f32;
            assert!(
                (share - w / total).abs() < 0.015,
                "token {token}: {share} vs {}",
                w / total
            );
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.665, 0.245, 0.09]: p = 0.6 keeps only the first token,
        // p = 0.8 keeps the first two.
        let logits = [2.0, 1.0, 0.0];
        let narrow = GenerateOptions {
            temperature: 1.0,
            top_p: Some(0.6),
            ..Default::default()
        };
        assert!(sample(&narrow, &logits, 100).iter().all(|&t| t == 0));
        let wider = GenerateOptions {
            top_p: Some(0.8),
            ..narrow
        };
        let drawn = sample(&wider, &logits, 400);
        assert!(drawn.contains(&0) && drawn.contains(&1) && !drawn.contains(&2));
    }

    #[test]
    fn same_seed_same_samples() {
        let options = GenerateOptions {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let logits = [0.5, 0.4, 0.3, 0.2, 0.1];
        assert_eq!(sample(&options, &logits, 64), sample(&options, &logits, 64));
    }
}
