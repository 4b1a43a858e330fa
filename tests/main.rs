//! Cross-crate tests of burnish against the committed fixtures in `tests/fixtures/`: parity
//! with transformers, checkpoint round trips, bad-input errors, and the `burnish` binary.
//! Expected numbers come from `scripts/golden/make_models.py` (transformers 5.24, torch 2.15).

mod adapters;
mod bad_checkpoints;
mod checkpointing;
mod cli;
mod fixtures;
mod gguf;
mod hub;
mod losses;
mod merges;
mod parity;
mod qlora;
mod quickstart;
mod roundtrip;
mod train;
mod trainer;
