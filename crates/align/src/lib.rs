//! The trainer: recipes, the one training loop, and its strategies (chat SFT, instruction tuning, DPO), with checkpoints and metrics.
