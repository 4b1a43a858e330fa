//! The Llama-style decoder (Llama, Mistral, Qwen2 and their derivatives): token embedding,
//! pre-norm layers of attention and SwiGLU, final RMSNorm and the LM head (tied or not), or, for
//! a sequence classifier (a reward model), a `score` head read at each row's last token.
//! Field names follow the checkpoint keys, so `model.layers.3.mlp.up_proj.weight` is
//! `layers[3].mlp.up_proj.weight`.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::DropoutConfig;
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{DType, Distribution, ElementConversion, FloatDType, Int, Tensor};
use std::path::Path;

use burnish_peft::{
    AdaptableLinear, LoraConfig, Selected, Task, WholeModule, attach_lora, cast_to, load_adapter,
    project,
};

use crate::attention::{Attention, LayerCache};
use crate::config::DecoderConfig;
use crate::documents::Documents;
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::{Rope, Rotations};
use crate::weights::{RandomWeights, TensorSource};

/// The projections of every layer, in checkpoint order, by their name within the layer.
pub const LAYER_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The module names of every linear layer of a decoder with this config, as
/// [`Decoder::linears`] names them: known before any weight is loaded.
pub fn linear_module_names(c: &DecoderConfig) -> Vec<String> {
    let mut names: Vec<String> = (0..c.num_layers)
        .flat_map(|i| {
            LAYER_PROJECTIONS
                .iter()
                .map(move |p| format!("model.layers.{i}.{p}"))
        })
        .collect();
    if !c.tie_word_embeddings && c.classifier_labels.is_none() {
        names.push("lm_head".into());
    }
    names
}

/// Where a sequence classifier reads a row's score, as transformers does: at its last token that
/// is not `pad` (so a row that ends with the pad token is read before it), or at its last token
/// when there is no pad token; at 0 when every token is `pad`.
pub fn scored_position(row: &[u32], pad: Option<u32>) -> usize {
    match pad {
        Some(pad) => row.iter().rposition(|&t| t != pad).unwrap_or(0),
        None => row.len().saturating_sub(1),
    }
}

/// `rows` padded at the end with `pad` (0 without one) into one batch, and the position each
/// row is scored at ([`scored_position`]): what a sequence classifier reads, in training and in
/// scoring alike.
pub fn scoring_batch<B: Backend>(
    rows: &[Vec<u32>],
    pad: Option<u32>,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Vec<usize>) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let fill = i64::from(pad.unwrap_or(0));
    let mut ids = Vec::with_capacity(rows.len() * width);
    for row in rows {
        ids.extend(row.iter().map(|&t| i64::from(t)));
        ids.extend(std::iter::repeat_n(fill, width - row.len()));
    }
    let positions = rows.iter().map(|r| scored_position(r, pad)).collect();
    let ids = Tensor::from_data(
        burn::tensor::TensorData::new(ids, [rows.len(), width]),
        device,
    );
    (ids, positions)
}

/// One transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        rotations: &Rotations<B>,
        documents: Option<&Documents<B>>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rotations, documents, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// Whether any parameter of `module` gets a gradient.
pub(crate) fn trains<B: Backend, M: Module<B>>(module: &M) -> bool {
    struct Trained(bool);
    impl<B: Backend> ModuleVisitor<B> for Trained {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= param.val().is_require_grad();
        }
    }
    let mut trained = Trained(false);
    module.visit(&mut trained);
    trained.0
}

/// The seeds a pass gives each layer's dropout (see [`Decoder::dropout_seeds`]).
#[derive(Debug)]
pub(crate) struct DropoutSeeds<B: Backend> {
    /// `None` when the pass applies no dropout.
    base: Option<u64>,
    device: B::Device,
}

impl<B: Backend> DropoutSeeds<B> {
    /// Restarts the backend's generator for layer `layer`'s draws.
    pub(crate) fn reseed(&self, layer: usize) {
        if let Some(base) = self.base {
            B::seed(&self.device, base.wrapping_add(layer as u64));
        }
    }
}

/// The keys and values of every layer for the positions decoded so far.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Number of positions already held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A decoder-only causal language model.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to `embed_tokens`, or when the model is a classifier.
    pub lm_head: Option<AdaptableLinear<B>>,
    /// A sequence classifier's head `[labels, hidden]` (transformers' `score`, no bias): the
    /// model then scores sequences and has no LM head. `None` for a causal LM.
    pub score: Option<Param<Tensor<B, 2>>>,
    #[module(skip)]
    pub config: DecoderConfig,
    #[module(skip)]
    pub rope: Rope,
    /// The precision activations flow in between the layers' ops (f32 unless
    /// [`compute_in`](Self::compute_in) says otherwise). Norms, attention scores and softmax,
    /// adapters and logits compute in f32 whatever it is.
    #[module(skip)]
    pub(crate) activations: FloatDType,
    /// NEFTune: while the model trains, noise drawn uniformly from `±α/√(seq·hidden)` is added
    /// to the token embeddings, as transformers' `neftune_noise_alpha` does; `None` for none.
    #[module(skip)]
    pub neftune_noise_alpha: Option<f64>,
}

impl<B: Backend> Decoder<B> {
    /// Next-token logits for every position of `ids`, from scratch.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.head(self.hidden_states(ids))
    }

    /// The final hidden states (after the last norm) of every position of `ids`: what the LM
    /// head turns into logits.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let (rotations, documents) = self.context(&ids, None);
        self.trunk(ids, &rotations, documents.as_ref(), None)
    }

    /// Next-token logits for rows that each hold several documents back to back: `positions`
    /// restart at 0 for every document and `segments` number the documents of a row (equal
    /// ids attend to each other, causally; different ids never do). Both are `batch × seq`,
    /// row-major. Every document gets exactly the logits it would get alone.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &[usize],
        segments: &[u32],
    ) -> Tensor<B, 3> {
        self.head(self.hidden_states_packed(ids, positions, segments))
    }

    /// The final hidden states of packed rows (see [`forward_packed`](Self::forward_packed)).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &[usize],
        segments: &[u32],
    ) -> Tensor<B, 3> {
        let (rotations, documents) = self.context(&ids, Some((positions, segments)));
        self.trunk(ids, &rotations, documents.as_ref(), None)
    }

    /// What every layer of a pass over `ids` shares: the rotary embeddings of its positions
    /// and, for packed rows (`packing` = per-token positions and document ids, `batch × seq`,
    /// row-major), their documents (which keys each query must not see).
    pub(crate) fn context(
        &self,
        ids: &Tensor<B, 2, Int>,
        packing: Option<(&[usize], &[u32])>,
    ) -> (Rotations<B>, Option<Documents<B>>) {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let Some((positions, segments)) = packing else {
            let positions: Vec<usize> = (0..seq).collect();
            return (self.rotations(&positions, 1, &device), None);
        };
        assert_eq!(positions.len(), batch * seq, "one position per token");
        let documents = Documents::of_segments(segments, batch, seq, &device);
        (self.rotations(positions, batch, &device), Some(documents))
    }

    /// Logits for the new positions `ids`, which follow the `cache.len()` positions in `cache`;
    /// the cache is extended with them.
    ///
    /// # Shapes
    /// - ids: `[batch, new]`
    /// - output: `[batch, new, vocab]`
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let start = cache.len;
        let new = ids.dims()[1];
        cache.len += new;
        let positions: Vec<usize> = (start..start + new).collect();
        let rotations = self.rotations(&positions, 1, &ids.device());
        self.head(self.trunk(ids, &rotations, None, Some(&mut cache.layers)))
    }

    /// Logits of final hidden states, in f32: the LM head, or the embedding matrix when tied.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`
    /// - output: `[batch, seq, vocab]`
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => project(hidden, self.embed_tokens.val()),
        };
        cast_to(logits, DType::F32)
    }

    /// Whether the model is a sequence classifier (a reward model): it scores sequences with
    /// [`scores`](Self::scores) and has no LM head.
    pub fn is_classifier(&self) -> bool {
        self.score.is_some()
    }

    /// The model as a sequence classifier with `head` (`[labels, hidden]`) as its `score` head:
    /// its LM head, if untied, is dropped, as transformers' `*ForSequenceClassification` loads a
    /// causal LM's checkpoint without it. The head is trainable.
    pub fn into_classifier(mut self, head: Tensor<B, 2>) -> Self {
        let labels = head.dims()[0];
        self.lm_head = None;
        self.score = Some(Param::from_tensor(head).set_require_grad(true));
        self.config.classifier_labels = Some(labels);
        self
    }

    /// The modules an adapter of this model saves whole beside its adapters: a classifier's
    /// `score` head (PEFT's `modules_to_save` for a SEQ_CLS task); none for a causal LM.
    pub fn whole_modules(&self) -> Vec<WholeModule<B>> {
        self.score
            .iter()
            .map(|head| WholeModule {
                name: "score".into(),
                weight: head.val(),
            })
            .collect()
    }

    /// The model as a reward model: a one-label classifier whose fresh `score` head is drawn
    /// from `seed` with standard deviation `std` (uniformly, as [`RandomWeights`] draws; the
    /// config's `initializer_range` is what transformers uses).
    pub fn into_reward_model(self, seed: u64, std: f32) -> Self {
        let hidden = self.config.hidden_size;
        let head = RandomWeights { seed, std }
            .read("score.weight", &[1, hidden])
            .expect("random weights are drawn, never read");
        let device = self.embed_tokens.val().device();
        self.into_classifier(Tensor::from_data(head, &device))
    }

    /// Each row's scores (`[rows, labels]`, in f32) from its final `hidden` states, read at
    /// position `positions[row]` (see [`scored_position`]).
    ///
    /// # Panics
    /// If the model is not a classifier, or `positions` does not hold one position per row.
    ///
    /// # Shapes
    /// - hidden: `[rows, seq, hidden]`
    /// - output: `[rows, labels]`
    pub fn scores(&self, hidden: Tensor<B, 3>, positions: &[usize]) -> Tensor<B, 2> {
        let head = self
            .score
            .as_ref()
            .expect("scores need a classifier's head");
        let [rows, seq, width] = hidden.dims();
        assert_eq!(positions.len(), rows, "one scored position per row");
        let flat: Vec<i64> = positions
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * seq + p) as i64)
            .collect();
        let device = hidden.device();
        let picked = hidden.reshape([rows * seq, width]).select(
            0,
            Tensor::<B, 1, Int>::from_data(burn::tensor::TensorData::new(flat, [rows]), &device),
        );
        cast_to(picked, DType::F32).matmul(head.val().transpose())
    }

    /// Whether any of the model's parameters gets a gradient (false for an evaluation copy,
    /// see [`for_evaluation`](Self::for_evaluation)).
    pub fn trains(&self) -> bool {
        trains(self)
    }

    /// The bytes the model's parameters hold as it holds them (a base in bf16 or as NF4 codes,
    /// adapters, norms and embeddings), whatever memory allocators keep besides.
    pub fn parameter_bytes(&self) -> u64 {
        struct Bytes(u64);
        impl<B: Backend> ModuleVisitor<B> for Bytes {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let t = param.val();
                self.0 += (t.shape().num_elements() * t.dtype().size()) as u64;
            }
        }
        let mut bytes = Bytes(0);
        self.visit(&mut bytes);
        bytes.0
    }

    /// The head's weight `[vocab, hidden]` when the head is a plain frozen matrix (tied to an
    /// embedding that gets no gradient, or an `lm_head` without bias, active adapter or
    /// gradient): then `head(h)` is `project(h, weight)`, and a loss may compute it its own way.
    pub fn frozen_head_weight(&self) -> Option<Tensor<B, 2>> {
        match &self.lm_head {
            Some(head) => head.frozen_weight(),
            None => {
                let weight = self.embed_tokens.val();
                (!weight.is_require_grad()).then_some(weight)
            }
        }
    }

    /// Every linear layer with its module name (`model.layers.0.self_attn.q_proj`, ...,
    /// `lm_head` when untied), in checkpoint order: what adapters attach to.
    pub fn linears(&self) -> Vec<(String, &AdaptableLinear<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            let layers = [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ];
            for (name, linear) in LAYER_PROJECTIONS.iter().zip(layers) {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// [`Decoder::linears`], mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut AdaptableLinear<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            let layers = [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ];
            for (name, linear) in LAYER_PROJECTIONS.iter().zip(layers) {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Freezes every base weight, then attaches fresh LoRA adapters (B = 0, so outputs do not
    /// change) to the modules `config` targets: afterwards only adapter tensors are trainable.
    pub fn with_lora(
        self,
        config: &LoraConfig,
        seed: u64,
    ) -> burnish_peft::Result<(Self, Vec<Selected>)> {
        let mut model = self.no_grad();
        let selected = attach_lora(&mut model.linears_mut(), config, seed)?;
        Ok((model, selected))
    }

    /// Freezes every base weight, then loads the PEFT-format adapter in `dir` onto its modules.
    /// A sequence classifier's adapter (`task_type` SEQ_CLS) also brings its `score` head, which
    /// makes the model a classifier (frozen, like the rest).
    pub fn with_adapter(self, dir: &Path) -> burnish_peft::Result<(Self, LoraConfig)> {
        let mut model = self.no_grad();
        let (config, whole) = load_adapter(dir, &mut model.linears_mut())?;
        let weights_path = || dir.join(burnish_peft::ADAPTER_WEIGHTS_FILE);
        if let Some(extra) = whole.get(1) {
            return Err(burnish_peft::PeftError::UnexpectedTensor {
                path: weights_path(),
                name: format!(
                    "base_model.model.{}.weight (a second classifier head)",
                    extra.name
                ),
            });
        }
        for module in whole {
            let [labels, width] = module.weight.dims();
            let hidden = model.config.hidden_size;
            if labels == 0 || width != hidden {
                return Err(burnish_peft::PeftError::ShapeMismatch {
                    path: weights_path(),
                    name: format!("base_model.model.{}.weight", module.name),
                    expected: vec![1, hidden],
                    found: vec![labels, width],
                });
            }
            model = model.into_classifier(module.weight).no_grad();
        }
        if config.task == Task::SequenceClassification && !model.is_classifier() {
            return Err(burnish_peft::PeftError::MissingTensor {
                path: weights_path(),
                name: "base_model.model.score.weight (a SEQ_CLS adapter on a causal LM needs \
                       its classifier head)"
                    .into(),
            });
        }
        Ok((model, config))
    }

    /// Holds every linear layer's base weight in `dtype` and freezes it, and the token
    /// embedding too when it is the (tied) LM head and frozen; the norms, adapters and
    /// activations keep their precision. For inference and adapter training, never for full
    /// fine-tuning.
    pub fn hold_base_in(&mut self, dtype: FloatDType) {
        for (_, linear) in self.linears_mut() {
            linear.hold_base_in(dtype);
        }
        let embedding = self.embed_tokens.val();
        if self.lm_head.is_none() && !embedding.is_require_grad() {
            self.embed_tokens = Param::from_tensor(embedding.cast(dtype)).set_require_grad(false);
        }
    }

    /// Runs the activations between the layers' ops in `dtype` (bf16 halves their memory and
    /// the traffic of the element-wise ops, as transformers does for a model loaded in bf16);
    /// RMSNorm, attention scores and softmax, adapters and logits still compute in f32. Meant
    /// for a frozen base held in `dtype` on a GPU ([`Pretrained::load_in`](crate::Pretrained::load_in)
    /// decides); on the CPU, whose kernels take f32, the layers fall back to burn's ops.
    pub fn compute_in(&mut self, dtype: FloatDType) {
        self.activations = dtype;
    }

    /// A copy for passes that train nothing under an autodiff backend (evaluation during
    /// training): its adapters apply no dropout and none of its parameters is tracked, so no
    /// graph is recorded; what `model.eval()` under `torch.no_grad()` gives in PyTorch.
    pub fn for_evaluation(&self) -> Self {
        let mut model = self.clone().no_grad();
        for (_, linear) in model.linears_mut() {
            if let Some(lora) = &mut linear.lora {
                lora.dropout = DropoutConfig::new(0.0).init();
            }
        }
        model
    }

    /// Switches every adapter on or off; off, the model computes exactly its base.
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, linear) in self.linears_mut() {
            linear.adapter_enabled = enabled;
        }
    }

    /// Folds every adapter into its base weight and drops it (PEFT's `merge_and_unload`).
    /// All or nothing: if any merged weight would not be finite, the model is left unchanged.
    pub fn merge_and_unload(&mut self) -> burnish_peft::Result<()> {
        let merged = self
            .linears()
            .into_iter()
            .map(|(name, linear)| linear.merged_weight(&name))
            .collect::<burnish_peft::Result<Vec<_>>>()?;
        for ((_, linear), weight) in self.linears_mut().into_iter().zip(merged) {
            if let Some(weight) = weight {
                linear.set_merged_weight(weight);
            }
            linear.lora = None;
            linear.merged = false;
        }
        Ok(())
    }

    /// The rotary embeddings of `positions` (`rows × seq`, or one row shared by all) for this
    /// model's query and key heads.
    fn rotations(&self, positions: &[usize], rows: usize, device: &B::Device) -> Rotations<B> {
        let heads = [self.config.num_heads, self.config.num_kv_heads];
        self.rope
            .rotations(positions, rows, heads, device)
            .cast(self.activations)
    }

    /// The layers and the final norm, from token ids to final hidden states.
    fn trunk(
        &self,
        ids: Tensor<B, 2, Int>,
        rotations: &Rotations<B>,
        documents: Option<&Documents<B>>,
        mut cache: Option<&mut Vec<Option<LayerCache<B>>>>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed(ids);
        let seeds = self.dropout_seeds(&x.device());
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|layers| &mut layers[i]);
            seeds.reseed(i);
            x = layer.forward(x, rotations, documents, slot);
        }
        seeds.reseed(self.layers.len());
        self.norm.forward(x)
    }

    /// The embeddings of `ids`, in the activations' precision whatever precision the embedding
    /// is held in.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub(crate) fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let embedded = embedding(self.embed_tokens.val(), ids);
        let embedded = match self.neftune_noise_alpha {
            Some(alpha) if self.trains() => {
                let [_, seq, hidden] = embedded.dims();
                let bound = alpha / ((seq * hidden) as f64).sqrt();
                let noise = Tensor::random(
                    embedded.shape(),
                    Distribution::Uniform(-bound, bound),
                    &embedded.device(),
                );
                embedded + noise
            }
            _ => embedded,
        };
        embedded.cast(self.activations)
    }

    /// Where adapters apply dropout (a training pass with a dropout probability above 0), one
    /// seed per pass drawn from the backend's generator, from which each layer's draws restart,
    /// and what follows the layers: a layer recomputed from its input (activation
    /// checkpointing) draws the same masks, and the draws after it do not depend on whether
    /// layers were recomputed.
    pub(crate) fn dropout_seeds(&self, device: &B::Device) -> DropoutSeeds<B> {
        let dropout = || {
            self.linears().iter().any(|(_, linear)| {
                linear.adapter_enabled && linear.lora.as_ref().is_some_and(|l| l.dropout.prob > 0.0)
            })
        };
        let base = (B::ad_enabled(device) && dropout()).then(|| {
            let draw = Tensor::<B, 1>::random([1], Distribution::Uniform(0.0, 1.0), device);
            (draw.into_scalar().elem::<f64>() * f64::from(u32::MAX)) as u64
        });
        DropoutSeeds {
            base,
            device: device.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base_dtype::BaseDtype;
    use crate::build::build_decoder;
    use crate::config::HfConfig;
    use crate::weights::RandomWeights;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    type AD = Autodiff<Flex>;

    /// NEFTune's noise: uniform within `±α/√(seq·hidden)` on the trained forward pass, drawn
    /// from the backend's seeded stream, and none once the model is set up for evaluation.
    #[test]
    fn neftune_adds_bounded_uniform_noise_while_training_only() {
        let config = HfConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let device = Default::default();
        let mut model: Decoder<AD> = build_decoder(
            &config.decoder,
            &RandomWeights { seed: 0, std: 0.02 },
            BaseDtype::F32,
            &device,
        )
        .unwrap();
        assert!(model.trains());
        let (rows, seq) = (4, 50);
        let ids: Vec<i64> = (0..rows * seq).map(|i| (i * 7 % 64) as i64).collect();
        let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [rows, seq]), &device);
        let values = |t: Tensor<AD, 3>| t.into_data().to_vec::<f32>().unwrap();
        let clean = values(model.embed(ids.clone()));

        let alpha = 5.0;
        model.neftune_noise_alpha = Some(alpha);
        let noisy = |model: &Decoder<AD>| {
            AD::seed(&device, 7);
            values(model.embed(ids.clone()))
        };
        let first = noisy(&model);
        assert_eq!(first, noisy(&model), "the same seed draws the same noise");
        let noise: Vec<f64> = first
            .iter()
            .zip(&clean)
            .map(|(n, c)| f64::from(n - c))
            .collect();
        let bound = alpha / ((seq * 32) as f64).sqrt();
        let largest = noise.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let mean = noise.iter().sum::<f64>() / noise.len() as f64;
        let mean_abs = noise.iter().map(|v| v.abs()).sum::<f64>() / noise.len() as f64;
        assert!(largest <= bound * (1.0 + 1e-5), "{largest} > {bound}");
        assert!(
            largest >= 0.99 * bound,
            "{largest} fills too little of ±{bound}"
        );
        assert!(mean.abs() < 0.02 * bound, "mean {mean}");
        assert!(
            (mean_abs / bound - 0.5).abs() < 0.02,
            "mean |noise| {mean_abs}"
        );

        assert_eq!(
            noisy(&model.for_evaluation()),
            clean,
            "no noise in evaluation"
        );
    }
}
