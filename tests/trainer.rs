//! The optimizer step shared by every strategy: gradient accumulation averages over the whole
//! accumulated batch (not per micro-batch), training lowers the loss, DPO's reference is the
//! model with adapters off and its rewards move the right way, and non-finite losses stop the
//! run with a message naming the step.

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use burnish_align::{
    Activations, AdamW, AdamWConfig, Dpo, PairBatch, Schedule, ScheduleKind, Sft, TokenBatch,
    masked_token_logprobs, optimizer_step, reference_logps,
};
use burnish_model::{Decoder, Pretrained, named_weights};
use burnish_peft::{LoraConfig, Targets};

use crate::fixtures::{B, golden, max_abs_diff, model_dir};

type AD = Autodiff<B>;

/// Rows of token ids, each trained from `trained_from` on, as one batch.
fn token_batch(rows: &[(&[u32], usize)]) -> TokenBatch<AD> {
    let device = Default::default();
    let len = rows[0].0.len() - 1;
    assert!(rows.iter().all(|(r, _)| r.len() == len + 1));
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    let mut mask = Vec::new();
    for (ids, from) in rows {
        inputs.extend(ids[..len].iter().map(|&t| t as i64));
        targets.extend(ids[1..].iter().map(|&t| t as i64));
        mask.extend((0..len).map(|t| if t + 1 >= *from { 1.0f32 } else { 0.0 }));
    }
    let trained_tokens = mask.iter().filter(|&&m| m > 0.0).count();
    let n = rows.len();
    TokenBatch {
        inputs: Tensor::<AD, 2, Int>::from_data(TensorData::new(inputs, [n, len]), &device),
        targets: Tensor::<AD, 2, Int>::from_data(TensorData::new(targets, [n, len]), &device),
        mask: Tensor::<AD, 2>::from_data(TensorData::new(mask, [n, len]), &device),
        present: Tensor::<AD, 2>::ones([n, len], &device),
        trained_tokens,
        tokens: n * len,
        packing: None,
    }
}

fn lora_model(seed: u64) -> Decoder<AD> {
    let base = Pretrained::<AD>::load(&model_dir("llama"), &Default::default())
        .unwrap()
        .model;
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        targets: Targets::AllLinear,
        ..Default::default()
    };
    base.with_lora(&config, seed).unwrap().0
}

fn constant(lr: f64) -> Schedule {
    Schedule {
        kind: ScheduleKind::Constant,
        peak_lr: lr,
        warmup_steps: 0,
        total_steps: 100,
    }
}

fn adapter_values(model: &Decoder<AD>) -> Vec<f32> {
    model
        .linears()
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .flat_map(|l| {
            let mut v = l.lora_a.val().into_data().to_vec::<f32>().unwrap();
            v.extend(l.lora_b.val().into_data().to_vec::<f32>().unwrap());
            v
        })
        .collect()
}

#[test]
fn accumulation_averages_over_the_whole_batch() {
    let ids = golden("llama").score[1].token_ids.clone();
    // Two rows with very different numbers of trained tokens.
    let (a, b) = (&ids[..20], &ids[20..40]);
    let rows = [(a, 3usize), (b, 15usize)];
    let config = AdamWConfig {
        max_grad_norm: None,
        ..Default::default()
    };

    let mut one = AdamW::new(config);
    let (whole, m1) = optimizer_step(
        lora_model(1),
        &Sft,
        &[token_batch(&rows)],
        &mut one,
        &constant(1e-2),
        Activations::Keep,
    )
    .unwrap();
    let mut two = AdamW::new(config);
    let micro = [token_batch(&rows[..1]), token_batch(&rows[1..])];
    let (split, m2) = optimizer_step(
        lora_model(1),
        &Sft,
        &micro,
        &mut two,
        &constant(1e-2),
        Activations::Keep,
    )
    .unwrap();

    assert!(
        (m1.loss - m2.loss).abs() < 1e-5,
        "{} vs {}",
        m1.loss,
        m2.loss
    );
    assert_eq!(m1.units, m2.units);
    let worst = adapter_values(&whole)
        .iter()
        .zip(adapter_values(&split))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "accumulated update differs by {worst:e}");
}

#[test]
fn packed_rows_train_like_separate_rows() {
    let ids = golden("llama").score[1].token_ids.clone();
    let (a, b) = (&ids[..12], &ids[12..30]);
    // Separate rows, each trained from its fourth token.
    let separate = [token_batch(&[(a, 3)]), token_batch(&[(b, 3)])];
    // One packed row of both documents, the same tokens marked.
    let packed_ids: Vec<u32> = a.iter().chain(b).copied().collect();
    let trained: Vec<bool> = (0..a.len())
        .map(|i| i >= 3)
        .chain((0..b.len()).map(|i| i >= 3))
        .collect();
    let positions: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
    let segments: Vec<u32> = std::iter::repeat_n(1, a.len())
        .chain(std::iter::repeat_n(2, b.len()))
        .collect();
    let packed = TokenBatch::<AD>::from_rows(
        1,
        packed_ids.len(),
        &packed_ids,
        &trained,
        &positions,
        &segments,
        &Default::default(),
    );
    assert_eq!(
        packed.trained_tokens,
        separate.iter().map(|b| b.trained_tokens).sum::<usize>()
    );

    let config = AdamWConfig::default();
    let (_, m1) = optimizer_step(
        lora_model(5),
        &Sft,
        &separate,
        &mut AdamW::new(config),
        &constant(1e-2),
        Activations::Keep,
    )
    .unwrap();
    let (_, m2) = optimizer_step(
        lora_model(5),
        &Sft,
        &[packed],
        &mut AdamW::new(config),
        &constant(1e-2),
        Activations::Keep,
    )
    .unwrap();
    assert!(
        (m1.loss - m2.loss).abs() < 1e-5,
        "separate {} vs packed {}",
        m1.loss,
        m2.loss
    );
    assert!(
        (m1.grad_norm - m2.grad_norm).abs() < 1e-4 * m1.grad_norm,
        "{} vs {}",
        m1.grad_norm,
        m2.grad_norm
    );
}

/// A padded batch of one document per row, as the data loader builds it.
fn padded_rows(rows: &[&[u32]]) -> TokenBatch<AD> {
    let len = rows.iter().map(|r| r.len()).max().unwrap();
    let (mut ids, mut trained, mut positions, mut segments) = (vec![], vec![], vec![], vec![]);
    for row in rows {
        let pad = len - row.len();
        ids.extend(row.iter().copied().chain(std::iter::repeat_n(0, pad)));
        trained.extend((0..len).map(|t| (4..row.len()).contains(&t)));
        positions.extend((0..row.len() as u32).chain(std::iter::repeat_n(0, pad)));
        segments.extend(std::iter::repeat_n(1, row.len()).chain(std::iter::repeat_n(0, pad)));
    }
    let device = Default::default();
    TokenBatch::from_rows(
        rows.len(),
        len,
        &ids,
        &trained,
        &positions,
        &segments,
        &device,
    )
}

#[test]
fn dpo_scores_chosen_and_rejected_of_different_lengths_in_one_pass() {
    let ids = golden("llama").score[1].token_ids.clone();
    let chosen = padded_rows(&[&ids[..25], &ids[5..19]]);
    let rejected = padded_rows(&[&ids[30..41], &ids[2..13]]);
    // Rows of one document each need no document mask.
    assert!(chosen.packing.is_none() && rejected.packing.is_none());
    let model = lora_model(2);
    let alone = |batch: &TokenBatch<AD>| {
        let mut reference = model.clone();
        reference.set_adapters_enabled(false);
        let logits = reference.forward(batch.inputs.clone());
        masked_token_logprobs(logits, batch.targets.clone(), batch.mask.clone())
            .sum_dim(1)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    let (expect_chosen, expect_rejected) = (alone(&chosen), alone(&rejected));
    let pair = PairBatch {
        chosen,
        rejected,
        reference: None,
    };
    let (got_chosen, got_rejected) = reference_logps(&model, &pair);
    for (got, expect) in [(got_chosen, expect_chosen), (got_rejected, expect_rejected)] {
        let got = got.into_data().to_vec::<f32>().unwrap();
        assert_eq!(got.len(), 2);
        for (g, e) in got.iter().zip(&expect) {
            assert!((g - e).abs() < 1e-4 * e.abs().max(1.0), "{g} vs {e}");
        }
    }
}

#[test]
fn sft_steps_lower_the_loss_and_leave_the_base_untouched() {
    let ids = golden("llama").score[1].token_ids.clone();
    let batch = [token_batch(&[(&ids[..32], 8)])];
    let mut model = lora_model(2);
    let base_before = named_weights(&model);
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let mut losses = Vec::new();
    for _ in 0..15 {
        let (next, metrics) = optimizer_step(
            model,
            &Sft,
            &batch,
            &mut optimizer,
            &constant(2e-2),
            Activations::Keep,
        )
        .unwrap();
        model = next;
        losses.push(metrics.loss);
    }
    assert!(losses[14] < 0.5 * losses[0], "loss {:?}", losses);
    assert_eq!(
        named_weights(&model),
        base_before,
        "the frozen base changed"
    );
}

#[test]
fn lora_trains_over_a_bf16_base_like_over_f32() {
    let ids = golden("llama").score[1].token_ids.clone();
    let batch = [token_batch(&[(&ids[..24], 4), (&ids[8..32], 4)])];
    let step_with = |model: Decoder<AD>, activations: Activations| {
        let mut optimizer = AdamW::new(AdamWConfig::default());
        optimizer_step(
            model,
            &Sft,
            &batch,
            &mut optimizer,
            &constant(1e-2),
            activations,
        )
        .unwrap()
    };
    let step = |model| step_with(model, Activations::Keep);
    let (_, full) = step(lora_model(4));
    let mut held = lora_model(4);
    held.hold_base_in(FloatDType::BF16);
    assert!(
        held.linears()
            .iter()
            .all(|(_, l)| l.weight.val().dtype() == DType::BF16)
    );
    let base_before = named_weights(&held);
    // The activations in f32, then in bf16 too (as on GPUs).
    for activations in [FloatDType::F32, FloatDType::BF16] {
        let mut model = held.clone();
        model.compute_in(activations);
        let (model, half) = step(model);
        assert!(
            (full.loss - half.loss).abs() < 2e-2 * full.loss.abs(),
            "loss {} (f32 base) vs {} (bf16 base, {activations:?} activations)",
            full.loss,
            half.loss
        );
        assert!(
            (full.grad_norm - half.grad_norm).abs() < 5e-2 * full.grad_norm,
            "grad norm {} vs {} ({activations:?} activations)",
            full.grad_norm,
            half.grad_norm
        );
        assert_eq!(named_weights(&model), base_before, "the bf16 base changed");
    }
    // bf16 activations with the layers recomputed in the backward pass: the same step.
    let mut model = held.clone();
    model.compute_in(FloatDType::BF16);
    let (_, kept) = step(model.clone());
    let (_, recomputed) = step_with(model, Activations::Checkpoint);
    assert!((kept.loss - recomputed.loss).abs() < 1e-6 * kept.loss.abs());
    assert!((kept.grad_norm - recomputed.grad_norm).abs() < 1e-2 * kept.grad_norm);
}

/// Ten DPO steps of `model` on one preference pair: the first step's metrics and the last's.
fn ten_dpo_steps(mut model: Decoder<AD>) -> [burnish_align::StepMetrics; 2] {
    let ids = golden("llama").score[1].token_ids.clone();
    let prompt = &ids[..10];
    let chosen: Vec<u32> = prompt.iter().chain(&ids[10..20]).copied().collect();
    let rejected: Vec<u32> = prompt.iter().chain(&ids[30..40]).copied().collect();
    let pairs = [PairBatch {
        chosen: token_batch(&[(&chosen, 10)]),
        rejected: token_batch(&[(&rejected, 10)]),
        reference: None,
    }];
    let dpo = Dpo::sigmoid(0.1);
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let mut first = None;
    let mut last = None;
    for _ in 0..10 {
        let (next, metrics) = optimizer_step(
            model,
            &dpo,
            &pairs,
            &mut optimizer,
            &constant(2e-2),
            Activations::Keep,
        )
        .unwrap();
        model = next;
        first.get_or_insert(metrics.clone());
        last = Some(metrics);
    }
    [first.unwrap(), last.unwrap()]
}

fn metric(m: &burnish_align::StepMetrics, k: &str) -> f64 {
    m.metrics.iter().find(|(n, _)| *n == k).unwrap().1
}

#[test]
fn dpo_starts_at_log_two_and_learns_the_preference() {
    let [first, last] = ten_dpo_steps(lora_model(3));
    // With B = 0 the policy equals the reference: loss ln 2, rewards 0.
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        first.loss
    );
    // Zero up to rounding: the policy's attention (the chunked op, under autodiff) and the
    // reference's (burn's, without autodiff) add in different orders.
    assert!(metric(&first, "rewards/chosen").abs() < 1e-5);
    assert!(last.loss < first.loss);
    assert_eq!(metric(&last, "rewards/accuracies"), 1.0);
    assert!(metric(&last, "rewards/margins") > 0.0);
}

/// The same over a bf16 base with bf16 activations, as GPUs train.
#[test]
fn dpo_learns_the_preference_over_bf16_activations() {
    let mut model = lora_model(3);
    model.hold_base_in(FloatDType::BF16);
    model.compute_in(FloatDType::BF16);
    let [first, last] = ten_dpo_steps(model);
    // The policy's and the reference's passes round differently in bf16: ln 2 nearly.
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-2,
        "{}",
        first.loss
    );
    assert!(last.loss < first.loss);
    assert_eq!(metric(&last, "rewards/accuracies"), 1.0);
    assert!(metric(&last, "rewards/margins") > 0.0);
}

#[test]
fn a_non_finite_loss_stops_and_names_the_step() {
    let ids = golden("llama").score[0].token_ids.clone();
    let batch = [token_batch(&[(&ids[..16], 4)])];
    let mut model = lora_model(4);
    // Poison one adapter matrix.
    for (_, linear) in model.linears_mut() {
        if let Some(lora) = &mut linear.lora {
            let nan = lora.lora_b.val().inner().add_scalar(f32::NAN);
            lora.lora_b = burn::module::Param::from_tensor(Tensor::from_inner(nan).require_grad());
            break;
        }
    }
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let err = optimizer_step(
        model,
        &Sft,
        &batch,
        &mut optimizer,
        &constant(1e-3),
        Activations::Keep,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("step 1:") && err.to_string().contains("NaN"),
        "{err}"
    );
}

#[test]
fn evaluation_copies_apply_no_adapter_dropout() {
    let adapter = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters/llama-qv");
    let base = Pretrained::<AD>::load(&model_dir("llama"), &Default::default())
        .unwrap()
        .model;
    let (mut model, _) = base.with_adapter(&adapter).unwrap();
    for (_, linear) in model.linears_mut() {
        if let Some(lora) = &mut linear.lora {
            lora.dropout = burn::nn::DropoutConfig::new(0.5).init();
        }
    }
    let ids = golden("llama").score[1].token_ids[..16].to_vec();
    let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [1, 16]), &Default::default());
    let values = |t: Tensor<AD, 3>| t.into_data().to_vec::<f32>().unwrap();
    // Without autodiff no dropout applies: the reference.
    let exact = model
        .valid()
        .forward(ids.clone().inner())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let training = values(model.forward(ids.clone()));
    let evaluation = values(model.for_evaluation().forward(ids));
    assert!(
        max_abs_diff(&training, &exact) > 1e-3,
        "dropout changed nothing in training"
    );
    let worst = max_abs_diff(&evaluation, &exact);
    assert!(worst <= 1e-5, "evaluation differs by {worst:e}");
}
