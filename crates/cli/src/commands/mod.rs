//! One module per `burnish` subcommand, and the streaming output `generate` and `chat` share.

pub mod bench;
pub mod chat;
pub mod data;
pub mod export;
pub mod generate;
pub mod merge;
pub mod push;
pub mod score;
pub mod stream;
pub mod template;
pub mod train;

/// The chat template to talk to `model` with: the one an adapter's run was trained with (its
/// `chat_template.jinja`, written when the recipe chose a template), else the model's own.
pub(crate) fn chat_template(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> anyhow::Result<burnish_data::ChatTemplate> {
    if let Some(file) = adapter
        .map(|dir| dir.join("chat_template.jinja"))
        .filter(|file| file.is_file())
    {
        return Ok(burnish_data::ChatTemplate::from_file(&file)?);
    }
    Ok(burnish_data::ChatTemplate::from_dir(model)?)
}

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

/// A reward model made of a base (`dir`) and a reward adapter reads its scores before the token
/// its training padded with (the tokenizer's pad token, else EOS), which the base's `config.json`
/// may not name: that token becomes the model's pad token. A classifier checkpoint keeps its own.
pub(crate) fn pad_as_trained<B: burn::tensor::backend::Backend>(
    pretrained: &mut burnish_model::Pretrained<B>,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let from_adapter =
        pretrained.model.is_classifier() && pretrained.config.decoder.classifier_labels.is_none();
    if from_adapter {
        let tokenizer = burnish_data::Tokenizer::from_dir(dir)?;
        pretrained.model.config.pad_token_id = tokenizer.pad_id();
    }
    Ok(())
}
