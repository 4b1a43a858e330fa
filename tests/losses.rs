//! Training objectives against the references (`scripts/golden/make_losses.py`): the masked SFT
//! loss equals transformers' `-100`-label loss on the llama fixture (1e-5), and every DPO loss
//! and reward metric equals TRL 1.16's formulas on the same log-probs (1e-6, relative above 1).

use burn::tensor::{Int, Tensor, TensorData};
use burnish_align::{DpoLoss, PairLogps, dpo_loss, masked_token_loss};
use burnish_model::Pretrained;
use serde::Deserialize;

use crate::fixtures::{B, model_dir};

#[derive(Deserialize)]
struct Golden {
    sft: Sft,
    dpo: Dpo,
}

#[derive(Deserialize)]
struct Sft {
    input_ids: Vec<Vec<i64>>,
    labels: Vec<Vec<i64>>,
    loss: f32,
}

#[derive(Deserialize)]
struct Dpo {
    beta: f64,
    label_smoothing: f64,
    policy_chosen: Vec<f32>,
    policy_rejected: Vec<f32>,
    reference_chosen: Vec<f32>,
    reference_rejected: Vec<f32>,
    chosen_tokens: Vec<f32>,
    rejected_tokens: Vec<f32>,
    losses: std::collections::BTreeMap<String, f64>,
    metrics: std::collections::BTreeMap<String, f64>,
}

fn golden() -> Golden {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/losses/golden.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn scalar(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
}

#[test]
fn sft_loss_equals_transformers_with_ignored_labels() {
    let g = golden().sft;
    let device = Default::default();
    let model = Pretrained::<B>::load(&model_dir("llama"), &device)
        .unwrap()
        .model;
    let (rows, len) = (g.input_ids.len(), g.input_ids[0].len());
    let flat = |v: &[Vec<i64>]| v.iter().flatten().copied().collect::<Vec<_>>();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat(&g.input_ids), [rows, len]), &device);
    // Position t predicts token t + 1; it is trained where that label is not -100.
    let targets = ids.clone().narrow(1, 1, len - 1);
    let labels = flat(&g.labels);
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (1..len).map(move |t| (r, t)))
        .map(|(r, t)| {
            if labels[r * len + t] == -100 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [rows, len - 1]), &device);
    let logits = model.forward(ids).narrow(1, 0, len - 1);
    let loss = masked_token_loss(logits, targets, mask);
    assert_eq!(loss.tokens, (len - 1 - 4) + (len - 1 - 11 - 2));
    let ours = scalar(loss.mean()) as f32;
    assert!(
        (ours - g.loss).abs() <= 1e-5,
        "{ours} vs transformers {}",
        g.loss
    );
}

#[test]
fn dpo_losses_and_metrics_equal_trl() {
    let g = golden().dpo;
    let device = Default::default();
    let t = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    let logps = || PairLogps {
        policy_chosen: t(&g.policy_chosen),
        policy_rejected: t(&g.policy_rejected),
        reference_chosen: t(&g.reference_chosen),
        reference_rejected: t(&g.reference_rejected),
        chosen_tokens: t(&g.chosen_tokens),
        rejected_tokens: t(&g.rejected_tokens),
    };
    let e = g.label_smoothing;
    for (name, kind) in [
        (
            "sigmoid",
            DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        ),
        ("sigmoid_smoothed", DpoLoss::Sigmoid { label_smoothing: e }),
        ("hinge", DpoLoss::Hinge),
        ("ipo", DpoLoss::Ipo),
        ("robust", DpoLoss::Robust { label_smoothing: e }),
    ] {
        let out = dpo_loss(kind, g.beta, logps());
        let ours = scalar(out.loss);
        let theirs = g.losses[name];
        assert!(
            (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
            "{name}: {ours} vs TRL {theirs}"
        );
        let m = out.metrics;
        for (key, value) in [
            ("rewards/chosen", m.rewards_chosen),
            ("rewards/rejected", m.rewards_rejected),
            ("rewards/accuracies", m.rewards_accuracies),
            ("rewards/margins", m.rewards_margins),
            ("logps/chosen", m.logps_chosen),
            ("logps/rejected", m.logps_rejected),
        ] {
            let reference = g.metrics[key];
            assert!(
                (value - reference).abs() <= 1e-6 * reference.abs().max(1.0),
                "{key}: {value} vs TRL {reference}"
            );
        }
    }
}
