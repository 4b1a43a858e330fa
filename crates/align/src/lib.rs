//! The trainer: recipes, the one training loop, and its strategies (chat SFT, instruction tuning,
//! DPO), with checkpoints and metrics. So far it holds the strategies' objectives: the masked
//! next-token loss of SFT and instruction tuning, and the DPO family of preference losses with
//! TRL's reward metrics.

mod dpo;
mod token_loss;

pub use dpo::{DpoLoss, DpoMetrics, DpoOutput, PairLogps, dpo_loss};
pub use token_loss::{TokenLoss, masked_token_logprobs, masked_token_loss};
