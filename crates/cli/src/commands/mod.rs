//! One module per `burnish` subcommand, and the streaming output `generate` and `chat` share.

pub mod bench;
pub mod chat;
pub mod data;
pub mod generate;
pub mod merge;
pub mod push;
pub mod score;
pub mod stream;
pub mod template;
pub mod train;

/// Refuses a sequence classifier (a reward model) loaded from `dir` where a command needs an LM
/// head to generate with.
pub(crate) fn require_lm_head<B: burn::tensor::backend::Backend>(
    model: &burnish_model::Decoder<B>,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    if model.is_classifier() {
        anyhow::bail!(
            "{} is a sequence classifier (a reward model): it has no LM head to generate with; \
             `burnish score` gives its reward of a text",
            dir.display()
        );
    }
    Ok(())
}
