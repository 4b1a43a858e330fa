//! Activation checkpointing: recomputing each layer in the backward pass gives every trained
//! parameter the gradient that keeping the activations gives (LoRA and full fine-tuning, tied
//! and untied heads, padded and packed rows, SFT and DPO), and optimizer steps through it equal
//! the steps without it. Against torch: `losses.rs` runs PEFT's three AdamW steps both ways;
//! with adapter dropout: `train.rs` runs a recipe both ways (in a process of its own, as the
//! masks come from the backend's generator, which tests share).

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use burnish_align::{
    Activations, AdamW, AdamWConfig, Dpo, DpoLoss, PairBatch, Schedule, ScheduleKind, Sft,
    Strategy, TokenBatch, optimizer_step,
};
use burnish_model::{ActivationCheckpoints, Decoder, Pretrained};
use burnish_peft::{LoraConfig, Targets};

use crate::fixtures::{B, golden, max_abs_diff, model_dir};

type AD = Autodiff<B>;

fn base(name: &str) -> Decoder<AD> {
    Pretrained::<AD>::load(&model_dir(name), &Default::default())
        .unwrap()
        .model
}

/// `base(name)` with LoRA r = 4 on every projection and B set to fixed values (a fresh
/// adapter's B = 0 would give every A a zero gradient). Nothing is drawn from the backend's
/// generator, which tests running beside this one share.
fn lora(name: &str) -> Decoder<AD> {
    lora_on(name, None)
}

/// [`lora`] on the layers `layers` only (all when `None`).
fn lora_on(name: &str, layers: Option<Vec<usize>>) -> Decoder<AD> {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        targets: Targets::AllLinear,
        layers_to_transform: layers,
        ..Default::default()
    };
    let (mut model, _) = base(name).with_lora(&config, 3).unwrap();
    for (_, linear) in model.linears_mut() {
        if let Some(lora) = &mut linear.lora {
            let b = lora.lora_b.val();
            let values = (0..b.shape().num_elements())
                .map(|i| (i as f32 * 0.37).sin() * 0.1)
                .collect();
            let fixed = Tensor::<AD, 2>::from_data(TensorData::new(values, b.dims()), &b.device());
            lora.lora_b = Param::from_tensor(fixed);
        }
    }
    model
}

/// Rows of the fixture's token ids, one document each, trained from their fifth token.
fn rows(spans: &[(usize, usize)]) -> TokenBatch<AD> {
    let ids = golden("llama").score[1].token_ids.clone();
    let len = spans.iter().map(|(a, b)| b - a).max().unwrap();
    let (mut tokens, mut trained, mut positions, mut segments) = (vec![], vec![], vec![], vec![]);
    for &(from, to) in spans {
        let pad = len - (to - from);
        tokens.extend(
            ids[from..to]
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        trained.extend((0..len).map(|t| (4..to - from).contains(&t)));
        positions.extend((0..(to - from) as u32).chain(std::iter::repeat_n(0, pad)));
        segments.extend(std::iter::repeat_n(1, to - from).chain(std::iter::repeat_n(0, pad)));
    }
    let n = spans.len();
    let device = Default::default();
    TokenBatch::from_rows(n, len, &tokens, &trained, &positions, &segments, &device)
}

/// One row holding the spans back to back as separate documents.
fn packed(spans: &[(usize, usize)]) -> TokenBatch<AD> {
    let ids = golden("llama").score[1].token_ids.clone();
    let (mut tokens, mut trained, mut positions, mut segments) = (vec![], vec![], vec![], vec![]);
    for (doc, &(from, to)) in spans.iter().enumerate() {
        tokens.extend_from_slice(&ids[from..to]);
        trained.extend((0..to - from).map(|t| t >= 2));
        positions.extend(0..(to - from) as u32);
        segments.extend(std::iter::repeat_n(doc as u32 + 1, to - from));
    }
    let device = Default::default();
    TokenBatch::from_rows(
        1,
        tokens.len(),
        &tokens,
        &trained,
        &positions,
        &segments,
        &device,
    )
}

/// Every parameter's gradient in `grads` (empty where it has none), in module order.
fn gradient_values<M: Module<AD>>(model: &M, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        values: Vec<Vec<f32>>,
    }
    impl ModuleVisitor<AD> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            let value = self
                .grads
                .get::<B, D>(param.id)
                .map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap())
                .unwrap_or_default();
            self.values.push(value);
        }
    }
    let mut collect = Collect {
        grads,
        values: Vec::new(),
    };
    model.visit(&mut collect);
    collect.values
}

/// The loss of `strategy` on `batch` and every parameter's gradient, with the activations kept
/// or checkpointed.
fn gradients<S: Strategy<AD>>(
    model: &Decoder<AD>,
    strategy: &S,
    batch: &S::Batch,
    activations: Activations,
) -> (f32, Vec<Vec<f32>>) {
    let mut checkpoints =
        (activations == Activations::Checkpoint).then(ActivationCheckpoints::default);
    let loss = strategy.loss(model, batch, checkpoints.as_mut()).loss_sum;
    let value = loss.clone().into_scalar();
    let grads = match checkpoints {
        Some(checkpoints) => checkpoints.backward(model, loss),
        None => GradientsParams::from_grads(loss.backward(), model),
    };
    (value, gradient_values(model, &grads))
}

/// Asserts both ways give the same loss and the same gradient to every parameter (to 1e-5 of
/// the largest gradient), and returns the gradients.
fn assert_same_gradients<S: Strategy<AD>>(
    case: &str,
    model: &Decoder<AD>,
    strategy: &S,
    batch: &S::Batch,
) -> Vec<Vec<f32>> {
    let (kept_loss, kept) = gradients(model, strategy, batch, Activations::Keep);
    let (loss, recomputed) = gradients(model, strategy, batch, Activations::Checkpoint);
    assert_eq!(loss, kept_loss, "{case}: loss");
    let trained = kept.iter().filter(|g| !g.is_empty()).count();
    assert!(trained > 0, "{case}: nothing was trained");
    let scale = kept.iter().flatten().fold(0.0f32, |m, g| m.max(g.abs()));
    assert!(scale > 0.0, "{case}: every gradient is zero");
    for (i, (k, r)) in kept.iter().zip(&recomputed).enumerate() {
        assert_eq!(
            k.len(),
            r.len(),
            "{case}: parameter {i} has a gradient one way only"
        );
        let worst = max_abs_diff(k, r);
        assert!(
            worst <= 1e-5 * scale,
            "{case}: parameter {i} differs by {worst:e} (largest gradient {scale:e})"
        );
    }
    kept
}

#[test]
fn recomputed_layers_give_every_parameter_its_gradient() {
    let padded = rows(&[(0, 25), (5, 19)]);
    let documents = packed(&[(0, 9), (20, 33), (40, 47)]);
    assert!(padded.packing.is_none() && documents.packing.is_some());

    assert_same_gradients("LoRA, padded rows", &lora("llama"), &Sft, &padded);
    assert_same_gradients("LoRA, packed row", &lora("llama"), &Sft, &documents);
    assert_same_gradients("LoRA, tied head, biases", &lora("qwen2"), &Sft, &padded);
    // The first layer trains nothing: the backward pass stops above it.
    let upper = lora_on("llama", Some(vec![1]));
    let grads = assert_same_gradients("LoRA on the last layer only", &upper, &Sft, &padded);
    assert!(grads.iter().any(|g| !g.is_empty()));

    // Full fine-tuning: a tied embedding gets gradient through the head and the lookup.
    for name in ["llama", "qwen2"] {
        let full = base(name);
        assert!(full.embed_tokens.val().is_require_grad());
        let case = format!("full fine-tuning of {name}");
        let grads = assert_same_gradients(&case, &full, &Sft, &padded);
        assert!(
            grads.iter().all(|g| !g.is_empty()),
            "{case}: a weight got no gradient"
        );
    }
    assert!(base("qwen2").lm_head.is_none() && base("llama").lm_head.is_some());

    // RPO: the sigmoid loss and half the chosen completions' NLL.
    let mut dpo = Dpo::sigmoid(0.1);
    dpo.terms.push((DpoLoss::Sft, 0.5));
    let pairs = PairBatch {
        chosen: rows(&[(0, 20), (3, 15)]),
        rejected: rows(&[(30, 41), (2, 13)]),
        reference: None,
    };
    assert_same_gradients("DPO", &lora("llama"), &dpo, &pairs);
}

#[test]
fn optimizer_steps_through_checkpoints_equal_steps_keeping_activations() {
    let micro = [rows(&[(0, 25), (5, 19)]), packed(&[(0, 9), (20, 33)])];
    let schedule = Schedule {
        kind: ScheduleKind::Constant,
        peak_lr: 1e-2,
        warmup_steps: 0,
        total_steps: 10,
    };
    let start = lora("llama");
    let run = |activations| {
        let mut model = start.clone();
        let mut optimizer = AdamW::new(AdamWConfig::default());
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (next, metrics) =
                optimizer_step(model, &Sft, &micro, &mut optimizer, &schedule, activations)
                    .unwrap();
            model = next;
            seen.push((metrics.loss, metrics.grad_norm));
        }
        seen
    };
    let kept = run(Activations::Keep);
    let recomputed = run(Activations::Checkpoint);
    for (step, ((l1, n1), (l2, n2))) in kept.iter().zip(&recomputed).enumerate() {
        assert!(
            (l1 - l2).abs() <= 1e-6 * l1.abs(),
            "step {step}: loss {l1} vs {l2}"
        );
        assert!(
            (n1 - n2).abs() <= 1e-5 * n1,
            "step {step}: grad norm {n1} vs {n2}"
        );
    }
}
