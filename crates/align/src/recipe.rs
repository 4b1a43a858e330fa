//! Recipes: the TOML file a training run is described by, parsed into typed sections with every
//! default resolved and every value checked before anything is loaded or allocated. Unknown keys
//! are errors naming the key; `--set key=value` overrides apply dotted paths to the TOML before
//! it is read. The `[data]` section is the data loader's own configuration plus the files.

use std::path::{Path, PathBuf};

use burnish_data::DataConfig;
use burnish_model::BaseDtype;
use serde::{Deserialize, Serialize};

use crate::cpo::CpoLoss;
use crate::dpo::{DpoLoss, FDivergence};
use crate::error::RecipeError;
use crate::kto::KtoLoss;
use crate::schedule::ScheduleKind;
use crate::strategy::{Cpo, Dpo};

/// `[model]`: the base checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A local checkpoint directory, or a Hub model id `owner/name` (required).
    pub base: PathBuf,
    /// The Hub revision (branch, tag or commit) of a Hub `base` (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `pretrained` loads the base's weights; `random` draws fresh ones from `train.seed` and
    /// trains the whole model from scratch (the directory then needs only `config.json` and the
    /// tokenizer files) (default `pretrained`).
    #[serde(default)]
    pub init: ModelInit,
    /// Precision the frozen base weights are held in while an adapter trains: `f32`, or `bf16`
    /// for half the memory (activations, the adapter, optimizer state and the loss stay f32)
    /// (default `auto`: bf16 on a GPU with an `[adapter]`, f32 otherwise; the runner resolves
    /// it for its device).
    #[serde(default)]
    pub dtype: BaseDtype,
    /// Whether `base` names a Hub repo (decided when the recipe is read).
    #[serde(skip)]
    pub from_hub: bool,
    /// Where a Hub `base` was downloaded to (set by the caller that resolved it).
    #[serde(skip)]
    pub local: Option<PathBuf>,
}

impl ModelSection {
    /// The Hub id of `base`, when it names one rather than a local directory.
    pub fn hub_id(&self) -> Option<&str> {
        self.from_hub.then(|| self.base.to_str()).flatten()
    }

    /// The local checkpoint directory: `base`, or where the Hub one was downloaded to.
    pub fn dir(&self) -> &Path {
        self.local.as_deref().unwrap_or(&self.base)
    }
}

/// Whether a recipe path as written is shaped like a Hub id `owner/name`: relative, two plain
/// components made of the characters Hub ids use, the second not a data file name. Paths
/// starting with `.` or `/` are always local.
fn hub_shaped(path: &Path) -> bool {
    use std::path::Component;
    let names: Option<Vec<&str>> = path
        .components()
        .map(|c| match c {
            Component::Normal(name) => name.to_str(),
            _ => None,
        })
        .collect();
    let id_part = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    // `data/train.jsonl` is a file next to the recipe, not a dataset named `train.jsonl`.
    let file_like = |s: &str| {
        [".json", ".jsonl", ".parquet", ".csv", ".txt"]
            .iter()
            .any(|ext| s.ends_with(ext))
    };
    names.is_some_and(|n| n.len() == 2 && n.iter().all(|s| id_part(s)) && !file_like(n[1]))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelInit {
    #[default]
    Pretrained,
    Random,
}

/// `[adapter]`: LoRA settings; without this section the whole model is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSection {
    /// Rank (default 16).
    pub r: usize,
    /// Scale numerator: updates are scaled by `alpha / r` (default 32).
    pub alpha: f64,
    /// Dropout on the adapter input while training (default 0.05).
    pub dropout: f64,
    /// Module names or suffixes, a regex string, or `"all-linear"` (default `"all-linear"`).
    pub target_modules: TargetModules,
    /// Only these layer indices (default: all).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Scale by `alpha / √r` (default false).
    pub use_rslora: bool,
    /// DoRA: also learn the magnitude of each output row of every adapted weight (default
    /// false).
    pub use_dora: bool,
    /// `kaiming` (PEFT's default) or `gaussian` (default `kaiming`).
    pub init: AdapterInit,
    /// Start from this PEFT-format adapter instead of a fresh one (default: none).
    pub init_from: Option<PathBuf>,
    /// The keys the recipe sets itself (the others hold their defaults).
    #[serde(skip)]
    pub given: Vec<String>,
}

impl Default for AdapterSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: TargetModules::Named("all-linear".into()),
            layers_to_transform: None,
            use_rslora: false,
            use_dora: false,
            init: AdapterInit::Kaiming,
            init_from: None,
            given: Vec::new(),
        }
    }
}

/// `target_modules` as a list or a single string (`all-linear` or a regex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Named(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterInit {
    Kaiming,
    Gaussian,
}

/// What the run optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Chat SFT on conversations.
    Sft,
    /// Instruction tuning on instruction/response data (Alpaca and prompt/completion rows).
    Instruct,
    /// Direct preference optimisation on chosen/rejected pairs.
    Dpo,
    /// Odds-ratio preference optimisation on chosen/rejected pairs: SFT on the chosen replies
    /// and a penalty on the rejected ones, without a reference model.
    Orpo,
    /// Contrastive preference optimisation (and SimPO) on chosen/rejected pairs, without a
    /// reference model.
    Cpo,
    /// Kahneman–Tversky optimisation on completions labeled desirable or undesirable (or on
    /// preference pairs, split in two such completions).
    Kto,
    /// A reward model: the base becomes a sequence classifier with one output, trained to score
    /// the chosen sequence of each preference pair above the rejected one.
    Reward,
    /// Group relative policy optimisation on prompts alone: the policy completes each prompt
    /// several times and learns from reward models' scores of its own completions.
    Grpo,
}

/// The rows a strategy trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Single sequences (SFT, instruction tuning).
    Examples,
    /// Chosen/rejected pairs.
    Pairs,
    /// Completions labeled desirable or not.
    Labeled,
    /// Prompts alone, completed by the model as it trains.
    Prompts,
}

impl StrategyKind {
    /// The rows it trains on.
    pub fn rows(self) -> Rows {
        match self {
            Self::Sft | Self::Instruct => Rows::Examples,
            Self::Dpo | Self::Orpo | Self::Cpo | Self::Reward => Rows::Pairs,
            Self::Kto => Rows::Labeled,
            Self::Grpo => Rows::Prompts,
        }
    }

    /// The name a recipe gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Instruct => "instruct",
            Self::Dpo => "dpo",
            Self::Orpo => "orpo",
            Self::Cpo => "cpo",
            Self::Kto => "kto",
            Self::Reward => "reward",
            Self::Grpo => "grpo",
        }
    }
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// `sft`, `instruct`, `dpo`, `orpo`, `cpo`, `kto`, `reward` or `grpo` (default `sft`).
    pub strategy: StrategyKind,
    /// Passes over the training data (default 1); ignored when `max_steps` is set.
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: run the epochs).
    pub max_steps: Option<usize>,
    /// Rows per forward pass (default 4).
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step (default 1).
    pub gradient_accumulation: usize,
    /// Peak learning rate (default 2e-4).
    pub lr: f64,
    /// `constant`, `linear` or `cosine` after warmup (default `cosine`).
    pub schedule: ScheduleName,
    /// Warmup optimizer steps (default 0); exclusive with `warmup_ratio`.
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of all steps, rounded up (default 0).
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay on matrices and DoRA's magnitudes (default 0).
    pub weight_decay: f64,
    /// LoRA+: the adapters' B factors (and DoRA's magnitudes) learn at this many times `lr`
    /// (default: none, the same rate).
    pub loraplus_lr_ratio: Option<f64>,
    /// AdamW betas (default 0.9, 0.999).
    pub betas: (f64, f64),
    /// AdamW epsilon (default 1e-8).
    pub eps: f64,
    /// Clip the global gradient norm (default 1.0; 0 disables).
    pub max_grad_norm: f64,
    /// Pack several examples into rows of `data.max_length` tokens (default false).
    pub pack: bool,
    /// Keep only each layer's input between the forward and the backward pass and recompute
    /// the layers' activations there (default false): less memory, one more forward pass of
    /// the layers per step.
    pub gradient_checkpointing: bool,
    /// NEFTune's α: uniform noise of at most `α/√(seq·hidden)` added to the token embeddings
    /// of the trained forward passes (sft and instruct; default: none).
    pub neftune_noise_alpha: Option<f64>,
    /// Evaluate every this many optimizer steps (default 0: only at the end).
    pub eval_every: usize,
    /// Seed of adapter initialisation, shuffling and dropout (default 0).
    pub seed: u64,
    /// A step whose loss or gradient is not finite: `stop` the run, or `skip` the step (it is
    /// logged and counts towards `max_steps`) (default `stop`).
    pub on_nonfinite: OnNonFinite,
    /// Write a checkpoint every this many optimizer steps (default 0: never).
    pub save_every: usize,
    /// Keep the newest this many checkpoints (default 2).
    pub keep_checkpoints: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::Sft,
            epochs: 1,
            max_steps: None,
            micro_batch_size: 4,
            gradient_accumulation: 1,
            lr: 2e-4,
            schedule: ScheduleName::Cosine,
            warmup_steps: None,
            warmup_ratio: None,
            weight_decay: 0.0,
            loraplus_lr_ratio: None,
            betas: (0.9, 0.999),
            eps: 1e-8,
            max_grad_norm: 1.0,
            pack: false,
            gradient_checkpointing: false,
            neftune_noise_alpha: None,
            eval_every: 0,
            seed: 0,
            on_nonfinite: OnNonFinite::Stop,
            save_every: 0,
            keep_checkpoints: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleName {
    Constant,
    Linear,
    Cosine,
}

impl From<ScheduleName> for ScheduleKind {
    fn from(s: ScheduleName) -> Self {
        match s {
            ScheduleName::Constant => Self::Constant,
            ScheduleName::Linear => Self::Linear,
            ScheduleName::Cosine => Self::Cosine,
        }
    }
}

/// `[dpo]`: preference optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSection {
    /// Strength of the KL penalty (default 0.1).
    pub beta: f64,
    /// A loss type or a list of them, by TRL's names (default `sigmoid`).
    pub loss: DpoLosses,
    /// Each loss's weight when `loss` is a list (default: 1 each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<Vec<f64>>,
    /// Assumed label noise for `sigmoid`, `robust`, `exo_pair`, `aot` and `aot_unpaired`
    /// (default 0).
    pub label_smoothing: f64,
    /// DiscoPOP's temperature τ (default 0.05).
    pub discopop_tau: f64,
    /// `reverse_kl`, `forward_kl`, `js_divergence` or `alpha_divergence` (default
    /// `reverse_kl`).
    pub f_divergence_type: FDivergenceName,
    /// α of `alpha_divergence` (default 0.5).
    pub f_alpha_divergence_coef: f64,
    /// Add this times the chosen completions' mean NLL to the loss (RPO; default: none).
    pub rpo_alpha: Option<f64>,
    /// LD-DPO: the weight in [0, 1] of each completion's log-probs past the length it shares
    /// with the other completion of its pair (default: none, every token weighs 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ld_alpha: Option<f64>,
    /// WPO: weigh each pair's loss by how likely the policy finds its two completions
    /// (default false).
    pub use_weighting: bool,
    /// Compute the reference log-probs once before training instead of at every step
    /// (default false; always so for a full fine-tune and with `reference_adapter`).
    pub precompute_ref: bool,
    /// A PEFT-format adapter that, on the base, makes the reference model instead of the bare
    /// base (TRL's `ref_adapter_name`; default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_adapter: Option<PathBuf>,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: DpoLosses::One(DpoLossName::Sigmoid),
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence_type: FDivergenceName::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            rpo_alpha: None,
            ld_alpha: None,
            use_weighting: false,
            precompute_ref: false,
            reference_adapter: None,
        }
    }
}

/// DPO's loss types, by TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossName {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    SigmoidNorm,
    Sft,
}

/// One loss type, or several summed with `loss_weights`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DpoLosses {
    One(DpoLossName),
    Many(Vec<DpoLossName>),
}

/// A name or a list of names; an unknown name is an error listing the known ones.
impl<'de> Deserialize<'de> for DpoLosses {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IntoDeserializer, SeqAccess, Visitor};
        struct Names;
        impl<'de> Visitor<'de> for Names {
            type Value = DpoLosses;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a DPO loss type or a list of them")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<DpoLosses, E> {
                DpoLossName::deserialize(name.into_deserializer()).map(DpoLosses::One)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DpoLosses, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element()? {
                    names.push(name);
                }
                Ok(DpoLosses::Many(names))
            }
        }
        deserializer.deserialize_any(Names)
    }
}

impl DpoLosses {
    fn names(&self) -> &[DpoLossName] {
        match self {
            Self::One(name) => std::slice::from_ref(name),
            Self::Many(names) => names,
        }
    }
}

/// f-DPO's divergences, by TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FDivergenceName {
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

impl DpoSection {
    /// The strategy these settings describe: the loss terms with their weights (RPO's NLL term
    /// last), the strength and the divergence.
    pub fn strategy(&self) -> Dpo {
        let e = self.label_smoothing;
        let names = self.loss.names();
        let weights = self
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; names.len()]);
        let mut terms: Vec<(DpoLoss, f64)> = names
            .iter()
            .zip(weights)
            .map(|(name, weight)| {
                let loss = match name {
                    DpoLossName::Sigmoid => DpoLoss::Sigmoid { label_smoothing: e },
                    DpoLossName::Hinge => DpoLoss::Hinge,
                    DpoLossName::Ipo => DpoLoss::Ipo,
                    DpoLossName::Robust => DpoLoss::Robust { label_smoothing: e },
                    DpoLossName::ExoPair => DpoLoss::ExoPair { label_smoothing: e },
                    DpoLossName::NcaPair => DpoLoss::NcaPair,
                    DpoLossName::BcoPair => DpoLoss::BcoPair,
                    DpoLossName::SppoHard => DpoLoss::SppoHard,
                    DpoLossName::Aot => DpoLoss::Aot { label_smoothing: e },
                    DpoLossName::AotUnpaired => DpoLoss::AotUnpaired { label_smoothing: e },
                    DpoLossName::ApoZero => DpoLoss::ApoZero,
                    DpoLossName::ApoDown => DpoLoss::ApoDown,
                    DpoLossName::Discopop => DpoLoss::Discopop {
                        tau: self.discopop_tau,
                    },
                    DpoLossName::SigmoidNorm => DpoLoss::SigmoidNorm,
                    DpoLossName::Sft => DpoLoss::Sft,
                };
                (loss, weight)
            })
            .collect();
        terms.extend(self.rpo_alpha.map(|alpha| (DpoLoss::Sft, alpha)));
        Dpo {
            terms,
            beta: self.beta,
            divergence: match self.f_divergence_type {
                FDivergenceName::ReverseKl => FDivergence::ReverseKl,
                FDivergenceName::ForwardKl => FDivergence::ForwardKl,
                FDivergenceName::JsDivergence => FDivergence::JsDivergence,
                FDivergenceName::AlphaDivergence => FDivergence::Alpha {
                    alpha: self.f_alpha_divergence_coef,
                },
            },
            ld_alpha: self.ld_alpha,
            use_weighting: self.use_weighting,
        }
    }

    /// Why these settings cannot describe a loss, if they cannot.
    fn check(&self) -> Result<(), String> {
        let names = self.loss.names();
        if names.is_empty() {
            return Err("`dpo.loss` is an empty list: name at least one loss type".into());
        }
        if let Some(weights) = &self.loss_weights {
            if weights.len() != names.len() {
                return Err(format!(
                    "`dpo.loss_weights` has {} weights for {} loss types: give one weight per \
                     type in `dpo.loss`",
                    weights.len(),
                    names.len()
                ));
            }
            if weights.iter().any(|w| !w.is_finite()) {
                return Err("`dpo.loss_weights` must all be numbers".into());
            }
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err("`dpo.beta` must be a positive number".into());
        }
        if self.rpo_alpha.is_some_and(|a| !(a.is_finite() && a >= 0.0)) {
            return Err("`dpo.rpo_alpha` must be a number >= 0".into());
        }
        if self.rpo_alpha.is_some() && names.contains(&DpoLossName::Sft) {
            return Err(
                "`dpo.rpo_alpha` adds the `sft` loss, which `dpo.loss` already lists: keep one \
                 (weigh it with `dpo.loss_weights`)"
                    .into(),
            );
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err("`dpo.label_smoothing` must be in [0, 0.5)".into());
        }
        if names.contains(&DpoLossName::ExoPair) && self.label_smoothing == 0.0 {
            return Err(
                "the `exo_pair` loss needs `dpo.label_smoothing` > 0 (its authors use 1e-3)".into(),
            );
        }
        if !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) {
            return Err("`dpo.discopop_tau` must be a positive number".into());
        }
        if !self.f_alpha_divergence_coef.is_finite() {
            return Err("`dpo.f_alpha_divergence_coef` must be a number".into());
        }
        if self.ld_alpha.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            return Err(
                "`dpo.ld_alpha` must be in [0, 1]: 1 weighs every token alike, 0 drops the \
                 tokens past the shared length"
                    .into(),
            );
        }
        if self.use_weighting && (names.contains(&DpoLossName::Sft) || self.rpo_alpha.is_some()) {
            return Err(
                "`dpo.use_weighting` (WPO) with the `sft` term (or `dpo.rpo_alpha`) is a \
                 combination TRL 1.16 fails to compute, so burnish cannot check it against TRL: \
                 drop one of them"
                    .into(),
            );
        }
        if self.use_weighting
            && let Some(name) = names
                .iter()
                .find(|n| matches!(n, DpoLossName::Aot | DpoLossName::AotUnpaired))
        {
            return Err(format!(
                "`dpo.use_weighting` (WPO) does not apply to the {} loss, which sorts its \
                 margins across the batch (TRL refuses the pair too)",
                toml::Value::try_from(name).expect("a loss name serializes")
            ));
        }
        // The terms follow the names, in order.
        let dpo = self.strategy();
        if dpo.divergence != FDivergence::ReverseKl
            && let Some((name, _)) = names
                .iter()
                .zip(&dpo.terms)
                .find(|(_, (loss, _))| !loss.allows_f_divergence())
        {
            return Err(format!(
                "`dpo.f_divergence_type` other than \"reverse_kl\" applies to the sigmoid, \
                 sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft losses only, and \
                 `dpo.loss` holds {}",
                toml::Value::try_from(name).expect("a loss name serializes")
            ));
        }
        Ok(())
    }
}

/// `[orpo]`: odds-ratio preference optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrpoSection {
    /// Weight λ of the odds-ratio term against the chosen replies' NLL (default 0.1).
    pub beta: f64,
}

impl Default for OrpoSection {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

/// `[cpo]`: contrastive preference optimisation (and SimPO) settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpoSection {
    /// Scale of the log-prob difference (default 0.1).
    pub beta: f64,
    /// `sigmoid`, `hinge`, `ipo`, `simpo` or `alphapo` (SimPO with AlphaPO's rewards and no NLL
    /// term) (default `sigmoid`).
    pub loss: CpoLossName,
    /// Assumed label noise for `sigmoid` and `simpo` (default 0).
    pub label_smoothing: f64,
    /// Weight of the chosen completions' NLL; 0 for SimPO (default 1).
    pub cpo_alpha: f64,
    /// SimPO's target reward margin γ (default 0.5).
    pub simpo_gamma: f64,
    /// AlphaPO's reward shape α: rewards `(1 - p^(-α)) / α` of the completions' probabilities
    /// `p` instead of their log-probs (default 0: the log-probs).
    pub alpha: f64,
}

impl Default for CpoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: CpoLossName::Sigmoid,
            label_smoothing: 0.0,
            cpo_alpha: 1.0,
            simpo_gamma: 0.5,
            alpha: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpoLossName {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
    Alphapo,
}

impl CpoSection {
    /// The strategy these settings describe; `alphapo` is SimPO without the NLL term, as TRL
    /// reads it.
    pub fn strategy(&self) -> Cpo {
        let label_smoothing = self.label_smoothing;
        let simpo = CpoLoss::Simpo {
            gamma: self.simpo_gamma,
            label_smoothing,
        };
        let (loss, cpo_alpha) = match self.loss {
            CpoLossName::Sigmoid => (CpoLoss::Sigmoid { label_smoothing }, self.cpo_alpha),
            CpoLossName::Hinge => (CpoLoss::Hinge, self.cpo_alpha),
            CpoLossName::Ipo => (CpoLoss::Ipo, self.cpo_alpha),
            CpoLossName::Simpo => (simpo, self.cpo_alpha),
            CpoLossName::Alphapo => (simpo, 0.0),
        };
        Cpo {
            loss,
            beta: self.beta,
            cpo_alpha,
            alpha: self.alpha,
        }
    }
}

/// `[kto]`: Kahneman–Tversky optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoSection {
    /// Scale of the log-ratios (default 0.1).
    pub beta: f64,
    /// `kto` or `apo_zero_unpaired` (default `kto`).
    pub loss: KtoLossName,
    /// Weight of the desirable completions' losses (default 1).
    pub desirable_weight: f64,
    /// Weight of the undesirable completions' losses (default 1).
    pub undesirable_weight: f64,
    /// A PEFT-format adapter that, on the base, makes the reference model instead of the bare
    /// base (TRL's `ref_adapter_name`; default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_adapter: Option<PathBuf>,
}

impl Default for KtoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: KtoLossName::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            reference_adapter: None,
        }
    }
}

/// KTO's losses, by TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KtoLossName {
    #[serde(rename = "kto")]
    Kto,
    #[serde(rename = "apo_zero_unpaired")]
    ApoZeroUnpaired,
}

impl KtoSection {
    /// The loss these settings describe.
    pub fn loss(&self) -> KtoLoss {
        KtoLoss {
            beta: self.beta,
            uses_kl: self.loss == KtoLossName::Kto,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
        }
    }
}

/// `[reward]`: reward-model settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSection {
    /// Weight of the mean squared sum of each pair's rewards, which keeps rewards centred on
    /// zero (TRL's `center_rewards_coefficient`; default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub center_rewards_coefficient: Option<f64>,
}

impl RewardSection {
    /// The strategy these settings describe.
    pub fn strategy(&self) -> crate::reward::Reward {
        crate::reward::Reward {
            center_rewards_coefficient: self.center_rewards_coefficient,
        }
    }
}

/// `[grpo]`: group relative policy optimisation settings, with TRL's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Sequence-classifier checkpoints (one label each, e.g. a merged `train.strategy =
    /// "reward"` run) whose weighted scores count in each completion's reward.
    pub reward_models: Vec<PathBuf>,
    /// Each reward model's weight (default: 1 each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_weights: Option<Vec<f64>>,
    /// Rules and programs that count in the reward too (`[[grpo.reward_functions]]`); at
    /// least one reward model or function is required.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reward_functions: Vec<RewardFunctionSection>,
    /// Completions drawn per prompt (default 8).
    pub num_generations: usize,
    /// Optimizer steps taken on each step's completions (TRL's μ, default 1): after the first,
    /// the ratio `π/π_old` is taken against the log-probabilities they were drawn with.
    pub num_iterations: usize,
    /// Longest completion in tokens (default 512).
    pub max_completion_length: usize,
    /// Sampling temperature, also that of the trained log-probabilities (default 1).
    pub temperature: f64,
    /// Nucleus sampling (default 1: off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (default: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Weight of the KL term against the reference (default 0: no reference pass).
    pub beta: f64,
    /// The ratio's clipping range below 1 (and above, unless `epsilon_high`; default 0.2).
    pub epsilon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// `dapo`, `grpo` or `dr_grpo` (default `dapo`).
    pub loss: GrpoLossName,
    /// A PEFT-format adapter that, on the base, makes the KL term's reference instead of the
    /// bare base (e.g. the SFT adapter the run continues; default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_adapter: Option<PathBuf>,
    /// `group`, `batch` or `none` (default `group`).
    pub scale_rewards: ScaleRewardsName,
    /// Completions cut at `max_completion_length` train on nothing (default false).
    pub mask_truncated_completions: bool,
}

impl Default for GrpoSection {
    fn default() -> Self {
        Self {
            reward_models: Vec::new(),
            reward_weights: None,
            reward_functions: Vec::new(),
            num_generations: 8,
            num_iterations: 1,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss: GrpoLossName::Dapo,
            reference_adapter: None,
            scale_rewards: ScaleRewardsName::Group,
            mask_truncated_completions: false,
        }
    }
}

/// `[[grpo.reward_functions]]`: one rule or program that scores completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardFunctionSection {
    /// `think_format`, `soft_overlong`, `contains` or `program`.
    pub kind: RewardFunctionKind,
    /// Its weight in the reward (default 1).
    #[serde(default = "unit_weight")]
    pub weight: f64,
    /// `soft_overlong`: the length from which the penalty is −1 (TRL's `max_completion_len`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_len: Option<usize>,
    /// `soft_overlong`: the length over which the penalty grows (TRL's `soft_punish_cache`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_punish_cache: Option<usize>,
    /// `contains`: the prompt row's column a completion must contain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `program`: the program and its arguments (see `RewardProgram`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `program`: the reward's name in the metrics (`rewards/<name>/mean`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `program`: the directory it runs in (default: the recipe's, so that its relative paths
    /// are read as the recipe's are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// A reward function as its section describes it.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSpec {
    /// A rule computed here.
    Rule(crate::grpo::RewardFunction),
    /// A program of the user's, started with `command` in `dir`.
    Program {
        name: String,
        command: Vec<String>,
        dir: PathBuf,
    },
}

fn unit_weight() -> f64 {
    1.0
}

/// The reward functions, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardFunctionKind {
    ThinkFormat,
    SoftOverlong,
    Contains,
    Program,
}

impl RewardFunctionSection {
    /// The rule or program, or why these keys do not describe one.
    pub fn function(&self) -> Result<RewardSpec, String> {
        use crate::grpo::RewardFunction;
        let name = toml::Value::try_from(self.kind).expect("a kind serializes");
        let only = |allowed: &[&str]| -> Result<(), String> {
            let given = [
                ("max_completion_len", self.max_completion_len.is_some()),
                ("soft_punish_cache", self.soft_punish_cache.is_some()),
                ("field", self.field.is_some()),
                ("command", self.command.is_some()),
                ("name", self.name.is_some()),
                ("dir", self.dir.is_some()),
            ];
            match given.iter().find(|(k, set)| *set && !allowed.contains(k)) {
                Some((key, _)) => Err(format!(
                    "`grpo.reward_functions`: `{key}` does not apply to kind {name}"
                )),
                None => Ok(()),
            }
        };
        if !self.weight.is_finite() {
            return Err("`grpo.reward_functions`: `weight` must be a number".into());
        }
        match self.kind {
            RewardFunctionKind::ThinkFormat => {
                only(&[])?;
                Ok(RewardSpec::Rule(RewardFunction::ThinkFormat))
            }
            RewardFunctionKind::SoftOverlong => {
                only(&["max_completion_len", "soft_punish_cache"])?;
                match (self.max_completion_len, self.soft_punish_cache) {
                    (Some(max), Some(cache)) if cache <= max => {
                        Ok(RewardSpec::Rule(RewardFunction::SoftOverlong {
                            max,
                            cache,
                        }))
                    }
                    _ => Err("`grpo.reward_functions`: kind \"soft_overlong\" needs \
                         `max_completion_len` and a `soft_punish_cache` no larger than it"
                        .into()),
                }
            }
            RewardFunctionKind::Contains => {
                only(&["field"])?;
                match &self.field {
                    Some(field) if !field.is_empty() => {
                        Ok(RewardSpec::Rule(RewardFunction::Contains {
                            field: field.clone(),
                        }))
                    }
                    _ => Err(
                        "`grpo.reward_functions`: kind \"contains\" needs `field`, the prompt \
                         rows' column to look for"
                            .into(),
                    ),
                }
            }
            RewardFunctionKind::Program => {
                only(&["command", "name", "dir"])?;
                let name = match &self.name {
                    Some(name) if !name.trim().is_empty() => name.clone(),
                    _ => {
                        return Err("`grpo.reward_functions`: kind \"program\" needs `name`, \
                                    the reward's name in the metrics"
                            .into());
                    }
                };
                match &self.command {
                    Some(command) if !command.is_empty() => Ok(RewardSpec::Program {
                        name,
                        command: command.clone(),
                        dir: self.dir.clone().unwrap_or_else(|| PathBuf::from(".")),
                    }),
                    _ => Err(format!(
                        "`grpo.reward_functions`: kind \"program\" ({name}) needs `command`, \
                         the program and its arguments, e.g. `command = [\"python3\", \
                         \"rewards.py\"]`"
                    )),
                }
            }
        }
    }
}

impl RewardSpec {
    /// Its name in the metrics.
    pub fn name(&self) -> String {
        match self {
            Self::Rule(rule) => rule.name(),
            Self::Program { name, .. } => name.clone(),
        }
    }
}

/// GRPO's losses, by TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossName {
    Dapo,
    Grpo,
    DrGrpo,
}

/// `scale_rewards`, by TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewardsName {
    Group,
    Batch,
    None,
}

impl GrpoSection {
    /// The loss these settings describe (its reference set by the run).
    pub fn strategy<B: burn::tensor::backend::AutodiffBackend>(&self) -> crate::grpo::Grpo<B> {
        use crate::grpo::{Grpo, GrpoLossKind};
        Grpo {
            loss: match self.loss {
                GrpoLossName::Dapo => GrpoLossKind::Dapo,
                GrpoLossName::Grpo => GrpoLossKind::Grpo,
                GrpoLossName::DrGrpo => GrpoLossKind::DrGrpo,
            },
            beta: self.beta,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            temperature: self.temperature,
            max_completion_length: self.max_completion_length,
            reference: None,
        }
    }

    /// How rewards become advantages.
    pub fn scale(&self) -> crate::grpo::ScaleRewards {
        use crate::grpo::ScaleRewards;
        match self.scale_rewards {
            ScaleRewardsName::Group => ScaleRewards::Group,
            ScaleRewardsName::Batch => ScaleRewards::Batch,
            ScaleRewardsName::None => ScaleRewards::None,
        }
    }
}

/// `[data]`: the files and the data loader's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSection {
    /// Training files, JSONL or JSON (required).
    pub train: Vec<PathBuf>,
    /// Evaluation files (default: none; see `eval_ratio`).
    pub eval: Vec<PathBuf>,
    /// The chat template to train with instead of the base model's own (default: the model's).
    pub chat_template: Option<TemplateChoice>,
    /// The loader's own settings (`format`, `train_on`, `max_length`, ...).
    pub loader: DataConfig,
    /// The entries of `train` and `eval` that name Hub datasets (decided when the recipe is
    /// read).
    pub hub: std::collections::BTreeSet<PathBuf>,
    /// The local files of each Hub dataset entry (set by the caller that resolved them).
    pub local: std::collections::BTreeMap<PathBuf, Vec<PathBuf>>,
}

/// `data.chat_template`: a named built-in template, or a Jinja file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemplateChoice {
    /// One of `burnish_data::BUILTIN_TEMPLATES`.
    Builtin(String),
    /// A Jinja file (relative paths are the recipe's).
    File(PathBuf),
}

impl TemplateChoice {
    /// The value as a recipe writes it: a built-in's name or the file's path.
    fn written(&self) -> String {
        match self {
            Self::Builtin(name) => name.clone(),
            Self::File(path) => path.display().to_string(),
        }
    }

    /// The template, loaded.
    pub fn load(&self) -> Result<burnish_data::ChatTemplate, burnish_data::DataError> {
        match self {
            Self::Builtin(name) => burnish_data::ChatTemplate::builtin(name),
            Self::File(path) => burnish_data::ChatTemplate::from_file(path),
        }
    }
}

/// The prefix of an explicit Hub dataset entry (`hf://datasets/owner/name/path/in/repo`), as
/// huggingface_hub's file system spells it.
pub const HF_DATASETS: &str = "hf://datasets/";

/// A `[data]` entry that names a Hub dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDataset {
    /// The entry as written in the recipe.
    pub entry: PathBuf,
    /// `owner/name`.
    pub repo: String,
    /// A file or folder inside the repo; `None` for every JSON/JSONL file of the repo.
    pub path: Option<String>,
}

impl DataSection {
    /// The entries of `train` and `eval` that name Hub datasets rather than local files, each
    /// with its repo id and the path inside the repo it names (if any).
    pub fn hub_datasets(&self) -> Vec<HubDataset> {
        self.train
            .iter()
            .chain(&self.eval)
            .filter(|p| self.hub.contains(*p))
            .filter_map(|entry| {
                let text = entry.to_str()?;
                let spec = text.strip_prefix(HF_DATASETS).unwrap_or(text);
                let mut parts = spec.splitn(3, '/');
                let (owner, name) = (parts.next()?, parts.next()?);
                Some(HubDataset {
                    entry: entry.clone(),
                    repo: format!("{owner}/{name}"),
                    path: parts.next().filter(|p| !p.is_empty()).map(str::to_string),
                })
            })
            .collect()
    }

    /// The local files of `entries`: each local path itself, each resolved Hub entry its files.
    pub fn files(&self, entries: &[PathBuf]) -> Vec<PathBuf> {
        entries
            .iter()
            .flat_map(|e| match self.local.get(e) {
                Some(files) => files.clone(),
                None => vec![e.clone()],
            })
            .collect()
    }
}

/// `[check]`: held-out prompts the model answers greedily before and after training, each
/// answer compared token for token with the expected one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSection {
    /// Conversations (the last assistant turn is the expected answer), prompt/completion rows, or
    /// preference pairs (the chosen completion is expected, and the model should score it above
    /// the rejected one), read with the `[data]` settings (required).
    pub file: PathBuf,
    /// Longest answer, in tokens (default 64).
    #[serde(default = "default_check_tokens")]
    pub max_new_tokens: usize,
    /// Rows of the before/after table printed at the end (default 10).
    #[serde(default = "default_check_show")]
    pub show: usize,
}

fn default_check_tokens() -> usize {
    64
}

fn default_check_show() -> usize {
    10
}

/// `[output]`: where the run is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// The run directory (required).
    pub dir: PathBuf,
    /// Also write the metrics as TensorBoard event files under `dir/tensorboard` (default
    /// false).
    #[serde(default)]
    pub tensorboard: bool,
}

/// A complete, validated recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub model: ModelSection,
    pub adapter: Option<AdapterSection>,
    pub data: DataSection,
    pub train: TrainSection,
    pub dpo: DpoSection,
    pub orpo: OrpoSection,
    pub cpo: CpoSection,
    pub kto: KtoSection,
    pub reward: RewardSection,
    pub grpo: GrpoSection,
    pub check: Option<CheckSection>,
    pub output: OutputSection,
}

/// The recipe file as written, sections still untyped where they need special handling.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    model: ModelSection,
    adapter: Option<AdapterSection>,
    data: toml::Table,
    #[serde(default)]
    train: TrainSection,
    dpo: Option<DpoSection>,
    orpo: Option<OrpoSection>,
    cpo: Option<CpoSection>,
    kto: Option<KtoSection>,
    reward: Option<RewardSection>,
    grpo: Option<GrpoSection>,
    check: Option<CheckSection>,
    output: OutputSection,
}

/// One path or a list of them.
fn paths(value: Option<toml::Value>, key: &str) -> Result<Vec<PathBuf>, String> {
    match value {
        None => Ok(Vec::new()),
        Some(toml::Value::String(s)) => Ok(vec![PathBuf::from(s)]),
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(PathBuf::from(s)),
                other => Err(format!("`data.{key}` entries must be paths, found {other}")),
            })
            .collect(),
        Some(other) => Err(format!(
            "`data.{key}` must be a path or a list of paths, found {other}"
        )),
    }
}

/// Edit distance between two short words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// `message` with "did you mean `x`?" added when it names an unknown key or value and one of the
/// expected ones it lists is a likely typo of it.
fn with_suggestion(message: &str) -> String {
    let quoted = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let Some((head, expected)) = message.split_once("expected") else {
        return message.to_string();
    };
    let unknown = ["unknown field", "unknown variant"]
        .iter()
        .find_map(|marker| head.split_once(marker).map(|(_, rest)| quoted(rest)))
        .and_then(|q| q.into_iter().next());
    let first_line = expected.lines().next().unwrap_or_default();
    let best = unknown.and_then(|given| {
        quoted(first_line)
            .into_iter()
            .map(|candidate| (edit_distance(&given, &candidate), candidate))
            .filter(|(d, c)| *d <= 2.max(c.len() / 3))
            .min()
    });
    match best {
        Some((_, candidate)) => format!("{}; did you mean `{candidate}`?", message.trim_end()),
        None => message.to_string(),
    }
}

/// Applies one `key.path=value` override; the value is read as TOML (`0.5`, `true`, `["a"]`)
/// and otherwise taken as a string.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| format!("--set {spec}: expected key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().expect("split always yields one part");
    let mut table = doc;
    for part in parents {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("--set {spec}: `{part}` is not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

impl Recipe {
    /// Reads `path`, applies `overrides` (`key.path=value`), and validates everything.
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, overrides, path)
    }

    /// Parses recipe text; `path` names it in errors and anchors its relative paths.
    pub fn from_toml(text: &str, overrides: &[String], path: &Path) -> Result<Self, RecipeError> {
        let invalid = |detail: String| RecipeError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for spec in overrides {
            apply_override(&mut doc, spec).map_err(invalid)?;
        }
        let adapter_keys: Vec<String> = match doc.get("adapter") {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let file: RecipeFile = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(with_suggestion(&e.to_string())))?;

        for (section, given, strategy) in [
            ("dpo", file.dpo.is_some(), StrategyKind::Dpo),
            ("orpo", file.orpo.is_some(), StrategyKind::Orpo),
            ("cpo", file.cpo.is_some(), StrategyKind::Cpo),
            ("kto", file.kto.is_some(), StrategyKind::Kto),
            ("reward", file.reward.is_some(), StrategyKind::Reward),
            ("grpo", file.grpo.is_some(), StrategyKind::Grpo),
        ] {
            if given && file.train.strategy != strategy {
                return Err(invalid(format!(
                    "`[{section}]` applies to `train.strategy = \"{section}\"` only, and this \
                     recipe's is \"{}\": remove the section or change the strategy",
                    file.train.strategy.name()
                )));
            }
        }
        let mut data = file.data;
        let train = paths(data.remove("train"), "train").map_err(invalid)?;
        let eval = paths(data.remove("eval"), "eval").map_err(invalid)?;
        let chat_template = data.remove("chat_template");
        let loader: DataConfig = toml::Value::Table(data)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(with_suggestion(&format!("[data]: {e}"))))?;

        // Relative paths are relative to the recipe file.
        let base = path.parent().unwrap_or(Path::new(""));
        let anchor = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let builtins = burnish_data::BUILTIN_TEMPLATES.join(", ");
        let chat_template = match chat_template {
            None => None,
            Some(toml::Value::String(s))
                if burnish_data::BUILTIN_TEMPLATES.contains(&s.as_str()) =>
            {
                Some(TemplateChoice::Builtin(s))
            }
            Some(toml::Value::String(s)) => {
                let file = anchor(PathBuf::from(&s));
                if !file.is_file() {
                    return Err(invalid(format!(
                        "`data.chat_template = \"{s}\"` is neither a built-in template \
                         ({builtins}) nor a file ({} does not exist)",
                        file.display()
                    )));
                }
                Some(TemplateChoice::File(file))
            }
            Some(other) => {
                return Err(invalid(format!(
                    "`data.chat_template` must be a built-in template's name ({builtins}) or a \
                     Jinja file's path, found {other}"
                )));
            }
        };
        // A Hub id stays as written unless a local path of that name exists.
        let anchor_or_hub = |p: PathBuf| {
            let local = anchor(p.clone());
            let explicit = p.to_str().is_some_and(|s| s.starts_with(HF_DATASETS));
            if explicit || (hub_shaped(&p) && !local.exists()) {
                (p, true)
            } else {
                (local, false)
            }
        };
        let (model_base, from_hub) = anchor_or_hub(file.model.base.clone());
        let mut hub = std::collections::BTreeSet::new();
        let mut entries = |list: Vec<PathBuf>| -> Vec<PathBuf> {
            list.into_iter()
                .map(|p| {
                    let (path, remote) = anchor_or_hub(p);
                    if remote {
                        hub.insert(path.clone());
                    }
                    path
                })
                .collect()
        };
        let (train, eval) = (entries(train), entries(eval));
        let mut adapter = file.adapter;
        if let Some(a) = &mut adapter {
            a.init_from = a.init_from.take().map(anchor);
            a.given = adapter_keys;
        }
        let recipe = Self {
            model: ModelSection {
                base: model_base,
                from_hub,
                ..file.model
            },
            adapter,
            data: DataSection {
                train,
                eval,
                chat_template,
                loader,
                hub,
                local: Default::default(),
            },
            train: file.train,
            dpo: file.dpo.map_or_else(Default::default, |mut d| {
                d.reference_adapter = d.reference_adapter.take().map(anchor);
                d
            }),
            orpo: file.orpo.unwrap_or_default(),
            cpo: file.cpo.unwrap_or_default(),
            kto: file.kto.map_or_else(Default::default, |mut k| {
                k.reference_adapter = k.reference_adapter.take().map(anchor);
                k
            }),
            reward: file.reward.unwrap_or_default(),
            grpo: file.grpo.map_or_else(Default::default, |mut g| {
                g.reward_models = g.reward_models.into_iter().map(anchor).collect();
                g.reference_adapter = g.reference_adapter.take().map(anchor);
                for function in &mut g.reward_functions {
                    if function.kind == RewardFunctionKind::Program {
                        let dir = function.dir.take().unwrap_or_else(|| PathBuf::from("."));
                        function.dir = Some(anchor(dir));
                    }
                }
                g
            }),
            check: file.check.map(|c| CheckSection {
                file: anchor(c.file),
                ..c
            }),
            output: OutputSection {
                dir: anchor(file.output.dir),
                ..file.output
            },
        };
        recipe.validate().map_err(invalid)?;
        Ok(recipe)
    }

    /// The checks of a GRPO recipe.
    fn validate_grpo(&self) -> Result<(), String> {
        let g = &self.grpo;
        let t = &self.train;
        if g.reward_models.is_empty() && g.reward_functions.is_empty() {
            return Err(
                "`grpo.reward_models` and `grpo.reward_functions` are both empty: name at least \
                 one sequence-classifier checkpoint (a reward model, e.g. a `train.strategy = \
                 \"reward\"` run merged with `burnish merge`) or one `[[grpo.reward_functions]]`"
                    .into(),
            );
        }
        // Reward models are named by their directories, reward functions by their kinds.
        let mut names: Vec<String> = g
            .reward_models
            .iter()
            .filter_map(|dir| dir.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        for function in &g.reward_functions {
            let name = function.function()?.name();
            if names.contains(&name) {
                return Err(format!(
                    "`grpo.reward_functions`: two rewards are named `{name}`; their metrics \
                     would be one: give each its own"
                ));
            }
            names.push(name);
        }
        if let Some(w) = &g.reward_weights {
            if w.len() != g.reward_models.len() {
                return Err(format!(
                    "`grpo.reward_weights` has {} weights for {} reward models",
                    w.len(),
                    g.reward_models.len()
                ));
            }
            if w.iter().any(|w| !w.is_finite()) {
                return Err("`grpo.reward_weights` must all be numbers".into());
            }
        }
        if g.num_generations < 2 {
            return Err(
                "`grpo.num_generations` must be at least 2: advantages compare a prompt's \
                 completions with each other"
                    .into(),
            );
        }
        if g.num_iterations == 0 {
            return Err("`grpo.num_iterations` must be at least 1".into());
        }
        if !t.save_every.is_multiple_of(g.num_iterations) {
            return Err(format!(
                "`train.save_every` ({}) must be a multiple of `grpo.num_iterations` ({}): a \
                 checkpoint between the steps that reuse one draw of completions could not draw \
                 them again when resumed",
                t.save_every, g.num_iterations
            ));
        }
        let completions = t.micro_batch_size * t.gradient_accumulation;
        if !completions.is_multiple_of(g.num_generations) {
            return Err(format!(
                "`train.micro_batch_size × train.gradient_accumulation` ({completions}) counts \
                 the completions of an optimizer step and must be a multiple of \
                 `grpo.num_generations` ({}), as in TRL",
                g.num_generations
            ));
        }
        if g.max_completion_length == 0 {
            return Err("`grpo.max_completion_length` must be at least 1".into());
        }
        if !(g.temperature.is_finite() && g.temperature > 0.0) {
            return Err("`grpo.temperature` must be a positive number".into());
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err("`grpo.top_p` must be in (0, 1]".into());
        }
        if g.top_k == Some(0) {
            return Err("`grpo.top_k` must be at least 1".into());
        }
        if !(g.beta.is_finite() && g.beta >= 0.0) {
            return Err("`grpo.beta` must be a number >= 0".into());
        }
        for (key, e) in [
            ("grpo.epsilon", Some(g.epsilon)),
            ("grpo.epsilon_high", g.epsilon_high),
        ] {
            if e.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
                return Err(format!("`{key}` must be a positive number"));
            }
        }
        Ok(())
    }

    /// The checks of a reward model's recipe.
    fn validate_reward(&self) -> Result<(), String> {
        if let Some(c) = self.reward.center_rewards_coefficient
            && !(c.is_finite() && c >= 0.0)
        {
            return Err("`reward.center_rewards_coefficient` must be a number >= 0".into());
        }
        if self.data.loader.max_length.is_some()
            && self.data.loader.truncation == burnish_data::Truncation::KeepStart
        {
            return Err(
                "a reward model scores each sequence at its last token, so a pair cut to \
                 `data.max_length` would be scored where it was cut: set `data.truncation = \
                 \"drop\"` (with `data.on_bad_row = \"skip\"` to leave longer pairs out, as \
                 TRL's RewardTrainer does) or remove `data.max_length`"
                    .into(),
            );
        }
        if self.check.is_some() {
            return Err(
                "`[check]` compares generated answers, and a reward model does not generate: \
                 remove it and give `data.eval` (or `data.eval_ratio`), whose pairwise \
                 accuracy is reported"
                    .into(),
            );
        }
        Ok(())
    }

    /// Every check that needs no file or tensor.
    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        let positive = [
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.gradient_accumulation", t.gradient_accumulation),
            ("train.keep_checkpoints", t.keep_checkpoints),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{key}` must be at least 1"));
        }
        if t.max_steps.is_none() && t.epochs == 0 {
            return Err("`train.epochs` must be at least 1 (or set `train.max_steps`)".into());
        }
        if t.max_steps == Some(0) {
            return Err("`train.max_steps` must be at least 1".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err("`train.lr` must be a positive number".into());
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return Err("set `train.warmup_steps` or `train.warmup_ratio`, not both".into());
        }
        if let Some(r) = t.warmup_ratio
            && !(0.0..1.0).contains(&r)
        {
            return Err("`train.warmup_ratio` must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&t.betas.0) || !(0.0..1.0).contains(&t.betas.1) {
            return Err("`train.betas` must each be in [0, 1)".into());
        }
        let at_least_zero = |x: f64| x.is_finite() && x >= 0.0;
        let fine = at_least_zero(t.max_grad_norm)
            && at_least_zero(t.weight_decay)
            && t.eps.is_finite()
            && t.eps > 0.0;
        if !fine {
            return Err(
                "`train.max_grad_norm` and `train.weight_decay` must be numbers >= 0, \
                 `train.eps` a number > 0"
                    .into(),
            );
        }
        if let Some(ratio) = t.loraplus_lr_ratio {
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err("`train.loraplus_lr_ratio` must be a number > 0 (LoRA+'s \
                            authors suggest 16)"
                    .into());
            }
            if self.adapter.is_none() {
                return Err(
                    "`train.loraplus_lr_ratio` sets the learning rate of LoRA's B \
                            factors, and this recipe trains every weight (no `[adapter]`)"
                        .into(),
                );
            }
        }
        let dtype = self.model.dtype;
        if (dtype == BaseDtype::Bf16 || dtype.is_nf4()) && self.adapter.is_none() {
            return Err(format!(
                "`model.dtype = \"{}\"` holds a frozen base, which needs an `[adapter]` \
                 section: without one every weight trains, in f32",
                self.model.dtype
            ));
        }
        if t.pack && self.data.loader.max_length.is_none() {
            return Err("`train.pack` needs `data.max_length` (the packed row length)".into());
        }
        if t.pack && t.strategy.rows() != Rows::Examples {
            return Err(format!(
                "`train.pack` is for sft and instruct; the rows of `train.strategy = \"{}\"` \
                 are not packed",
                t.strategy.name()
            ));
        }
        if let Some(alpha) = t.neftune_noise_alpha {
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err("`train.neftune_noise_alpha` must be a positive number".into());
            }
            if t.strategy.rows() != Rows::Examples {
                return Err(format!(
                    "`train.neftune_noise_alpha` applies to sft and instruct, and this recipe's \
                     strategy is \"{}\": remove it",
                    t.strategy.name()
                ));
            }
        }
        let k = &self.kto;
        if t.strategy == StrategyKind::Kto && k.loss == KtoLossName::Kto && t.micro_batch_size < 2 {
            return Err(
                "`kto.loss = \"kto\"` estimates its KL term from each micro-batch's prompts \
                 paired with other rows' completions: `train.micro_batch_size` must be at least \
                 2 (or use `kto.loss = \"apo_zero_unpaired\"`, which has no KL term)"
                    .into(),
            );
        }
        if !(k.beta.is_finite() && k.beta > 0.0) {
            return Err("`kto.beta` must be a positive number".into());
        }
        for (key, w) in [
            ("kto.desirable_weight", k.desirable_weight),
            ("kto.undesirable_weight", k.undesirable_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(format!("`{key}` must be a number >= 0"));
            }
        }
        if k.desirable_weight == 0.0 && k.undesirable_weight == 0.0 {
            return Err(
                "`kto.desirable_weight` and `kto.undesirable_weight` are both 0: nothing would \
                 train"
                    .into(),
            );
        }
        if t.strategy == StrategyKind::Reward {
            self.validate_reward()?;
        }
        if t.strategy == StrategyKind::Grpo {
            self.validate_grpo()?;
        }
        if self.model.init == ModelInit::Random && self.adapter.is_some() {
            return Err(
                "`model.init = \"random\"` trains the whole model from scratch: remove `[adapter]`"
                    .into(),
            );
        }
        if self.check.as_ref().is_some_and(|c| c.max_new_tokens == 0) {
            return Err("`check.max_new_tokens` must be at least 1".into());
        }
        if self.data.train.is_empty() {
            return Err("`data.train` names no file".into());
        }
        if let Some(a) = &self.adapter {
            if a.r == 0 {
                return Err("`adapter.r` must be at least 1".into());
            }
            if !(0.0..1.0).contains(&a.dropout) {
                return Err("`adapter.dropout` must be in [0, 1)".into());
            }
            if let TargetModules::List(list) = &a.target_modules
                && list.is_empty()
            {
                return Err("`adapter.target_modules` is empty".into());
            }
        }
        if !(self.orpo.beta.is_finite() && self.orpo.beta > 0.0) {
            return Err("`orpo.beta` must be a positive number".into());
        }
        let c = &self.cpo;
        if !(c.beta.is_finite() && c.beta > 0.0) {
            return Err("`cpo.beta` must be a positive number".into());
        }
        if !(c.cpo_alpha.is_finite() && c.cpo_alpha >= 0.0) {
            return Err("`cpo.cpo_alpha` must be a number >= 0".into());
        }
        if !c.simpo_gamma.is_finite() {
            return Err("`cpo.simpo_gamma` must be a number".into());
        }
        if !(0.0..0.5).contains(&c.label_smoothing) {
            return Err("`cpo.label_smoothing` must be in [0, 0.5)".into());
        }
        if !c.alpha.is_finite() {
            return Err("`cpo.alpha` must be a number".into());
        }
        if c.loss == CpoLossName::Alphapo && ![0.0, 1.0].contains(&c.cpo_alpha) {
            return Err(
                "`cpo.loss = \"alphapo\"` is SimPO without the NLL term, so it takes no \
                 `cpo.cpo_alpha`: remove it, or use `loss = \"simpo\"` with `alpha` to keep \
                 the NLL term"
                    .into(),
            );
        }
        self.dpo.check()?;
        // The run directory keeps the resolved recipe as TOML, which holds paths as text.
        let paths = [&self.model.base, &self.output.dir]
            .into_iter()
            .chain(&self.data.train)
            .chain(&self.data.eval)
            .chain(self.check.iter().map(|c| &c.file))
            .chain(&self.dpo.reference_adapter)
            .chain(&self.kto.reference_adapter)
            .chain(&self.grpo.reference_adapter)
            .chain(&self.grpo.reward_models);
        for path in paths {
            if path.to_str().is_none() {
                return Err(format!(
                    "{} is not valid UTF-8; a recipe keeps its paths as text: rename it",
                    path.display()
                ));
            }
        }
        self.data.loader.validate().map_err(|e| e.to_string())
    }
}

impl Recipe {
    /// The adapter that, on the base, makes the reference model, with its recipe key: the
    /// strategy's own `reference_adapter` (DPO's or KTO's), when it has one.
    pub fn reference_adapter(&self) -> Option<(&'static str, &Path)> {
        let (key, path) = match self.train.strategy {
            StrategyKind::Dpo => ("dpo.reference_adapter", &self.dpo.reference_adapter),
            StrategyKind::Kto => ("kto.reference_adapter", &self.kto.reference_adapter),
            StrategyKind::Grpo => ("grpo.reference_adapter", &self.grpo.reference_adapter),
            _ => return None,
        };
        path.as_deref().map(|p| (key, p))
    }

    /// The resolved recipe, every default written out, as TOML (what a run directory keeps).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.to_table()).expect("a TOML table always serializes")
    }

    /// The recipe as a TOML document, every default written out; an adapter continued from
    /// `init_from` keeps only the keys the recipe set, since the rest come from that adapter.
    pub fn to_table(&self) -> toml::Table {
        fn section<T: Serialize>(value: &T) -> toml::Value {
            toml::Value::try_from(value).expect("recipe sections serialize to TOML")
        }
        let mut doc = toml::Table::new();
        doc.insert("model".into(), section(&self.model));
        if let Some(a) = &self.adapter {
            let mut table = section(a);
            if a.init_from.is_some()
                && let toml::Value::Table(t) = &mut table
            {
                t.retain(|key, _| key == "init_from" || a.given.iter().any(|g| g == key));
            }
            doc.insert("adapter".into(), table);
        }
        let mut data = match section(&self.data.loader) {
            toml::Value::Table(t) => t,
            _ => toml::Table::new(),
        };
        let list = |p: &[PathBuf]| {
            toml::Value::Array(
                p.iter()
                    .map(|p| toml::Value::String(p.display().to_string()))
                    .collect(),
            )
        };
        data.insert("train".into(), list(&self.data.train));
        data.insert("eval".into(), list(&self.data.eval));
        if let Some(template) = &self.data.chat_template {
            data.insert("chat_template".into(), template.written().into());
        }
        doc.insert("data".into(), toml::Value::Table(data));
        doc.insert("train".into(), section(&self.train));
        match self.train.strategy {
            StrategyKind::Dpo => doc.insert("dpo".into(), section(&self.dpo)),
            StrategyKind::Orpo => doc.insert("orpo".into(), section(&self.orpo)),
            StrategyKind::Cpo => doc.insert("cpo".into(), section(&self.cpo)),
            StrategyKind::Kto => doc.insert("kto".into(), section(&self.kto)),
            StrategyKind::Reward => doc.insert("reward".into(), section(&self.reward)),
            StrategyKind::Grpo => doc.insert("grpo".into(), section(&self.grpo)),
            StrategyKind::Sft | StrategyKind::Instruct => None,
        };
        if let Some(c) = &self.check {
            doc.insert("check".into(), section(c));
        }
        doc.insert("output".into(), section(&self.output));
        doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
base = "models/llama"

[adapter]
r = 8

[data]
train = "data/train.jsonl"

[output]
dir = "runs/first"
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<Recipe, String> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Recipe::from_toml(text, &overrides, Path::new("recipes/r.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_every_key_and_paths_are_relative_to_the_recipe() {
        let r = parse(&MINIMAL.replace("models/llama", "../models/llama"), &[]).unwrap();
        assert_eq!(r.model.base, PathBuf::from("recipes/../models/llama"));
        assert_eq!(r.model.hub_id(), None);
        assert_eq!(
            r.data.train,
            vec![PathBuf::from("recipes/data/train.jsonl")]
        );
        let a = r.adapter.as_ref().unwrap();
        assert_eq!((a.r, a.alpha, a.dropout), (8, 32.0, 0.05));
        assert_eq!(r.train, TrainSection::default());
        assert_eq!(r.dpo, DpoSection::default());
        assert_eq!(a.given, ["r"]);
        // The resolved recipe reads back to the same recipe, every key now written.
        let mut again = Recipe::from_toml(&r.to_toml(), &[], Path::new("r.toml")).unwrap();
        let written = &mut again.adapter.as_mut().unwrap().given;
        assert!(written.iter().any(|k| k == "target_modules"), "{written:?}");
        written.clone_from(&a.given);
        assert_eq!(again, r);
    }

    #[test]
    fn a_continued_adapter_writes_only_the_keys_the_recipe_set() {
        let r = parse(
            &MINIMAL.replace("r = 8", "init_from = \"runs/sft\"\ndropout = 0.1"),
            &[],
        )
        .unwrap();
        let table = r.to_table();
        let adapter = table["adapter"].as_table().unwrap();
        let mut keys: Vec<&String> = adapter.keys().collect();
        keys.sort();
        assert_eq!(keys, ["dropout", "init_from"]);
        let again = Recipe::from_toml(&r.to_toml(), &[], Path::new("r.toml")).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn hub_ids_stay_as_written_and_local_paths_are_anchored() {
        let r = parse(
            &MINIMAL.replace("train = \"data/train.jsonl\"", "train = [\"data/train.jsonl\", \"yahma/alpaca-cleaned\", \"hf://datasets/org/set/part/a.jsonl\"]"),
            &["model.revision=v1"],
        )
        .unwrap();
        // No `recipes/models/llama` exists, so it is a Hub id, as transformers would read it.
        assert_eq!(r.model.hub_id(), Some("models/llama"));
        assert_eq!(r.model.revision.as_deref(), Some("v1"));
        assert_eq!(
            r.data.train,
            vec![
                PathBuf::from("recipes/data/train.jsonl"),
                PathBuf::from("yahma/alpaca-cleaned"),
                PathBuf::from("hf://datasets/org/set/part/a.jsonl"),
            ]
        );
        let hub: Vec<(String, Option<String>)> = r
            .data
            .hub_datasets()
            .into_iter()
            .map(|d| (d.repo, d.path))
            .collect();
        assert_eq!(
            hub,
            vec![
                ("yahma/alpaca-cleaned".into(), None),
                ("org/set".into(), Some("part/a.jsonl".into()))
            ]
        );
        let mut data = r.data.clone();
        data.local.insert(
            "yahma/alpaca-cleaned".into(),
            vec!["/cache/a.json".into(), "/cache/b.json".into()],
        );
        assert_eq!(
            data.files(&data.train[..2]),
            vec![
                PathBuf::from("recipes/data/train.jsonl"),
                PathBuf::from("/cache/a.json"),
                PathBuf::from("/cache/b.json"),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(&MINIMAL.replace("r = 8", "rank = 8"), &[]).unwrap_err();
        assert!(
            err.contains("rank") && err.contains("recipes/r.toml"),
            "{err}"
        );
        let err = parse(&MINIMAL.replace("train = ", "max_len = 3\ntrain = "), &[]).unwrap_err();
        assert!(err.contains("max_len"), "{err}");
        assert!(err.contains("did you mean `max_length`?"), "{err}");
        let err = parse(MINIMAL, &["train.schedule=cosin"]).unwrap_err();
        assert!(err.contains("did you mean `cosine`?"), "{err}");
        let err = parse(MINIMAL, &["train.learning_rate=0.1"]).unwrap_err();
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn overrides_use_dotted_paths() {
        let r = parse(
            MINIMAL,
            &[
                "train.lr=0.001",
                "train.strategy=dpo",
                "dpo.beta=0.5",
                "adapter.target_modules=[\"q_proj\"]",
            ],
        )
        .unwrap();
        assert_eq!(r.train.lr, 0.001);
        assert_eq!(r.train.strategy, StrategyKind::Dpo);
        assert_eq!(r.dpo.beta, 0.5);
        assert_eq!(
            r.adapter.unwrap().target_modules,
            TargetModules::List(vec!["q_proj".into()])
        );
        assert!(
            parse(MINIMAL, &["train.lr"])
                .unwrap_err()
                .contains("key=value")
        );
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (set, key) in [
            ("train.micro_batch_size=0", "train.micro_batch_size"),
            ("train.pack=true", "train.pack"),
            ("train.lr=-1.0", "train.lr"),
            ("dpo.label_smoothing=0.7", "dpo.label_smoothing"),
            ("adapter.dropout=1.5", "adapter.dropout"),
            ("train.eps=nan", "train.eps"),
            ("train.max_grad_norm=nan", "train.max_grad_norm"),
            ("train.weight_decay=inf", "train.weight_decay"),
            ("train.loraplus_lr_ratio=0", "train.loraplus_lr_ratio"),
            ("dpo.beta=nan", "dpo.beta"),
            ("dpo.beta=inf", "dpo.beta"),
            ("orpo.beta=0", "orpo.beta"),
            ("cpo.beta=-1", "cpo.beta"),
            ("cpo.cpo_alpha=-0.5", "cpo.cpo_alpha"),
            ("cpo.label_smoothing=0.5", "cpo.label_smoothing"),
            ("kto.beta=0", "kto.beta"),
            ("kto.undesirable_weight=-1", "kto.undesirable_weight"),
            ("train.micro_batch_size=1", "train.micro_batch_size"),
            ("train.neftune_noise_alpha=0", "train.neftune_noise_alpha"),
            (
                "reward.center_rewards_coefficient=-1",
                "reward.center_rewards_coefficient",
            ),
        ] {
            // A strategy's own section needs that strategy.
            let section = key.split('.').next().unwrap();
            let strategy = format!("train.strategy={section}");
            let mut sets = vec![set];
            if ["dpo", "orpo", "cpo", "kto", "reward"].contains(&section) {
                sets.push(&strategy);
            }
            if set.starts_with("train.micro_batch_size=1") {
                sets.push("train.strategy=kto");
            }
            let err = parse(MINIMAL, &sets).unwrap_err();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    /// GRPO needs reward models, groups of at least two completions that fill its steps, and no
    /// evaluation data; each refusal names its key.
    #[test]
    fn grpo_recipes_name_what_they_miss() {
        let grpo = |sets: &[&str]| {
            let mut all = vec![
                "train.strategy=grpo",
                "grpo.reward_models=[\"rm\"]",
                "train.micro_batch_size=8",
            ];
            all.extend_from_slice(sets);
            parse(MINIMAL, &all)
        };
        let r = grpo(&["grpo.epsilon_high=0.28"]).unwrap();
        let strategy = r
            .grpo
            .strategy::<burn::backend::Autodiff<burn::backend::Flex>>();
        assert_eq!((strategy.epsilon_low, strategy.epsilon_high), (0.2, 0.28));
        assert!(r.grpo.reward_models[0].ends_with("rm"));
        // Reward functions alone will do, and read back from the written recipe.
        let r = grpo(&[
            "grpo.reward_models=[]",
            "grpo.reward_functions=[{kind = \"contains\", field = \"answer\", weight = 2.0}]",
        ])
        .unwrap();
        let again = Recipe::from_toml(&r.to_toml(), &[], Path::new("r.toml")).unwrap();
        assert_eq!(again.grpo.reward_functions, r.grpo.reward_functions);
        assert_eq!(r.grpo.reward_functions[0].weight, 2.0);
        // A program runs in the recipe's directory unless told otherwise.
        let program = |dir: &str| {
            let functions = format!(
                "grpo.reward_functions=[{{kind = \"program\", name = \"judge\", command = [\"python3\", \"judge.py\"]{dir}}}]"
            );
            let r = grpo(&["grpo.reward_models=[]", &functions]).unwrap();
            r.grpo.reward_functions[0].function().unwrap()
        };
        for (dir, runs_in) in [("", "recipes/."), (", dir = \"/tmp\"", "/tmp")] {
            assert_eq!(
                program(dir),
                RewardSpec::Program {
                    name: "judge".into(),
                    command: vec!["python3".into(), "judge.py".into()],
                    dir: PathBuf::from(runs_in),
                }
            );
        }
        for (sets, says) in [
            (&["grpo.reward_models=[]"][..], "are both empty"),
            (
                &["grpo.reward_functions=[{kind = \"contains\"}]"],
                "needs `field`",
            ),
            (
                &["grpo.reward_functions=[{kind = \"think_format\", field = \"x\"}]"],
                "`field` does not apply",
            ),
            (
                &[
                    "grpo.reward_functions=[{kind = \"soft_overlong\", max_completion_len = 10, soft_punish_cache = 20}]",
                ],
                "no larger than it",
            ),
            (&["grpo.num_generations=1"], "`grpo.num_generations`"),
            (&["grpo.num_iterations=0"], "`grpo.num_iterations`"),
            (
                &["grpo.num_iterations=2", "train.save_every=3"],
                "multiple of `grpo.num_iterations`",
            ),
            (
                &["train.micro_batch_size=3"],
                "multiple of `grpo.num_generations`",
            ),
            (&["grpo.temperature=0"], "`grpo.temperature`"),
            (
                &["grpo.reward_weights=[1.0, 2.0]"],
                "`grpo.reward_weights` has 2 weights",
            ),
            (&["grpo.loss=\"bnpo\""], "unknown variant `bnpo`"),
            (
                &["grpo.reward_functions=[{kind = \"program\", command = [\"x\"]}]"],
                "needs `name`",
            ),
            (
                &["grpo.reward_functions=[{kind = \"program\", name = \"x\", command = []}]"],
                "needs `command`",
            ),
            (
                &["grpo.reward_functions=[{kind = \"contains\", field = \"a\", dir = \"x\"}]"],
                "`dir` does not apply",
            ),
            (
                &[
                    "grpo.reward_functions=[{kind = \"program\", name = \"think_format_reward\", command = [\"x\"]}, {kind = \"think_format\"}]",
                ],
                "two rewards are named `think_format_reward`",
            ),
            (
                &["grpo.reward_functions=[{kind = \"program\", name = \"rm\", command = [\"x\"]}]"],
                "two rewards are named `rm`",
            ),
        ] {
            let err = grpo(sets).unwrap_err();
            assert!(err.contains(says), "{sets:?}: {err}");
        }
    }

    /// A reward model scores each sequence at its end: a sequence cut to `max_length` and a
    /// held-out generation check are refused, with what to do instead.
    #[test]
    fn reward_recipes_refuse_cut_sequences_and_generation_checks() {
        let reward = |sets: &[&str]| {
            let mut all = vec!["train.strategy=reward"];
            all.extend_from_slice(sets);
            parse(MINIMAL, &all)
        };
        let r = reward(&["reward.center_rewards_coefficient=0.01"]).unwrap();
        assert_eq!(r.reward.center_rewards_coefficient, Some(0.01));
        assert!(
            r.to_toml()
                .contains("[reward]\ncenter_rewards_coefficient = 0.01")
        );
        let err = reward(&["data.max_length=64"]).unwrap_err();
        assert!(err.contains("data.truncation = \"drop\""), "{err}");
        reward(&["data.max_length=64", "data.truncation=\"drop\""]).unwrap();
        let err = reward(&["check.file=\"held-out.jsonl\""]).unwrap_err();
        assert!(
            err.contains("[check]") && err.contains("data.eval"),
            "{err}"
        );
        let err = parse(MINIMAL, &["reward.center_rewards_coefficient=0.01"]).unwrap_err();
        assert!(err.contains("[reward]"), "{err}");
    }

    #[test]
    fn dpo_losses_combine_by_trls_names() {
        let dpo = |sets: &[&str]| {
            let mut all = vec!["train.strategy=dpo"];
            all.extend_from_slice(sets);
            parse(MINIMAL, &all)
        };
        let r = dpo(&[
            "dpo.loss=[\"sigmoid\", \"bco_pair\", \"sft\"]",
            "dpo.loss_weights=[0.8, 0.2, 1.0]",
        ])
        .unwrap();
        let terms = r.dpo.strategy().terms;
        assert_eq!(terms.len(), 3);
        assert_eq!(terms[1], (DpoLoss::BcoPair, 0.2));
        let again = Recipe::from_toml(&r.to_toml(), &[], Path::new("r.toml")).unwrap();
        assert_eq!(again.dpo, r.dpo);
        // RPO's α is the `sft` term's weight.
        let r = dpo(&["dpo.rpo_alpha=0.5"]).unwrap();
        assert_eq!(r.dpo.strategy().terms[1], (DpoLoss::Sft, 0.5));
        // LD-DPO and WPO ride along with any loss but the sorting ones.
        let r = dpo(&["dpo.ld_alpha=0.5", "dpo.use_weighting=true"]).unwrap();
        let strategy = r.dpo.strategy();
        assert_eq!(
            (strategy.ld_alpha, strategy.use_weighting),
            (Some(0.5), true)
        );
        for (sets, says) in [
            (
                &["dpo.loss=[\"sigmoid\", \"sft\"]", "dpo.loss_weights=[1.0]"][..],
                "`dpo.loss_weights` has 1 weights for 2",
            ),
            (&["dpo.loss=[]"], "empty list"),
            (
                &["dpo.loss=\"sft\"", "dpo.rpo_alpha=1.0"],
                "`dpo.rpo_alpha` adds",
            ),
            (&["dpo.loss=\"exo_pair\""], "`dpo.label_smoothing` > 0"),
            (
                &[
                    "dpo.loss=\"nca_pair\"",
                    "dpo.f_divergence_type=\"js_divergence\"",
                ],
                "holds \"nca_pair\"",
            ),
            (
                &["dpo.loss=\"simpo\""],
                "unknown variant `simpo`, expected one of `sigmoid`",
            ),
            (&["dpo.loss=3"], "a DPO loss type or a list of them"),
            (&["dpo.ld_alpha=1.5"], "`dpo.ld_alpha` must be in [0, 1]"),
            (
                &["dpo.loss=\"aot\"", "dpo.use_weighting=true"],
                "does not apply to the \"aot\" loss",
            ),
            (
                &["dpo.rpo_alpha=0.5", "dpo.use_weighting=true"],
                "TRL 1.16 fails to compute",
            ),
        ] {
            let err = dpo(sets).unwrap_err();
            assert!(err.contains(says), "{sets:?}: {err}");
        }
    }

    #[test]
    fn neftune_is_for_sft_and_instruct() {
        let r = parse(MINIMAL, &["train.neftune_noise_alpha=5.0"]).unwrap();
        assert_eq!(r.train.neftune_noise_alpha, Some(5.0));
        let err = parse(
            MINIMAL,
            &["train.neftune_noise_alpha=5.0", "train.strategy=dpo"],
        )
        .unwrap_err();
        assert!(err.contains("applies to sft and instruct"), "{err}");
    }

    #[test]
    fn alphapo_is_simpo_without_the_nll_term() {
        let cpo = |sets: &[&str]| {
            let mut all = vec!["train.strategy=cpo"];
            all.extend_from_slice(sets);
            parse(MINIMAL, &all)
        };
        let r = cpo(&["cpo.loss=\"alphapo\"", "cpo.alpha=0.25"]).unwrap();
        let strategy = r.cpo.strategy();
        assert!(matches!(strategy.loss, CpoLoss::Simpo { .. }));
        assert_eq!((strategy.cpo_alpha, strategy.alpha), (0.0, 0.25));
        let err = cpo(&["cpo.loss=\"alphapo\"", "cpo.cpo_alpha=0.5"]).unwrap_err();
        assert!(err.contains("`cpo.cpo_alpha`"), "{err}");
    }

    #[test]
    fn a_strategys_section_needs_that_strategy() {
        let err = parse(MINIMAL, &["dpo.beta=0.2"]).unwrap_err();
        assert!(err.contains("`[dpo]`") && err.contains("\"sft\""), "{err}");
        let err = parse(MINIMAL, &["train.strategy=dpo", "orpo.beta=0.2"]).unwrap_err();
        assert!(err.contains("`[orpo]`") && err.contains("\"dpo\""), "{err}");
        let r = parse(MINIMAL, &["train.strategy=orpo", "orpo.beta=0.2"]).unwrap();
        assert_eq!(r.orpo.beta, 0.2);
        // The written recipe holds the strategy's own section only, and reads back.
        let table = r.to_table();
        assert!(table.contains_key("orpo") && !table.contains_key("dpo"));
        let again = Recipe::from_toml(&r.to_toml(), &[], Path::new("r.toml")).unwrap();
        assert_eq!(again.orpo, r.orpo);
    }
}
