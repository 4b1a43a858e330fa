//! `burnish template render`: render a conversation (and the tools it may call) through a chat
//! template exactly as transformers would, printing only the text (or, with `--json` and a model,
//! the text, token ids and assistant mask).

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
    /// JSON file: an array of messages, or an object with a `messages` field and optionally a
    /// `tools` field (a list of tool schemas), as a dataset row holds them.
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
    let conversation = read_conversation(&args.messages)?;
    let agp = args.add_generation_prompt;
    let out = match (&args.model, &args.template) {
        (Some(dir), _) => {
            let tokenizer = Tokenizer::from_dir(dir)?;
            let template = ChatTemplate::from_dir(dir)?;
            if args.json {
                render_json(tokenizer, template, &conversation, agp)?
            } else {
                render_text(&template, &conversation, agp, &tokenizer.special)?
            }
        }
        (None, Some(t)) => {
            let template = if Path::new(t).exists() {
                ChatTemplate::from_file(Path::new(t))?
            } else {
                ChatTemplate::builtin(t)?
            };
            render_text(&template, &conversation, agp, &SpecialTokens::default())?
        }
        (None, None) => bail!("give --model or --template"),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// A conversation to render: its messages and the tools the template may list.
#[derive(Debug, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Option<Vec<serde_json::Value>>,
}

/// The conversation in a JSON file holding an array of messages, or an object with `messages`
/// and, optionally, `tools`.
pub fn read_conversation(path: &Path) -> Result<Conversation> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let (list, tools) = match value {
        serde_json::Value::Object(mut o) => {
            let list = o.remove("messages").with_context(|| {
                format!("{}: an object without a `messages` field", path.display())
            })?;
            let tools = match o.remove("tools") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Array(tools)) => Some(tools),
                Some(other) => bail!(
                    "{}: `tools` must be a list of tool schemas, found {other}",
                    path.display()
                ),
            };
            (list, tools)
        }
        other => (other, None),
    };
    let messages = serde_json::from_value(list).with_context(|| {
        format!(
            "{}: expected a list of {{\"role\", \"content\"}} messages",
            path.display()
        )
    })?;
    Ok(Conversation { messages, tools })
}

/// The text `template` renders `conversation` to.
pub fn render_text(
    template: &ChatTemplate,
    conversation: &Conversation,
    add_generation_prompt: bool,
    special: &SpecialTokens,
) -> Result<String> {
    let rendered = template.render_spans(
        &conversation.messages,
        conversation.tools.as_deref(),
        add_generation_prompt,
        special,
        &Default::default(),
    )?;
    Ok(rendered.text)
}

/// `{"text", "token_ids", "assistant_mask"}` as `apply_chat_template(..., tokenize=True,
/// return_dict=True, return_assistant_tokens_mask=True)` gives them.
pub fn render_json(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversation: &Conversation,
    add_generation_prompt: bool,
) -> Result<String> {
    let encoder = Encoder::new(tokenizer, template, TrainOn::Assistant);
    let (messages, tools) = (&conversation.messages, conversation.tools.as_deref());
    let rendered = encoder.template.render_spans(
        messages,
        tools,
        add_generation_prompt,
        &encoder.tokenizer.special,
        &Default::default(),
    )?;
    let spans = if add_generation_prompt && !encoder.template.has_generation_blocks() {
        // The spans of the conversation itself; the generation prompt is never trained.
        let plain = encoder.template.render_spans(
            messages,
            tools,
            false,
            &encoder.tokenizer.special,
            &Default::default(),
        )?;
        encoder
            .assistant_spans(messages, tools, &plain)
            .map_err(anyhow::Error::msg)?
    } else {
        encoder
            .assistant_spans(messages, tools, &rendered)
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
        let conversation = Conversation {
            messages: vec![Message::new("user", "Hi"), Message::new("assistant", "Yo")],
            tools: None,
        };
        let out = render_json(
            Tokenizer::from_dir(&dir).unwrap(),
            ChatTemplate::from_dir(&dir).unwrap(),
            &conversation,
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
        assert_eq!(
            read_conversation(&a).unwrap(),
            read_conversation(&b).unwrap()
        );
        std::fs::write(&b, r#"{"msgs": []}"#).unwrap();
        assert!(
            read_conversation(&b)
                .unwrap_err()
                .to_string()
                .contains("messages")
        );
        std::fs::write(&b, r#"{"messages": [], "tools": "get_time"}"#).unwrap();
        let err = read_conversation(&b).unwrap_err().to_string();
        assert!(err.contains("b.json") && err.contains("`tools`"), "{err}");

        // A row's tools reach the template; a built-in that cannot render them says so.
        std::fs::write(
            &b,
            r#"{"messages": [{"role": "user", "content": "time?"}], "tools": [{"name": "get_time"}]}"#,
        )
        .unwrap();
        let conversation = read_conversation(&b).unwrap();
        let template_path = dir.join("tools.jinja");
        std::fs::write(
            &template_path,
            "{% for t in tools %}[{{ t.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}",
        )
        .unwrap();
        let template = ChatTemplate::from_file(&template_path).unwrap();
        let special = SpecialTokens::default();
        assert_eq!(
            render_text(&template, &conversation, false, &special).unwrap(),
            "[get_time]time?"
        );
        let builtin = ChatTemplate::builtin("chatml").unwrap();
        let err = render_text(&builtin, &conversation, false, &special)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tools"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
