//! The trainer: recipes, the one training loop, and its strategies (chat SFT, instruction tuning,
//! the preference strategies DPO, ORPO and CPO/SimPO, KTO on unpaired preferences, and reward
//! modelling), with checkpoints and metrics: the strategies' objectives (the masked next-token
//! loss of SFT and instruction tuning, the preference losses with TRL's reward metrics, the
//! reward model's pairwise loss), the optimizer (AdamW with global-norm clipping)
//! and its schedules, and what a resumed or continued run is checked against.

mod check;
mod checkpoint;
mod continuation;
mod cpo;
mod cpu_adamw;
mod dpo;
mod error;
mod grpo;
mod kto;
mod optimizer;
mod orpo;
mod recipe;
mod reward;
mod reward_program;
mod run;
mod schedule;
mod strategy;
mod tensorboard;
mod token_loss;
mod trainer;

pub use check::{CheckAnswer, CheckCase, CheckReport, load_cases, run_check};
pub use checkpoint::{Progress, checkpoints, read_checkpoint, save_checkpoint};
pub use cpo::{CpoLoss, CpoOutput, cpo_loss};
pub use dpo::{DpoLoss, DpoMetrics, DpoOutput, FDivergence, PairLogps, chosen_nll, dpo_loss};
pub use error::{RecipeError, RunError, TrainError};
pub use grpo::{
    Grpo, GrpoLossKind, RewardFunction, RewardModel, RewardNames, Rewards, Rollouts, Sampling,
    ScaleRewards, advantages, rollouts,
};
pub use kto::{KtoLoss, KtoOutput, LabeledLogps, kl_estimate, kto_loss};
pub use optimizer::{
    AdamW, AdamWConfig, FlatGradients, SavedMoments, StepReport, flat_gradients, parameter_paths,
};
pub use orpo::{OrpoOutput, log1mexp, orpo_loss};
pub use recipe::{
    AdapterInit, AdapterSection, CheckSection, CpoLossName, CpoSection, DataSection, DpoLossName,
    DpoLosses, DpoSection, FDivergenceName, HF_DATASETS, HubDataset, KtoLossName, KtoSection,
    ModelInit, ModelSection, OnNonFinite, OrpoSection, OutputSection, Recipe, RewardFunctionKind,
    RewardFunctionSection, RewardSection, RewardSpec, Rows, ScheduleName, StrategyKind,
    TargetModules, TrainSection,
};
pub use reward::{Reward, RewardOutput, ScoredPairs, reward_loss};
pub use reward_program::RewardProgram;
pub use run::{RunEvent, RunSummary, lora_config, train};
pub use schedule::{Schedule, ScheduleKind};
pub use strategy::{
    Cpo, Dpo, Kto, LabeledBatch, Orpo, PairBatch, Preference, Sft, StepOutput, Strategy,
    TokenBatch, frozen_logps, reference_logps,
};
pub use token_loss::{
    PositionStats, TokenLoss, TokenStats, masked_token_logprobs, masked_token_logprobs_chunked,
    masked_token_loss, positions_per_chunk,
};
pub use trainer::{Activations, MetricMeans, StepMetrics, optimizer_step};
