//! The trainer: recipes, the one training loop, and its strategies (chat SFT, instruction tuning,
//! DPO), with checkpoints and metrics. So far it holds the strategies' objectives (the masked
//! next-token loss of SFT and instruction tuning, the DPO family of preference losses with TRL's
//! reward metrics) and the optimizer (AdamW with global-norm clipping).

mod dpo;
mod optimizer;
mod schedule;
mod token_loss;

pub use dpo::{DpoLoss, DpoMetrics, DpoOutput, PairLogps, dpo_loss};
pub use optimizer::{AdamW, AdamWConfig, StepReport};
pub use schedule::{Schedule, ScheduleKind};
pub use token_loss::{TokenLoss, masked_token_logprobs, masked_token_loss};
