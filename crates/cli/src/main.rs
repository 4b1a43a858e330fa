//! `burnish`: fine-tune open LLMs with LoRA from the command line. This binary is glue: it parses
//! arguments, picks the device, and calls the library crates.

mod commands;
mod device;
mod memory;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Data preparation allocates heavily (a string per token); mimalloc halves its time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (not exported by the Rust bindings).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of handing it back to the OS after mimalloc's purge
/// delay. A training step frees and reallocates the same large activation buffers every time;
/// handed back, each comes back as fresh pages the kernel must zero (a quarter of a CPU step's
/// time). The resident size stays at the peak the step reaches anyway.
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option of the allocator linked into this binary.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Debug, Parser)]
#[command(name = "burnish", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an adapter (or a whole model) from a recipe.
    #[command(after_help = "Examples:
  burnish train recipes/quickstart.toml
  burnish train recipes/smollm2-135m-chat-sft.toml --set train.lr=5e-4 --set data.max_length=1024
  burnish train recipes/smollm2-135m-chat-sft.toml --resume

Every recipe key, its default and its Axolotl/TRL counterpart: docs/recipes.md")]
    Train(commands::train::TrainArgs),
    /// Log-probability of each token given its prefix (perplexity, parity checks).
    #[command(after_help = "Examples:
  burnish score --model quickstart/base --text \"counting : one two three\"
  burnish score --model HuggingFaceTB/SmolLM2-135M --ids 1,2,3 --json")]
    Score(commands::score::ScoreArgs),
    /// Generate text from a prompt.
    #[command(after_help = "Examples:
  burnish generate --model quickstart/base --adapter runs/quickstart --chat --prompt \"what comes after may ?\"
  burnish generate --model HuggingFaceTB/SmolLM2-135M-Instruct --chat --prompt \"Hi!\" --temperature 0.7 --seed 1")]
    Generate(commands::generate::GenerateArgs),
    /// Chat with a model (and adapter) in the terminal.
    #[command(after_help = "Example:
  burnish chat --model quickstart/base --adapter runs/quickstart
Type a message and press Enter; /reset starts over, /exit leaves.")]
    Chat(commands::chat::ChatArgs),
    /// Fold an adapter into its base model, or merge several adapters or models.
    #[command(after_help = "Examples:
  burnish merge --model quickstart/base --adapter runs/quickstart --out merged/quickstart
  burnish merge --method ties --base quickstart/base --inputs runs/a:1.0 runs/b:0.5 --density 0.5 --out merged/ab")]
    Merge(commands::merge::MergeArgs),
    /// Write a model (with an adapter folded in) as one GGUF file for llama.cpp and Ollama.
    #[command(after_help = "Examples:
  burnish export --model quickstart/base --adapter runs/quickstart --pre-tokenizer gpt-2 --out quickstart.gguf
  burnish export --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter runs/smollm2-chat --type q8_0 --out smollm2-chat.gguf")]
    Export(commands::export::ExportArgs),
    /// Upload a finished run (adapter or model, model card, recipe) to the Hub in one commit.
    Push(commands::push::PushArgs),
    /// Measure speed and memory on a random-weight model of a real shape.
    #[command(after_help = "Examples:
  burnish bench --shape smollm2-135m --mode sft --batch 1 --seq 128 --rank 16 --json
  burnish bench --shape tinyllama-1.1b --mode dpo --batch 4 --seq 1024 --device cuda")]
    Bench(commands::bench::BenchArgs),
    /// Chat templates: render a conversation exactly as training and inference see it.
    #[command(
        subcommand,
        after_help = "Example:
  burnish template render --model quickstart/base --messages conversation.json --add-generation-prompt"
    )]
    Template(commands::template::TemplateCommand),
    /// Datasets: preview examples with trained tokens marked, and statistics.
    #[command(
        subcommand,
        after_help = "Example:
  burnish data preview --model quickstart/base --data quickstart/data/chat.jsonl -n 2"
    )]
    Data(commands::data::DataCommand),
}

fn main() -> Result<()> {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("BURNISH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    on_thread_pool(Cli::parse().command)
}

/// Stack of the thread a command runs on: what the main thread has on Linux.
const COMMAND_STACK_BYTES: usize = 8 << 20;

/// Runs the command on a thread of the rayon pool that the CPU backend's parallel ops
/// (products, attention, element-wise kernels, tokenization) use, instead of beside it. Called
/// from outside the pool, each such op hands its work over and sleeps until the pool's threads
/// are done: two thread wake-ups per op, and one thread more than there are cores. Called from
/// inside, the calling thread does its share of the op itself. On two cores this made
/// SmolLM2-135M training steps 5–20% faster (`docs/benchmarks.md`). `RAYON_NUM_THREADS` sets
/// the pool's size, as it sets rayon's default pool.
fn on_thread_pool(command: Command) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(COMMAND_STACK_BYTES)
        .thread_name(|i| format!("burnish-{i}"))
        .build()?;
    pool.install(|| dispatch(command))
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => commands::train::run(args),
        Command::Score(args) => commands::score::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Push(args) => commands::push::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Template(cmd) => commands::template::run(cmd),
        Command::Data(cmd) => commands::data::run(cmd),
    }
}
