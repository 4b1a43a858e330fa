//! Training numerics against the references (`scripts/golden/make_losses.py`): the masked SFT
//! loss equals transformers' `-100`-label loss on the llama fixture (1e-5); every DPO loss and
//! reward metric equals TRL 1.16's formulas on the same log-probs (1e-6, relative above 1); three
//! AdamW steps with global-norm clipping reproduce PEFT + torch's adapter (1e-5); learning-rate
//! schedules equal transformers' `get_scheduler` (1e-12). ORPO's loss and metrics on padded
//! pairs through the llama fixture equal TRL's `ORPOTrainer`, and CPO's and SimPO's its
//! `CPOTrainer`, for every loss type (1e-5, relative above 1), and
//! `log1mexp` TRL's on both sides of its branch (1e-6 relative). KTO's loss and metrics equal
//! TRL's `KTOTrainer`, and a reward model's rewards, loss and metrics its `RewardTrainer` (1e-5). The log-probs computed chunk by
//! chunk from the hidden states equal the full logits' in value and gradient.

use burn::tensor::{Int, Tensor, TensorData};
use burnish_align::{
    DpoLoss, FDivergence, PairLogps, dpo_loss, masked_token_logprobs,
    masked_token_logprobs_chunked, masked_token_loss,
};
use burnish_model::Pretrained;
use serde::Deserialize;

use crate::fixtures::{B, max_abs_diff, model_dir};

type AD = burn::backend::Autodiff<B>;

#[derive(Deserialize)]
struct Golden {
    sft: Sft,
    accuracy: AccuracyCase,
    dpo: Dpo,
    orpo: Orpo,
    cpo: CpoGolden,
    kto: KtoGolden,
    reward: RewardGolden,
    grpo: GrpoGolden,
    dpo_model: DpoModelGolden,
}

#[derive(Deserialize)]
struct GrpoGolden {
    adapter: String,
    prompts: Vec<Vec<u32>>,
    completions: Vec<Vec<u32>>,
    advantages: Vec<f64>,
    cases: Vec<GrpoCase>,
    rewards: Vec<f64>,
    num_generations: usize,
    scaled: std::collections::BTreeMap<String, GrpoScaled>,
    functions: GrpoFunctions,
}

#[derive(Deserialize)]
struct GrpoFunctions {
    texts: Vec<String>,
    think_format: Vec<f64>,
    lengths: Vec<usize>,
    max_completion_len: usize,
    soft_punish_cache: usize,
    soft_overlong: Vec<f64>,
}

#[derive(Deserialize)]
struct GrpoCase {
    name: String,
    loss_type: String,
    beta: f64,
    temperature: f64,
    max_completion_length: usize,
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
    /// `[completion, token]`: the log-probabilities a reused completion was drawn with.
    old_per_token_logps: Option<Vec<Vec<f32>>>,
}

#[derive(Deserialize)]
struct GrpoScaled {
    advantages: Vec<f64>,
    frac_reward_zero_std: f64,
}

#[derive(Deserialize)]
struct RewardGolden {
    adapter: String,
    pad_token_id: u32,
    pairs: Vec<RewardPair>,
    cases: Vec<RewardCase>,
    /// TRL's token ids of each row of `data/rows/preference.jsonl`.
    tokenized: Vec<RewardPair>,
}

#[derive(Deserialize)]
struct RewardPair {
    chosen_ids: Vec<u32>,
    rejected_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RewardCase {
    name: String,
    center_rewards_coefficient: Option<f64>,
    margins: Option<Vec<f32>>,
    loss: f64,
    /// Chosen rows' rewards, then rejected rows'.
    rewards: Vec<f64>,
    metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct DpoModelGolden {
    adapter: String,
    pairs: Vec<OrpoPair>,
    cases: Vec<DpoModelCase>,
    /// LD-DPO and WPO cases, through the model only.
    weighted: Vec<DpoModelCase>,
    stub: DpoStub,
}

/// Summed log-probs of six pairs (chosen rows, then rejected rows) and TRL's results on them.
#[derive(Deserialize)]
struct DpoStub {
    policy: Vec<f32>,
    reference: Vec<f32>,
    tokens: Vec<f32>,
    cases: Vec<DpoStubCase>,
}

#[derive(Deserialize)]
struct DpoStubCase {
    name: String,
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct DpoModelCase {
    name: String,
    loss_type: Vec<String>,
    loss_weights: Vec<f64>,
    beta: f64,
    label_smoothing: f64,
    discopop_tau: f64,
    f_divergence_type: String,
    f_alpha_divergence_coef: f64,
    #[serde(default)]
    ld_alpha: Option<f64>,
    #[serde(default)]
    use_weighting: bool,
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct KtoGolden {
    adapter: String,
    cases: Vec<KtoCase>,
}

#[derive(Deserialize)]
struct KtoCase {
    name: String,
    loss_type: String,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
    max_length: Option<usize>,
    rows: Vec<KtoRow>,
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct KtoRow {
    prompt: Vec<u32>,
    completion: Vec<u32>,
    label: bool,
}

#[derive(Deserialize)]
struct CpoGolden {
    pairs: Vec<OrpoPair>,
    cases: Vec<CpoCase>,
}

#[derive(Deserialize)]
struct CpoCase {
    name: String,
    loss_type: String,
    beta: f64,
    label_smoothing: f64,
    cpo_alpha: f64,
    simpo_gamma: f64,
    alpha: f64,
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct Orpo {
    beta: f64,
    pairs: Vec<OrpoPair>,
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
    log1mexp: Log1mexp,
}

#[derive(Deserialize)]
struct OrpoPair {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
}

#[derive(Deserialize)]
struct Log1mexp {
    x: Vec<f32>,
    y: Vec<f64>,
}

#[derive(Deserialize)]
struct Sft {
    input_ids: Vec<Vec<i64>>,
    labels: Vec<Vec<i64>>,
    loss: f32,
}

#[derive(Deserialize)]
struct AccuracyCase {
    input_ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    accuracy: f64,
    entropy: f64,
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
    sft_term: f64,
    metrics: std::collections::BTreeMap<String, f64>,
}

fn golden() -> Golden {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/losses/golden.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The trained positions of `-100`-style labels, shifted as causal-LM losses shift them:
/// position `t` predicts token `t + 1` and is trained where that label is not -100.
fn shifted_mask<BB: burn::tensor::backend::Backend>(
    labels: &[Vec<i64>],
    device: &BB::Device,
) -> Tensor<BB, 2> {
    let (rows, len) = (labels.len(), labels[0].len());
    let mask: Vec<f32> = labels
        .iter()
        .flat_map(|row| row[1..].iter().map(|&l| if l == -100 { 0.0 } else { 1.0 }))
        .collect();
    Tensor::from_data(TensorData::new(mask, [rows, len - 1]), device)
}

fn scalar(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
}

/// The llama fixture, the golden SFT batch as model inputs, its shifted targets and trained
/// positions, and transformers' loss on it.
struct SftCase {
    model: burnish_model::Decoder<B>,
    ids: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    loss: f32,
}

fn sft_case() -> SftCase {
    let g = golden().sft;
    let device = Default::default();
    let model = Pretrained::<B>::load(&model_dir("llama"), &device)
        .unwrap()
        .model;
    let (rows, len) = (g.input_ids.len(), g.input_ids[0].len());
    let flat = |v: &[Vec<i64>]| v.iter().flatten().copied().collect::<Vec<_>>();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat(&g.input_ids), [rows, len]), &device);
    SftCase {
        model,
        targets: ids.clone().narrow(1, 1, len - 1),
        ids,
        mask: shifted_mask::<B>(&g.labels, &device),
        loss: g.loss,
    }
}

fn assert_transformers_loss(ours: f64, transformers: f32) {
    let ours = ours as f32;
    assert!(
        (ours - transformers).abs() <= 1e-5,
        "{ours} vs transformers {transformers}"
    );
}

#[test]
fn sft_loss_equals_transformers_with_ignored_labels() {
    let case = sft_case();
    let len = case.ids.dims()[1];
    let logits = case.model.forward(case.ids).narrow(1, 0, len - 1);
    let loss = masked_token_loss(logits, case.targets, case.mask);
    assert_eq!(loss.tokens, (len - 1 - 4) + (len - 1 - 11 - 2));
    assert_transformers_loss(scalar(loss.mean()), case.loss);
}

#[test]
fn chunked_logprobs_of_the_hidden_states_equal_transformers_loss() {
    let case = sft_case();
    let len = case.ids.dims()[1];
    let hidden = case.model.hidden_states(case.ids).narrow(1, 0, len - 1);
    let head = case.model.frozen_head_weight().expect("a frozen head");
    let tokens = scalar(case.mask.clone().sum());
    // 3 positions per chunk: many chunks, the last one short.
    let logprobs =
        masked_token_logprobs_chunked(hidden, head, case.targets, case.mask, false, 3, false).0;
    assert_transformers_loss(-scalar(logprobs.sum()) / tokens, case.loss);
}

#[test]
fn chunked_logprobs_carry_the_full_logits_gradient() {
    use burn::tensor::{DType, Distribution};
    let device = Default::default();
    let (batch, seq, width, vocab) = (2, 5, 8, 11);
    <B as burn::tensor::backend::Backend>::seed(&device, 7);
    let random = |dims: [usize; 2]| Tensor::<AD, 2>::random(dims, Distribution::Default, &device);
    let head = random([vocab, width]);
    let targets = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(
            (0..10).map(|i| (i * 7 % vocab) as i64).collect(),
            [batch, seq],
        ),
        &device,
    );
    let mask = Tensor::<AD, 2>::from_data(
        TensorData::new(
            vec![1.0f32, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0],
            [batch, seq],
        ),
        &device,
    );
    let upstream = random([batch, seq]);
    let hidden_values =
        Tensor::<AD, 3>::random([batch, seq, width], Distribution::Default, &device);
    // Σ upstream·log p and the gradient it sends to the hidden states.
    let run = |logprobs: &dyn Fn(Tensor<AD, 3>) -> Tensor<AD, 2>| {
        let hidden = hidden_values.clone().require_grad();
        let logprobs = logprobs(hidden.clone());
        let grads = (logprobs.clone() * upstream.clone()).sum().backward();
        let grad = hidden
            .grad(&grads)
            .expect("a gradient for the hidden states");
        (
            logprobs.into_data().to_vec::<f32>().unwrap(),
            grad.into_data().to_vec::<f32>().unwrap(),
        )
    };
    for dtype in [DType::F32, DType::BF16] {
        let head = head.clone().cast(dtype);
        let (full_values, full_grad) = run(&|hidden| {
            let logits = burnish_peft::project(hidden, head.clone());
            masked_token_logprobs(logits, targets.clone(), mask.clone())
        });
        // The hidden states in f32, and in the head's precision (bf16 activations, as on GPUs).
        for hidden_dtype in [DType::F32, dtype] {
            for chunk in [1, 3, batch * seq] {
                let (values, grad) = run(&|hidden| {
                    masked_token_logprobs_chunked(
                        hidden.cast(hidden_dtype),
                        head.clone(),
                        targets.clone(),
                        mask.clone(),
                        true,
                        chunk,
                        false,
                    )
                    .0
                });
                let bound = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(
                    max_abs_diff(&values, &full_values) <= bound,
                    "{dtype:?} head, {hidden_dtype:?} hidden, chunk {chunk}"
                );
                assert!(
                    max_abs_diff(&grad, &full_grad) <= bound,
                    "{dtype:?} head, {hidden_dtype:?} hidden, chunk {chunk}"
                );
            }
        }
    }
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
        sft_chosen: None,
        pair_weights: None,
    };
    let rpo = scalar(burnish_align::chosen_nll(
        t(&g.policy_chosen),
        t(&g.chosen_tokens),
    ));
    assert!(
        (rpo - g.sft_term).abs() <= 1e-6 * g.sft_term.abs().max(1.0),
        "RPO term {rpo} vs TRL {}",
        g.sft_term
    );
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
        let out = dpo_loss(&[(kind, 1.0)], g.beta, FDivergence::ReverseKl, logps());
        let ours = scalar(out.loss);
        let theirs = g.losses[name];
        assert!(
            (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
            "{name}: {ours} vs TRL {theirs}"
        );
        for (key, value) in out.metrics.named() {
            let reference = g.metrics[key];
            assert!(
                (value - reference).abs() <= 1e-6 * reference.abs().max(1.0),
                "{key}: {value} vs TRL {reference}"
            );
        }
    }
}

/// The llama fixture, every weight tracked.
fn llama() -> burnish_model::Decoder<AD> {
    Pretrained::<AD>::load(&model_dir("llama"), &Default::default())
        .unwrap()
        .model
}

/// `base` with the adapter fixture `name` on it (frozen base).
fn with_fixture_adapter(
    base: burnish_model::Decoder<AD>,
    name: &str,
) -> burnish_model::Decoder<AD> {
    let dir = model_dir("llama").join("../../adapters").join(name);
    base.with_adapter(&dir).unwrap().0
}

/// The llama fixture under autodiff and `pairs` as one padded batch.
fn preference_case(
    pairs: &[OrpoPair],
) -> (burnish_model::Decoder<AD>, burnish_align::PairBatch<AD>) {
    use burnish_data::PairExample;
    let device = Default::default();
    let model = llama();
    let pairs: Vec<PairExample> = pairs
        .iter()
        .map(|p| PairExample {
            prompt_ids: p.prompt.clone(),
            chosen_ids: p.chosen.clone(),
            rejected_ids: p.rejected.clone(),
            margin: None,
        })
        .collect();
    let refs: Vec<&PairExample> = pairs.iter().collect();
    (
        model,
        burnish_align::PairBatch::from_pairs(&refs, 0, &device),
    )
}

/// A strategy's mean loss and metrics on a batch equal TRL's (1e-5, relative above 1).
fn assert_trl_step(
    case: &str,
    out: burnish_align::StepOutput<AD>,
    loss: f64,
    metrics: &std::collections::BTreeMap<String, f64>,
) {
    let close = |ours: f64, theirs: f64| (ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0);
    let ours = out.loss_sum.into_data().to_vec::<f32>().unwrap()[0] as f64 / out.units;
    assert!(close(ours, loss), "{case}: loss {ours} vs TRL {loss}");
    for (key, theirs) in metrics {
        let ours = out
            .metrics
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{case}: no metric {key}"))
            .1;
        assert!(
            close(ours, *theirs),
            "{case}: {key}: {ours} vs TRL {theirs}"
        );
    }
}

#[test]
fn cpo_and_simpo_losses_and_metrics_equal_trl_through_the_model() {
    use burnish_align::{Cpo, CpoLoss, Strategy};
    let g = golden().cpo;
    let (model, batch) = preference_case(&g.pairs);
    assert_eq!(g.cases.len(), 7);
    for case in &g.cases {
        let e = case.label_smoothing;
        let loss = match case.loss_type.as_str() {
            "sigmoid" => CpoLoss::Sigmoid { label_smoothing: e },
            "hinge" => CpoLoss::Hinge,
            "ipo" => CpoLoss::Ipo,
            "simpo" => CpoLoss::Simpo {
                gamma: case.simpo_gamma,
                label_smoothing: e,
            },
            other => panic!("unknown loss type {other}"),
        };
        let cpo = Cpo {
            loss,
            beta: case.beta,
            cpo_alpha: case.cpo_alpha,
            alpha: case.alpha,
        };
        let out = cpo.loss(&model, &batch, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);
    }
}

#[test]
fn orpo_loss_and_metrics_equal_trl_through_the_model() {
    use burnish_align::{Orpo, Strategy};
    let g = golden().orpo;
    let device = Default::default();
    let (model, batch) = preference_case(&g.pairs);
    let out = Orpo { beta: g.beta }.loss(&model, &batch, None);
    assert_trl_step("orpo", out, g.loss, &g.metrics);

    let x = Tensor::<B, 1>::from_data(
        TensorData::new(g.log1mexp.x.clone(), [g.log1mexp.x.len()]),
        &device,
    );
    let ours = burnish_align::log1mexp(x)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for ((x, ours), theirs) in g.log1mexp.x.iter().zip(ours).zip(&g.log1mexp.y) {
        let ours = f64::from(ours);
        assert!(
            (ours - theirs).abs() <= 1e-6 * theirs.abs(),
            "log1mexp({x}): {ours} vs TRL {theirs}"
        );
    }
}

/// LD-DPO (completion tokens past the shared length weighted by `ld_alpha`, for the policy and
/// the reference, computed at every step or once before training; the SFT term unweighted) and
/// WPO (each pair's loss weighted by its completions' aligned probabilities) through the model
/// equal TRL's `DPOTrainer._compute_loss`.
#[test]
fn ld_dpo_and_wpo_equal_trl_through_the_model() {
    use burnish_align::{DpoLosses, DpoSection, Strategy, frozen_logps};
    let g = golden().dpo_model;
    let (base, batch) = preference_case(&g.pairs);
    let model = with_fixture_adapter(base.clone(), &g.adapter);
    assert_eq!(g.weighted.len(), 4);
    for case in &g.weighted {
        let section = DpoSection {
            beta: case.beta,
            loss: DpoLosses::Many(
                case.loss_type
                    .iter()
                    .map(|n| serde_json::from_value(serde_json::json!(n)).unwrap())
                    .collect(),
            ),
            loss_weights: Some(case.loss_weights.clone()),
            ld_alpha: case.ld_alpha,
            use_weighting: case.use_weighting,
            ..DpoSection::default()
        };
        let dpo = section.strategy();
        let out = dpo.loss(&model, &batch, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);
        // The reference's log-probs computed once, as before a run, weighed alike.
        let precomputed = burnish_align::PairBatch {
            reference: Some(frozen_logps(&base, &batch, case.ld_alpha)),
            ..batch.clone()
        };
        let out = dpo.loss(&model, &precomputed, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);
    }
}

#[test]
fn dpo_variants_equal_trl_through_the_model() {
    use burnish_align::{Dpo, DpoLosses, DpoSection, Strategy};
    let g = golden().dpo_model;
    let (base, batch) = preference_case(&g.pairs);
    let model = with_fixture_adapter(base, &g.adapter);
    assert_eq!(g.cases.len(), 20);
    // Read by the recipe's names, as a `[dpo]` section gives them.
    fn parse<T: serde::de::DeserializeOwned>(name: &str) -> T {
        serde_json::from_value(serde_json::json!(name)).unwrap()
    }
    let device = Default::default();
    let halves = |v: &[f32]| {
        let n = v.len() / 2;
        let t =
            |part: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(part.to_vec(), [n]), &device);
        (t(&v[..n]), t(&v[n..]))
    };
    assert_eq!(g.stub.cases.len(), g.cases.len());
    for (case, stub) in g.cases.iter().zip(&g.stub.cases) {
        assert_eq!(case.name, stub.name);
        let section = DpoSection {
            beta: case.beta,
            loss: DpoLosses::Many(case.loss_type.iter().map(|n| parse(n)).collect()),
            loss_weights: Some(case.loss_weights.clone()),
            label_smoothing: case.label_smoothing,
            discopop_tau: case.discopop_tau,
            f_divergence_type: parse(&case.f_divergence_type),
            f_alpha_divergence_coef: case.f_alpha_divergence_coef,
            ..DpoSection::default()
        };
        let dpo: Dpo = section.strategy();
        // The reference is the policy with its adapter off, as TRL's for a PEFT model.
        let out = dpo.loss(&model, &batch, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);

        // On fixed log-probs that the policy and the reference order differently.
        let (policy_chosen, policy_rejected) = halves(&g.stub.policy);
        let (reference_chosen, reference_rejected) = halves(&g.stub.reference);
        let (chosen_tokens, rejected_tokens) = halves(&g.stub.tokens);
        let out = dpo_loss(
            &dpo.terms,
            dpo.beta,
            dpo.divergence,
            PairLogps {
                policy_chosen,
                policy_rejected,
                reference_chosen,
                reference_rejected,
                chosen_tokens,
                rejected_tokens,
                sft_chosen: None,
                pair_weights: None,
            },
        );
        let close = |ours: f64, theirs: f64| (ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0);
        let ours = scalar(out.loss);
        assert!(
            close(ours, stub.loss),
            "{} on fixed log-probs: {ours} vs TRL {}",
            stub.name,
            stub.loss
        );
        for (key, value) in out.metrics.named() {
            let theirs = stub.metrics[key];
            assert!(
                close(value, theirs),
                "{}: {key} {value} vs TRL {theirs}",
                stub.name
            );
        }
    }
}

/// TRL's `mean_token_accuracy` and `entropy`, in training and in evaluation, from the chunked
/// logits of a frozen head and from the full logits of a trained one.
#[test]
fn sft_reports_trls_token_accuracy_and_entropy() {
    use burnish_align::{Sft, Strategy, TokenBatch};
    let g = golden().accuracy;
    let device = Default::default();
    let model = llama();
    let (rows, len) = (g.input_ids.len(), g.input_ids[0].len());
    let ids: Vec<u32> = g.input_ids.iter().flatten().copied().collect();
    let trained: Vec<bool> = g.labels.iter().flatten().map(|&l| l != -100).collect();
    let positions: Vec<u32> = (0..rows).flat_map(|_| 0..len as u32).collect();
    let segments = vec![1; rows * len];
    let batch =
        TokenBatch::<AD>::from_rows(rows, len, &ids, &trained, &positions, &segments, &device);
    let check = |model: &burnish_model::Decoder<AD>, what: &str| {
        let metrics = Sft.loss(model, &batch, None).metrics;
        let metric = |name: &str| {
            metrics
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{what}: no {name}"))
                .1
        };
        let accuracy = metric("mean_token_accuracy");
        assert!(
            (accuracy - g.accuracy).abs() < 1e-6,
            "{what}: {accuracy} vs TRL {}",
            g.accuracy
        );
        let entropy = metric("entropy");
        assert!(
            (entropy - g.entropy).abs() < 1e-5,
            "{what}: {entropy} vs TRL {}",
            g.entropy
        );
    };
    // Every weight trains: the head's full logits.
    check(&model, "full fine-tuning");
    check(&model.for_evaluation(), "evaluation");
    // A frozen head under a fresh adapter: the chunked logits.
    let (adapted, _) = model
        .with_lora(
            &burnish_peft::LoraConfig {
                targets: burnish_peft::Targets::AllLinear,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    assert!(adapted.frozen_head_weight().is_some());
    check(&adapted, "adapter training");
}

#[test]
fn kto_losses_and_metrics_equal_trl_through_the_model() {
    use burnish_align::{Kto, KtoLoss, LabeledBatch, Strategy};
    use burnish_data::LabeledExample;
    let g = golden().kto;
    let device = Default::default();
    let model = with_fixture_adapter(llama(), &g.adapter);
    assert_eq!(g.cases.len(), 3);
    for case in &g.cases {
        let rows: Vec<LabeledExample> = case
            .rows
            .iter()
            .map(|r| LabeledExample {
                prompt_ids: r.prompt.clone(),
                completion_ids: r.completion.clone(),
                desirable: r.label,
            })
            .collect();
        let refs: Vec<&LabeledExample> = rows.iter().collect();
        let uses_kl = case.loss_type == "kto";
        let batch = LabeledBatch::from_labeled(&refs, 0, uses_kl, case.max_length, &device);
        // The reference is the policy with its adapter off, as TRL's for a PEFT model.
        let kto = Kto {
            loss: KtoLoss {
                beta: case.beta,
                uses_kl,
                desirable_weight: case.desirable_weight,
                undesirable_weight: case.undesirable_weight,
            },
            reference: None,
        };
        let out = kto.loss(&model, &batch, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);
    }
}

/// The llama fixture as a one-label classifier with the llama-reward adapter (LoRA and its
/// `score` head) scores whole sequences as TRL's RewardTrainer does: at each row's last token that
/// is not the pad token, so a chosen row ending with it is scored before it, and one holding it
/// within is scored at its end.
#[test]
fn reward_model_losses_and_metrics_equal_trl_through_the_model() {
    use burnish_align::{Reward, ScoredPairs, Strategy};
    use burnish_data::PairExample;
    let g = golden().reward;
    let device = Default::default();
    let model = with_fixture_adapter(llama(), &g.adapter);
    assert!(model.is_classifier() && model.lm_head.is_none());
    assert_eq!(g.cases.len(), 3);
    for case in &g.cases {
        let pairs: Vec<PairExample> = g
            .pairs
            .iter()
            .enumerate()
            .map(|(i, p)| PairExample {
                prompt_ids: Vec::new(),
                chosen_ids: p.chosen_ids.clone(),
                rejected_ids: p.rejected_ids.clone(),
                margin: case.margins.as_ref().map(|m| m[i]),
            })
            .collect();
        let refs: Vec<&PairExample> = pairs.iter().collect();
        let batch = ScoredPairs::from_pairs(&refs, g.pad_token_id, &device);
        let pad_ended = g.pairs[1].chosen_ids.len() - 2;
        assert_eq!(batch.positions[1], pad_ended, "scored before its pad token");
        let rewards = Reward::rewards(&model, &batch, None)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for (ours, theirs) in rewards.iter().zip(&case.rewards) {
            assert!(
                (f64::from(*ours) - theirs).abs() < 1e-5,
                "{}: reward {ours} vs TRL {theirs}",
                case.name
            );
        }
        let reward = Reward {
            center_rewards_coefficient: case.center_rewards_coefficient,
        };
        let out = reward.loss(&model, &batch, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);
    }
}

/// A reward model's sequences are TRL's: the loader's pairs, prompt and completion joined, are
/// the ids `RewardTrainer` makes of each whole conversation (through the chat template) and of
/// each text row (EOS appended).
#[test]
fn reward_model_sequences_are_trls_tokenization_of_each_row() {
    use burnish_data::{ChatTemplate, DataConfig, Encoder, Tokenizer, TrainOn, load};
    let g = golden().reward;
    let dir = model_dir("llama");
    let encoder = Encoder::new(
        Tokenizer::from_dir(&dir).unwrap(),
        ChatTemplate::from_dir(&dir).unwrap(),
        TrainOn::Assistant,
    );
    let file = dir.join("../../data/rows/preference.jsonl");
    let data = load(&[file.as_path()], &encoder, &DataConfig::default()).unwrap();
    assert_eq!(data.pairs.len(), g.tokenized.len());
    for (i, (pair, theirs)) in data.pairs.iter().zip(&g.tokenized).enumerate() {
        assert_eq!(
            pair.chosen().input_ids,
            theirs.chosen_ids,
            "row {i}: chosen"
        );
        assert_eq!(
            pair.rejected().input_ids,
            theirs.rejected_ids,
            "row {i}: rejected"
        );
    }
}

/// GRPO's loss and metrics through the model equal TRL's `GRPOTrainer._compute_loss` for every
/// loss type, with and without the KL term against the adapter-off reference, at the sampling
/// temperature, on the update that drew the completions and on one that reuses them (their old
/// log-probabilities given: the ratios clip, and the clipping metrics are TRL's); its advantages
/// equal TRL's for every `scale_rewards`.
#[test]
fn grpo_losses_and_advantages_equal_trl() {
    use burnish_align::{Grpo, GrpoLossKind, Rollouts, ScaleRewards, Strategy, advantages};
    let g = golden().grpo;
    let device = Default::default();
    let model = with_fixture_adapter(llama(), &g.adapter);
    let rows: Vec<(&[u32], &[u32], bool)> = g
        .completions
        .iter()
        .enumerate()
        .map(|(i, c)| (g.prompts[i / 2].as_slice(), c.as_slice(), true))
        .collect();
    let drawn = Rollouts::<AD>::new(&rows, &g.advantages, 0, &device);
    assert_eq!(g.cases.len(), 6);
    for case in &g.cases {
        // Old log-probabilities in the trained ones' layout: position `t` predicts token
        // `t + 1`, so a completion's `k`-th token is predicted at its prompt's length + k − 1.
        let mut batch = drawn.clone();
        if let Some(old) = &case.old_per_token_logps {
            let [rows, width] = batch.tokens.mask.dims();
            let mut values = vec![0f32; rows * width];
            for (i, old) in old.iter().enumerate() {
                let start = g.prompts[i / 2].len() - 1;
                for (k, value) in old.iter().take(g.completions[i].len()).enumerate() {
                    values[i * width + start + k] = *value;
                }
            }
            let old = Tensor::<AD, 2>::from_data(TensorData::new(values, [rows, width]), &device);
            batch.old_logps = Some(old);
        }
        let grpo = Grpo::<AD> {
            loss: match case.loss_type.as_str() {
                "dapo" => GrpoLossKind::Dapo,
                "grpo" => GrpoLossKind::Grpo,
                _ => GrpoLossKind::DrGrpo,
            },
            beta: case.beta,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            temperature: case.temperature,
            max_completion_length: case.max_completion_length,
            reference: None,
        };
        let out = grpo.loss(&model, &batch, None);
        assert_trl_step(&case.name, out, case.loss, &case.metrics);
    }
    for (name, scale) in [
        ("group", ScaleRewards::Group),
        ("batch", ScaleRewards::Batch),
        ("none", ScaleRewards::None),
    ] {
        let theirs = &g.scaled[name];
        let (ours, zero) = advantages(&g.rewards, g.num_generations, scale);
        for (a, b) in ours.iter().zip(&theirs.advantages) {
            assert!(
                (a - b).abs() < 1e-5,
                "{name}: {ours:?} vs TRL {:?}",
                theirs.advantages
            );
        }
        assert!(
            (zero - theirs.frac_reward_zero_std).abs() < 1e-6,
            "{name}: {zero}"
        );
    }

    // TRL's own reward functions.
    use burnish_align::RewardFunction;
    let f = &g.functions;
    let none = serde_json::Map::new();
    for (text, theirs) in f.texts.iter().zip(&f.think_format) {
        let ours = RewardFunction::ThinkFormat.score(text, 0, &none);
        assert_eq!(ours, Some(*theirs), "think_format({text:?})");
    }
    let overlong = RewardFunction::SoftOverlong {
        max: f.max_completion_len,
        cache: f.soft_punish_cache,
    };
    for (length, theirs) in f.lengths.iter().zip(&f.soft_overlong) {
        let ours = overlong.score("", *length, &none).unwrap();
        assert!(
            (ours - theirs).abs() < 1e-12,
            "soft_overlong({length}): {ours} vs {theirs}"
        );
    }
}

#[derive(Deserialize)]
struct AdamWGolden {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    max_grad_norm: f64,
    #[serde(default)]
    loraplus_lr_ratio: Option<f64>,
    #[serde(flatten)]
    run: AdamWRun,
    /// `adamw_groups`: the runs by case.
    #[serde(flatten)]
    cases: std::collections::HashMap<String, serde_json::Value>,
}

/// Losses and gradient norms of three steps.
#[derive(Deserialize, Default)]
struct AdamWRun {
    #[serde(default)]
    losses: Vec<f64>,
    #[serde(default)]
    grad_norms: Vec<f64>,
}

impl AdamWGolden {
    /// The optimizer these steps were taken with, LoRA+ at `loraplus_lr_ratio`.
    fn config(&self, loraplus_lr_ratio: Option<f64>) -> burnish_align::AdamWConfig {
        burnish_align::AdamWConfig {
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            weight_decay: self.weight_decay,
            max_grad_norm: Some(self.max_grad_norm),
            loraplus_lr_ratio,
        }
    }
}

fn adamw_golden(name: &str) -> AdamWGolden {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/losses")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn three_adamw_steps_reproduce_peft_and_torch() {
    three_adamw_steps(false);
}

#[test]
fn three_adamw_steps_with_recomputed_layers_reproduce_peft_and_torch() {
    three_adamw_steps(true);
}

/// PEFT's three AdamW steps on the fixture, the layers' activations kept or, with
/// `checkpointing`, recomputed in the backward pass.
fn three_adamw_steps(checkpointing: bool) {
    let g = adamw_golden("adamw_steps.json");
    let (model, tracked) = three_steps("llama-qv", g.config(None), g.lr, &g.run, checkpointing);
    assert_eq!(tracked, 8, "state for the 8 adapter matrices only");
    assert_adapter_equals(&model, "adamw_steps.safetensors", "");
}

/// The DoRA adapter's three steps under the parameter groups of transformers' `Trainer` (DoRA's
/// magnitudes decayed) and of PEFT's LoRA+ (the B factors and magnitudes at a larger rate).
#[test]
fn adamw_groups_reproduce_the_trainer_and_loraplus() {
    let g = adamw_golden("adamw_groups.json");
    for (case, ratio) in [("trainer", None), ("loraplus", g.loraplus_lr_ratio)] {
        let run: AdamWRun = serde_json::from_value(g.cases[case].clone()).unwrap();
        let (model, tracked) = three_steps("llama-dora", g.config(ratio), g.lr, &run, false);
        assert_eq!(tracked, 18, "A, B and the magnitude of six projections");
        assert_adapter_equals(&model, "adamw_groups.safetensors", &format!("{case}/"));
    }
}

/// Three optimizer steps from the fixture `adapter` on the `sft` batch, each step's loss and
/// gradient norm checked against `run`'s: the model after them and how many parameters hold
/// optimizer state.
fn three_steps(
    adapter: &str,
    config: burnish_align::AdamWConfig,
    lr: f64,
    run: &AdamWRun,
    checkpointing: bool,
) -> (burnish_model::Decoder<AD>, usize) {
    use burn::optim::GradientsParams;
    use burnish_align::AdamW;
    use burnish_model::ActivationCheckpoints;

    let sft = golden().sft;
    let device = Default::default();
    let mut model = with_fixture_adapter(llama(), adapter);
    let (rows, len) = (sft.input_ids.len(), sft.input_ids[0].len());
    let flat: Vec<i64> = sft.input_ids.iter().flatten().copied().collect();
    let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(flat, [rows, len]), &device);
    let mask = shifted_mask::<AD>(&sft.labels, &device);

    let mut optimizer = AdamW::<AD>::new(config);
    for step in 0..3 {
        let mut checkpoints = checkpointing.then(ActivationCheckpoints::default);
        let hidden = match checkpoints.as_mut() {
            Some(checkpoints) => model.hidden_states_checkpointed(ids.clone(), None, checkpoints),
            None => model.hidden_states(ids.clone()),
        };
        let logits = model.head(hidden).narrow(1, 0, len - 1);
        let loss =
            masked_token_loss(logits, ids.clone().narrow(1, 1, len - 1), mask.clone()).mean();
        let value = loss.clone().into_scalar() as f64;
        assert!(
            (value - run.losses[step]).abs() <= 1e-5,
            "step {step}: loss {value} vs torch {}",
            run.losses[step]
        );
        let grads = match checkpoints {
            Some(checkpoints) => checkpoints.backward(&model, loss),
            None => GradientsParams::from_grads(loss.backward(), &model),
        };
        let (next, report) = optimizer.step(lr, model, &grads);
        model = next;
        let reference = run.grad_norms[step];
        assert!(
            (report.grad_norm - reference).abs() <= 1e-4 * reference,
            "step {step}: grad norm {} vs {reference}",
            report.grad_norm
        );
    }
    let tracked = optimizer.tracked_parameters();
    (model, tracked)
}

/// Every adapter tensor of `model` (A, B and DoRA's magnitudes) within 1e-5 of the one under
/// `prefix` in the fixture `file`.
fn assert_adapter_equals(model: &burnish_model::Decoder<AD>, file: &str, prefix: &str) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let bytes = std::fs::read(dir.join("losses").join(file)).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut compared = 0;
    for (name, linear) in model.linears() {
        let Some(lora) = &linear.lora else { continue };
        let values = |t: Tensor<AD, 2>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let mut tensors = vec![
            ("lora_A", values(lora.lora_a.val())),
            ("lora_B", values(lora.lora_b.val())),
        ];
        if let Some(m) = &lora.magnitude {
            tensors.push(("lora_magnitude_vector", values(m.val().unsqueeze())));
        }
        for (matrix, ours) in tensors {
            let key = format!("{prefix}{name}.{matrix}.weight");
            let theirs = burnish_peft::decode_f32(&expected.tensor(&key).unwrap()).unwrap();
            let worst = max_abs_diff(&ours, &theirs);
            assert!(
                worst <= 1e-5,
                "{key}: max |Δ| = {worst:e} after three steps"
            );
            compared += 1;
        }
    }
    assert!(compared >= 6, "{compared} tensors compared");
}

#[test]
fn schedules_equal_transformers_get_scheduler() {
    use burnish_align::{Schedule, ScheduleKind};
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/losses/golden.json");
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let g = &g["schedules"];
    assert_eq!(
        Schedule::warmup_from_ratio(0.25, 10),
        g["warmup_ratio_0.25_of_10"].as_u64().unwrap() as usize
    );
    for (name, kind) in [
        ("constant", ScheduleKind::Constant),
        ("linear", ScheduleKind::Linear),
        ("cosine", ScheduleKind::Cosine),
    ] {
        let schedule = Schedule {
            kind,
            peak_lr: g["peak_lr"].as_f64().unwrap(),
            warmup_steps: 3,
            total_steps: 10,
        };
        let expected: Vec<f64> = serde_json::from_value(g[name].clone()).unwrap();
        for (step, lr) in expected.iter().enumerate() {
            assert!(
                (schedule.lr(step) - lr).abs() <= 1e-12,
                "{name} step {step}: {} vs {lr}",
                schedule.lr(step)
            );
        }
    }
}
