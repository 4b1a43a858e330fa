//! Assembling a [`Decoder`] from a config and a [`TensorSource`], under Hugging Face key names,
//! each layer's projections held in the base's precision as they are read, so that no more than
//! one f32 weight is on the device beside the held model.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};
use burnish_peft::{AdaptableLinear, BaseWeight, Nf4Weight};

use crate::attention::Attention;
use crate::base_dtype::BaseDtype;
use crate::config::DecoderConfig;
use crate::decoder::{Decoder, DecoderLayer};
use crate::error::{ModelError, Result};
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::TensorSource;

fn tensor<B: Backend, const D: usize>(
    source: &dyn TensorSource,
    name: &str,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    Ok(Tensor::from_data(source.read(name, &shape)?, device))
}

/// The projection under `prefix`, its weight held as `hold` says (resolved): in f32 as read
/// (trainable), in bf16 (frozen), or as NF4 codes (frozen): the codes a pre-quantized checkpoint
/// stores, or the weight quantized here; a pre-quantized checkpoint's projections stored in
/// floats stay unquantized, held as a dense weight is under an NF4 base.
fn linear<B: Backend>(
    source: &dyn TensorSource,
    prefix: &str,
    [d_in, d_out]: [usize; 2],
    bias: bool,
    hold: BaseDtype,
    device: &B::Device,
) -> Result<AdaptableLinear<B>> {
    let name = format!("{prefix}.weight");
    let dims = [d_out, d_in];
    let stored = match hold.is_nf4() {
        true => source.read_nf4(&name, &dims)?,
        false => None,
    };
    let weight = match stored {
        Some(stored) if !stored.has_held_blocks() => {
            return Err(ModelError::Input(format!(
                "tensor `{name}` is stored in 4-bit blocks of {} values, and NF4 weights are \
                 held in blocks of {}: load the checkpoint with `model.dtype = \"bf16\"` (read \
                 back to bf16) or use the unquantized model",
                stored.block,
                burnish_peft::NF4_BLOCK
            )));
        }
        Some(stored) => BaseWeight::Nf4(Nf4Weight::from_codes(
            stored.codes,
            stored.maxima,
            dims,
            device,
        )),
        None if hold.is_nf4() && !source.stores_nf4() => {
            let values = source
                .read(&name, &dims)?
                .to_vec::<f32>()
                .expect("f32 values");
            let double_quant = hold == BaseDtype::Nf4;
            BaseWeight::Nf4(Nf4Weight::quantize(&values, dims, double_quant, device))
        }
        None => {
            let weight = tensor(source, &name, dims, device)?;
            match hold.dense_weights::<B>() {
                FloatDType::F32 if !hold.is_nf4() => BaseWeight::dense(weight),
                dtype => BaseWeight::frozen(weight.cast(dtype)),
            }
        }
    };
    let bias_name = format!("{prefix}.bias");
    // A bias is used when the config asks for one (then it must exist) or the weights hold one.
    let bias = if bias || source.contains(&bias_name) {
        Some(tensor(source, &bias_name, [d_out], device)?)
    } else {
        None
    };
    Ok(AdaptableLinear::from_base(weight, bias))
}

/// Builds the decoder described by `config` from `weights`, on `device`, its base held in
/// `hold` (resolved: f32, bf16 or nf4; see [`BaseDtype`]).
pub fn build_decoder<B: Backend>(
    c: &DecoderConfig,
    weights: &dyn TensorSource,
    hold: BaseDtype,
    device: &B::Device,
) -> Result<Decoder<B>> {
    let hidden = c.hidden_size;
    let q_dim = c.num_heads * c.head_dim;
    let kv_dim = c.num_kv_heads * c.head_dim;
    let norm_of = |name: &str, width: usize| -> Result<RmsNorm<B>> {
        Ok(RmsNorm::new(
            tensor(weights, name, [width], device)?,
            c.rms_norm_eps,
        ))
    };
    let norm = |name: &str| norm_of(name, hidden);
    // Qwen3's per-head norms of the queries and keys.
    let head_norm = |name: String| -> Result<Option<RmsNorm<B>>> {
        c.qk_norm.then(|| norm_of(&name, c.head_dim)).transpose()
    };

    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let lin = |name: &str, d_in, d_out, bias| {
            linear(
                weights,
                &format!("{p}.{name}"),
                [d_in, d_out],
                bias,
                hold,
                device,
            )
        };
        layers.push(DecoderLayer {
            input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
            self_attn: Attention {
                q_proj: lin("self_attn.q_proj", hidden, q_dim, c.qkv_bias)?,
                k_proj: lin("self_attn.k_proj", hidden, kv_dim, c.qkv_bias)?,
                v_proj: lin("self_attn.v_proj", hidden, kv_dim, c.qkv_bias)?,
                o_proj: lin("self_attn.o_proj", q_dim, hidden, c.o_bias)?,
                q_norm: head_norm(format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: head_norm(format!("{p}.self_attn.k_norm.weight"))?,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                sliding_window: c.sliding_window,
            },
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
            mlp: Mlp {
                gate_proj: lin("mlp.gate_proj", hidden, c.intermediate_size, c.mlp_bias)?,
                up_proj: lin("mlp.up_proj", hidden, c.intermediate_size, c.mlp_bias)?,
                down_proj: lin("mlp.down_proj", c.intermediate_size, hidden, c.mlp_bias)?,
            },
        });
    }

    // A sequence classifier has a `score` head instead of an LM head.
    let score = match c.classifier_labels {
        Some(labels) => Some(Param::from_tensor(tensor(
            weights,
            "score.weight",
            [labels, hidden],
            device,
        )?)),
        None => None,
    };
    let lm_head = if c.tie_word_embeddings || score.is_some() {
        None
    } else {
        // Never quantized, as transformers leaves it.
        let head_hold = match hold.is_nf4() {
            true => BaseDtype::F32,
            false => hold,
        };
        Some(linear(
            weights,
            "lm_head",
            [hidden, c.vocab_size],
            false,
            head_hold,
            device,
        )?)
    };
    // A base held in less than f32 is frozen whole; the embedding then follows the LM head it
    // may be (tied).
    let frozen = !matches!(hold, BaseDtype::F32 | BaseDtype::Auto);
    let mut decoder = Decoder {
        embed_tokens: Param::from_tensor(tensor(
            weights,
            "model.embed_tokens.weight",
            [c.vocab_size, hidden],
            device,
        )?)
        .set_require_grad(!frozen),
        layers,
        norm: norm("model.norm.weight")?,
        lm_head,
        score,
        rope: Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling),
        config: c.clone(),
        activations: FloatDType::F32,
        neftune_noise_alpha: None,
    };
    // The LM head (or the embedding serving as one) in the dense precision; the layers are
    // held already.
    hold.hold_dense(&mut decoder);
    Ok(decoder)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::backend::{Autodiff, Flex};
    use burn::tensor::DType;

    use super::*;
    use crate::config::HfConfig;
    use crate::weights::RandomWeights;

    /// The projections are held as the base says while the model is built: f32 and trainable,
    /// bf16 and frozen, or NF4 codes; a tied embedding (the LM head) follows the dense weights,
    /// bf16 under a bf16 base and f32 under an NF4 one on the CPU, frozen with them.
    #[test]
    fn bases_are_built_in_the_precision_they_are_held_in() {
        let config = HfConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": true}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let build = |hold| {
            let weights = RandomWeights { seed: 0, std: 0.02 };
            build_decoder::<Autodiff<Flex>>(&config.decoder, &weights, hold, &Default::default())
                .unwrap()
        };
        for (hold, dense, quantized) in [
            (BaseDtype::F32, DType::F32, false),
            (BaseDtype::Bf16, DType::BF16, false),
            (BaseDtype::Nf4, DType::F32, true),
            (BaseDtype::Nf4Plain, DType::F32, true),
        ] {
            let model = build(hold);
            let embedding = model.embed_tokens.val();
            assert_eq!(embedding.dtype(), dense, "{hold}");
            assert_eq!(
                embedding.is_require_grad(),
                hold == BaseDtype::F32,
                "{hold}"
            );
            for (name, linear) in model.linears() {
                assert_eq!(linear.weight.is_quantized(), quantized, "{hold}: {name}");
                if !quantized {
                    assert_eq!(linear.weight.val().dtype(), dense, "{hold}: {name}");
                }
            }
        }
    }
}
