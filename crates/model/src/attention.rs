//! Grouped-query self-attention with rotary embeddings (after Qwen3's per-head query and key
//! norms, where the model has them), an optional sliding window, and the key/value cache used
//! for incremental decoding.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor};
use burnish_peft::{AdaptableLinear, cast_to};

use crate::chunked_attention::chunked_causal_attention;
use crate::documents::{Documents, window_first_keys, window_mask};
use crate::norm::RmsNorm;
use crate::rope::Rotations;

/// Keys and values of one layer for the positions seen so far, before the GQA head repeat.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `[batch, kv_heads, seen, head_dim]`
    pub keys: Tensor<B, 4>,
    /// `[batch, kv_heads, seen, head_dim]`
    pub values: Tensor<B, 4>,
}

/// Self-attention of a Llama-style layer (`self_attn.{q,k,v,o}_proj`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: AdaptableLinear<B>,
    pub k_proj: AdaptableLinear<B>,
    pub v_proj: AdaptableLinear<B>,
    pub o_proj: AdaptableLinear<B>,
    /// Qwen3's RMS norms of each query and key head (`[head_dim]` weights), applied before the
    /// rotation; `None` for the other families.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

impl<B: Backend> Attention<B> {
    /// Attends the new positions `start..start + seq` to themselves and to the cached ones.
    /// When `cache` is given, it must hold exactly `start` positions and is extended.
    ///
    /// `documents`, when given, hides keys of other documents (packed rows).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rotations: &Rotations<B>,
        documents: Option<&Documents<B>>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        // [batch, seq, n * head_dim] -> [batch, seq, n, head_dim]
        let split = |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, self.head_dim]);
        // Each head normalised over its own dimensions, where the model has the norms.
        let normed = |t: Tensor<B, 3>, n: usize, norm: &Option<RmsNorm<B>>| match norm {
            Some(norm) => split(norm.forward(t.reshape([batch, seq * n, self.head_dim])), n),
            None => split(t, n),
        };
        let [q, k, v] =
            AdaptableLinear::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x);
        // Rotated as the projections leave them, then viewed as [batch, n, seq, head_dim].
        let q = rotations
            .queries
            .apply(normed(q, self.num_heads, &self.q_norm))
            .swap_dims(1, 2);
        let k = rotations
            .keys
            .apply(normed(k, self.num_kv_heads, &self.k_norm))
            .swap_dims(1, 2);
        let v = split(v, self.num_kv_heads).swap_dims(1, 2);

        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some(past) => (
                        Tensor::cat(vec![past.keys, k], 2),
                        Tensor::cat(vec![past.values, v], 2),
                    ),
                };
                *slot = Some(LayerCache {
                    keys: k.clone(),
                    values: v.clone(),
                });
                (k, v)
            }
        };
        let seen = k.dims()[2];

        let window = self.sliding_window.filter(|&w| seen > w);
        let device = q.device();
        let window_mask = window.map(|w| window_mask::<B>(seq, seen, w, &device));
        // Keys hidden beyond causality, `[batch or 1, 1, seq, seen]`.
        let hidden = match (window_mask, documents) {
            (None, None) => None,
            (Some(w), None) => Some(w),
            (None, Some(d)) => Some(d.hidden.clone()),
            (Some(w), Some(d)) => Some(d.hidden.clone().bool_or(w.expand([batch, 1, seq, seen]))),
        };
        // The same as each query's first visible key, `[batch, seq]`, where the keys a query
        // sees are one run (documents laid out as runs, a window) and there is no cache.
        let first_keys = match (window, documents) {
            _ if seen != seq => None,
            (None, None) => None,
            (None, Some(d)) => d.first_keys.clone(),
            (Some(w), None) => Some(window_first_keys(batch, seq, w, &device)),
            (Some(w), Some(d)) => d
                .first_keys
                .clone()
                .map(|first| first.max_pair(window_first_keys(batch, seq, w, &device))),
        };
        let out = match chunked_causal_attention(&q, &k, &v, hidden.as_ref(), first_keys.as_ref()) {
            Some(out) => out,
            None => {
                // Scores and softmax in f32 whatever the activations' precision.
                let dtype = q.dtype();
                let [q, k, v] = [q, k, v].map(|t| cast_to(t, DType::F32));
                let groups = self.num_heads / self.num_kv_heads;
                let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
                let mask = hidden.map(|h| h.expand([batch, self.num_heads, seq, seen]));
                let options = AttentionModuleOptions {
                    scale: None,
                    softcap: None,
                    is_causal: true,
                };
                cast_to(attention(q, k, v, mask, None, options), dtype)
            }
        };
        // [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// Repeats each key/value head for the `groups` query heads that share it (HF's `repeat_kv`).
///
/// # Shapes
/// - input: `[batch, kv_heads, seq, head_dim]`
/// - output: `[batch, kv_heads · groups, seq, head_dim]`
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let [batch, kv_heads, seq, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, seq, head_dim])
        .reshape([batch, kv_heads * groups, seq, head_dim])
}
