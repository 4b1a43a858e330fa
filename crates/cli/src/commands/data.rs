//! `burnish data preview`: load a dataset as training would, show a few examples with the trained
//! tokens marked, and the dataset's statistics (rows, tokens, trained tokens, truncated and
//! rejected rows with reasons).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use burnish_data::{
    ChatTemplate, DataConfig, Dataset, Encoder, Example, OnBadRow, RowFormat, Tokenizer, TrainOn,
    Truncation, load,
};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Show rendered examples with trained tokens marked, and dataset statistics.
    Preview(PreviewArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Auto,
    Messages,
    Sharegpt,
    Alpaca,
    PromptCompletion,
    Preference,
    Unpaired,
    Text,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TrainOnArg {
    All,
    Assistant,
    LastTurn,
    Completion,
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Model directory: tokenizer and chat template.
    #[arg(long)]
    model: PathBuf,
    /// Dataset file (.jsonl, or .json holding an array or {"data": [...]}).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    #[arg(long, value_enum, default_value = "assistant")]
    train_on: TrainOnArg,
    /// Truncate longer examples to this many tokens (counted in the statistics).
    #[arg(long)]
    max_length: Option<usize>,
    /// Use a built-in chat template instead of the model's.
    #[arg(long)]
    template: Option<String>,
    /// Number of examples to show.
    #[arg(short = 'n', default_value_t = 3)]
    n: usize,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    let DataCommand::Preview(args) = cmd;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let template = match &args.template {
        Some(name) => ChatTemplate::builtin(name)?,
        None => ChatTemplate::from_dir(&args.model)?,
    };
    let train_on = match args.train_on {
        TrainOnArg::All => TrainOn::All,
        TrainOnArg::Assistant => TrainOn::Assistant,
        TrainOnArg::LastTurn => TrainOn::LastTurn,
        TrainOnArg::Completion => TrainOn::Completion,
    };
    let config = DataConfig {
        format: match args.format {
            FormatArg::Auto => RowFormat::Auto,
            FormatArg::Messages => RowFormat::Messages,
            FormatArg::Sharegpt => RowFormat::Sharegpt,
            FormatArg::Alpaca => RowFormat::Alpaca,
            FormatArg::PromptCompletion => RowFormat::PromptCompletion,
            FormatArg::Preference => RowFormat::Preference,
            FormatArg::Unpaired => RowFormat::Unpaired,
            FormatArg::Text => RowFormat::Text,
        },
        train_on,
        max_length: args.max_length,
        truncation: Truncation::KeepStart,
        on_bad_row: OnBadRow::Skip,
        ..Default::default()
    };
    let encoder = Encoder::new(tokenizer, template, train_on);
    let ds = load(&[&args.data], &encoder, &config)?;
    print!("{}", preview(&encoder.tokenizer, &ds, args.n)?);
    Ok(())
}

/// Trained text is wrapped in these, so the reader sees what the model learns.
const OPEN: &str = "\u{ab}";
const CLOSE: &str = "\u{bb}";

/// `example` decoded, with each run of trained tokens between « and ».
pub fn mark_trained(tokenizer: &Tokenizer, example: &Example) -> Result<String> {
    let mut out = String::new();
    let mut run: Vec<u32> = Vec::new();
    let mut trained = false;
    let flush = |out: &mut String, run: &mut Vec<u32>, trained: bool| -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let text = tokenizer.decode(run, false)?;
        if trained {
            write!(out, "{OPEN}{text}{CLOSE}")?;
        } else {
            out.push_str(&text);
        }
        run.clear();
        Ok(())
    };
    for (&id, &m) in example.input_ids.iter().zip(&example.labels_mask) {
        if m != trained {
            flush(&mut out, &mut run, trained)?;
            trained = m;
        }
        run.push(id);
    }
    flush(&mut out, &mut run, trained)?;
    Ok(out)
}

/// The preview text: `n` examples (pairs shown as chosen and rejected sequences, labeled
/// completions with their label, prompts alone as the model will continue them), then
/// statistics.
pub fn preview(tokenizer: &Tokenizer, ds: &Dataset, n: usize) -> Result<String> {
    let mut out = String::new();
    let mut shown = 0;
    for (i, e) in ds.examples.iter().take(n).enumerate() {
        let burnish_data::Source { path, line } = &ds.example_sources[i];
        writeln!(
            out,
            "── example {} ({}:{line}, {} tokens, {} trained)",
            i + 1,
            path.display(),
            e.len(),
            e.trained()
        )?;
        writeln!(out, "{}", mark_trained(tokenizer, e)?)?;
        shown += 1;
    }
    for (i, p) in ds.pairs.iter().take(n.saturating_sub(shown)).enumerate() {
        let burnish_data::Source { path, line } = &ds.pair_sources[i];
        writeln!(out, "── pair {} ({}:{line})", i + 1, path.display())?;
        writeln!(out, "chosen:   {}", mark_trained(tokenizer, &p.chosen())?)?;
        writeln!(out, "rejected: {}", mark_trained(tokenizer, &p.rejected())?)?;
        shown += 1;
    }
    for (i, l) in ds.labeled.iter().take(n.saturating_sub(shown)).enumerate() {
        let burnish_data::Source { path, line } = &ds.labeled_sources[i];
        let label = if l.desirable {
            "desirable"
        } else {
            "undesirable"
        };
        writeln!(
            out,
            "── {label} completion {} ({}:{line})",
            i + 1,
            path.display()
        )?;
        writeln!(out, "{}", mark_trained(tokenizer, &l.example())?)?;
        shown += 1;
    }
    for (i, p) in ds.prompts.iter().take(n.saturating_sub(shown)).enumerate() {
        let burnish_data::Source { path, line } = &ds.prompt_sources[i];
        writeln!(
            out,
            "── prompt {} ({}:{line}, {} tokens)",
            i + 1,
            path.display(),
            p.prompt_ids.len()
        )?;
        writeln!(out, "{}", tokenizer.decode(&p.prompt_ids, false)?)?;
    }
    let r = &ds.report;
    writeln!(out, "── statistics")?;
    writeln!(out, "rows:           {}", r.rows)?;
    writeln!(
        out,
        "examples:       {}",
        ds.examples.len() + ds.pairs.len() + ds.labeled.len() + ds.prompts.len()
    )?;
    writeln!(out, "tokens:         {}", r.tokens)?;
    writeln!(out, "trained tokens: {}", r.trained_tokens)?;
    writeln!(out, "truncated rows: {}", r.truncated)?;
    writeln!(out, "rejected rows:  {}", r.rejected.len())?;
    for rej in &r.rejected {
        writeln!(out, "  {}:{}: {}", rej.path.display(), rej.line, rej.reason)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn preview_marks_trained_tokens_and_reports_rejections() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let model = root.join("models/llama");
        let encoder = Encoder::new(
            Tokenizer::from_dir(&model).unwrap(),
            ChatTemplate::from_dir(&model).unwrap(),
            TrainOn::Assistant,
        );
        let config = DataConfig {
            on_bad_row: OnBadRow::Skip,
            max_length: Some(24),
            ..Default::default()
        };
        let ds = load(&[&root.join("data/rows/bad.jsonl")], &encoder, &config).unwrap();
        let text = preview(&encoder.tokenizer, &ds, 1).unwrap();
        assert!(
            text.contains("<|im_start|>assistant\n«fine<|im_end|>\n»"),
            "{text}"
        );
        assert!(text.contains("rows:           8"), "{text}");
        assert!(text.contains("truncated rows: 1"), "{text}");
        assert!(text.contains("rejected rows:  6"), "{text}");
        assert!(
            text.contains("bad.jsonl:3: `messages[0]` has unknown role `wizard`"),
            "{text}"
        );
    }
}
