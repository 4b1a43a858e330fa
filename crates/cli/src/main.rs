//! `burnish`: fine-tune open LLMs with LoRA from the command line. This binary is glue: it parses
//! arguments, picks the device, and calls the library crates.

mod commands;
mod device;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Data preparation allocates heavily (a string per token); mimalloc halves its time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "burnish", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an adapter (or a whole model) from a recipe.
    Train(commands::train::TrainArgs),
    /// Log-probability of each token given its prefix (perplexity, parity checks).
    Score(commands::score::ScoreArgs),
    /// Generate text from a prompt.
    Generate(commands::generate::GenerateArgs),
    /// Chat with a model (and adapter) in the terminal.
    Chat(commands::chat::ChatArgs),
    /// Fold an adapter into its base model, or merge several adapters or models.
    Merge(commands::merge::MergeArgs),
    /// Upload a finished run (adapter or model, model card, recipe) to the Hub in one commit.
    Push(commands::push::PushArgs),
    /// Measure speed and memory on a random-weight model of a real shape.
    Bench(commands::bench::BenchArgs),
    /// Chat templates: render a conversation exactly as training and inference see it.
    #[command(subcommand)]
    Template(commands::template::TemplateCommand),
    /// Datasets: preview examples with trained tokens marked, and statistics.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("BURNISH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(args) => commands::train::run(args),
        Command::Score(args) => commands::score::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Push(args) => commands::push::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Template(cmd) => commands::template::run(cmd),
        Command::Data(cmd) => commands::data::run(cmd),
    }
}
