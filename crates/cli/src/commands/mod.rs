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

/// The file a directory keeps its chat template in (transformers 5's, and a run's whose recipe
/// chose a template), if it has one.
pub(crate) fn template_file(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    Some(dir.join("chat_template.jinja")).filter(|file| file.is_file())
}

/// The chat template to talk to `model` with: the one an adapter's run was trained with, else
/// the model's own.
pub(crate) fn chat_template(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> anyhow::Result<burnish_data::ChatTemplate> {
    match adapter.and_then(template_file) {
        Some(file) => Ok(burnish_data::ChatTemplate::from_file(&file)?),
        None => Ok(burnish_data::ChatTemplate::from_dir(model)?),
    }
}

/// How to hold the checkpoint in `model_dir` while its weights are written out again: a bf16
/// checkpoint in bf16 (half f32's memory, nothing lost), any other in f32; and the dtype its
/// config declares.
pub(crate) fn held_as_stored(
    model_dir: &std::path::Path,
) -> anyhow::Result<(burnish_model::BaseDtype, Option<burnish_peft::SaveDtype>)> {
    let declared =
        burnish_model::HfConfig::from_file(&model_dir.join("config.json"))?.declared_dtype();
    let hold = match declared {
        Some(burnish_peft::SaveDtype::BF16) => burnish_model::BaseDtype::Bf16,
        _ => burnish_model::BaseDtype::F32,
    };
    Ok((hold, declared))
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
