//! `burnish template render`: render a conversation through a chat template exactly as
//! transformers would, printing only the text (or, with `--json` and a model, the text, token ids
//! and assistant mask).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burnish_data::{
    ChatTemplate, Encoder, Message, SpecialTokens, Tokenizer, TrainOn, mask_from_spans,
};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Render a conversation through a chat template.
    Render(RenderArgs),
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Model directory: its chat template and tokenizer.
    #[arg(
        long,
        conflicts_with = "template",
        required_unless_present = "template"
    )]
    model: Option<PathBuf>,
    /// A Jinja template file, or the name of a built-in (chatml, llama3, mistral, ...).
    #[arg(long)]
    template: Option<String>,
    /// JSON file: an array of messages, or an object with a `messages` field.
    #[arg(long)]
    messages: PathBuf,
    #[arg(long)]
    add_generation_prompt: bool,
    /// Print {"text", "token_ids", "assistant_mask"} (needs --model).
    #[arg(long, requires = "model")]
    json: bool,
}

pub fn run(cmd: TemplateCommand) -> Result<()> {
    let TemplateCommand::Render(args) = cmd;
    let messages = read_messages(&args.messages)?;
    let out = match (&args.model, &args.template) {
        (Some(dir), _) => {
            let tokenizer = Tokenizer::from_dir(dir)?;
            let template = ChatTemplate::from_dir(dir)?;
            if args.json {
                render_json(tokenizer, template, &messages, args.add_generation_prompt)?
            } else {
                template.render(&messages, args.add_generation_prompt, &tokenizer.special)?
            }
        }
        (None, Some(t)) => {
            let template = if Path::new(t).exists() {
                ChatTemplate::from_file(Path::new(t))?
            } else {
                ChatTemplate::builtin(t)?
            };
            template.render(
                &messages,
                args.add_generation_prompt,
                &SpecialTokens::default(),
            )?
        }
        (None, None) => bail!("give --model or --template"),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Messages from a JSON file holding an array of messages or an object with `messages`.
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let list = match value {
        serde_json::Value::Object(mut o) => o
            .remove("messages")
            .with_context(|| format!("{}: an object without a `messages` field", path.display()))?,
        other => other,
    };
    serde_json::from_value(list).with_context(|| {
        format!(
            "{}: expected a list of {{\"role\", \"content\"}} messages",
            path.display()
        )
    })
}

/// `{"text", "token_ids", "assistant_mask"}` as `apply_chat_template(..., tokenize=True,
/// return_dict=True, return_assistant_tokens_mask=True)` gives them.
pub fn render_json(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String> {
    let encoder = Encoder::new(tokenizer, template, TrainOn::Assistant);
    let rendered = encoder.template.render_spans(
        messages,
        None,
        add_generation_prompt,
        &encoder.tokenizer.special,
        &Default::default(),
    )?;
    let spans = if add_generation_prompt && !encoder.template.has_generation_blocks() {
        // The spans of the conversation itself; the generation prompt is never trained.
        let plain = encoder.template.render_spans(
            messages,
            None,
            false,
            &encoder.tokenizer.special,
            &Default::default(),
        )?;
        encoder
            .assistant_spans(messages, None, &plain)
            .map_err(anyhow::Error::msg)?
    } else {
        encoder
            .assistant_spans(messages, None, &rendered)
            .map_err(anyhow::Error::msg)?
    };
    let (ids, offsets) = encoder
        .tokenizer
        .encode_with_offsets(&rendered.text, false)?;
    let mask: Vec<u8> = mask_from_spans(&offsets, &spans)
        .into_iter()
        .map(u8::from)
        .collect();
    Ok(
        serde_json::json!({"text": rendered.text, "token_ids": ids, "assistant_mask": mask})
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
    }

    #[test]
    fn json_output_masks_the_assistant_turn() {
        let dir = fixture();
        let messages = vec![Message::new("user", "Hi"), Message::new("assistant", "Yo")];
        let out = render_json(
            Tokenizer::from_dir(&dir).unwrap(),
            ChatTemplate::from_dir(&dir).unwrap(),
            &messages,
            false,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["text"],
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        );
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
        let mask: Vec<u8> = serde_json::from_value(v["assistant_mask"].clone()).unwrap();
        let trained: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(tokenizer.decode(&trained, false).unwrap(), "Yo<|im_end|>\n");
    }

    #[test]
    fn messages_files_take_both_shapes() {
        let dir = std::env::temp_dir().join(format!("burnish-cli-msgs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.json");
        std::fs::write(&a, r#"[{"role": "user", "content": "x"}]"#).unwrap();
        let b = dir.join("b.json");
        std::fs::write(&b, r#"{"messages": [{"role": "user", "content": "x"}]}"#).unwrap();
        assert_eq!(read_messages(&a).unwrap(), read_messages(&b).unwrap());
        std::fs::write(&b, r#"{"msgs": []}"#).unwrap();
        assert!(
            read_messages(&b)
                .unwrap_err()
                .to_string()
                .contains("messages")
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
