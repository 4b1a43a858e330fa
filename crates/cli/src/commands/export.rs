//! `burnish export`: a model, with an adapter folded in, as one GGUF file for llama.cpp and what
//! runs on it (Ollama, LM Studio, ...), written as llama.cpp's converter writes it. The
//! tokenizer's pre-tokenizer is told apart as llama.cpp's converter tells it: by the hash of
//! the ids its tokenizer gives a fixed text, looked up in the table of those llama.cpp knows.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burnish_data::Tokenizer;
use burnish_hub::resolve_model;
use burnish_model::{
    GgufModel, GgufType, Pretrained, export_gguf, lazy_weights, uses_sentencepiece,
};
use burnish_peft::SaveDtype;
use clap::{Args, ValueEnum};
use sha2::{Digest, Sha256};

use crate::device::Cpu;

/// The text whose token ids llama.cpp hashes to tell pre-tokenizers apart.
const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫\u{fe0f} (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// llama.cpp's known pre-tokenizers: the hash of a tokenizer's ids of [`CHECK_TEXT`], the name,
/// and a model that has it; one per line, tab-separated.
const KNOWN_PRE_TOKENIZERS: &str = include_str!("../gguf_pre_tokenizers.tsv");

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model directory, or a Hub id (`owner/name`).
    #[arg(long)]
    model: PathBuf,
    /// PEFT-format adapter (a run directory) to fold into --model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Branch, tag or commit of a Hub --model (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// Element type of the matrices: `auto` is bf16 for a bf16 checkpoint, else f16.
    #[arg(long = "type", value_enum, default_value_t = OutType::Auto)]
    out_type: OutType,
    /// llama.cpp's name of the tokenizer's pre-tokenizer (`llama-bpe`, `qwen2`, `smollm`,
    /// ...), for a tokenizer llama.cpp's table does not know.
    #[arg(long)]
    pre_tokenizer: Option<String>,
    /// The model's name in the file (default: the adapter's or the model's directory name).
    #[arg(long)]
    name: Option<String>,
    /// The GGUF file to write; must not exist yet.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutType {
    Auto,
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

/// The hash llama.cpp gives the tokenizer in `dir`: SHA-256 of its ids of [`CHECK_TEXT`],
/// written as a Python list.
fn tokenizer_hash(dir: &Path) -> Result<String> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    let ids = tokenizer.encode(CHECK_TEXT, true)?;
    let listed: Vec<String> = ids.iter().map(u32::to_string).collect();
    let digest = Sha256::digest(format!("[{}]", listed.join(", ")).as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// llama.cpp's name of the pre-tokenizer of the tokenizer in `dir`.
fn pre_tokenizer(dir: &Path) -> Result<String> {
    let hash = tokenizer_hash(dir)?;
    let known = KNOWN_PRE_TOKENIZERS.lines().find_map(|line| {
        let mut fields = line.split('\t');
        (fields.next() == Some(hash.as_str())).then(|| fields.next().unwrap_or_default())
    });
    match known {
        Some(name) => Ok(name.to_string()),
        None => bail!(
            "{}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {hash}); if it \
             splits text as a known one does, name it with --pre-tokenizer (`gpt-2` for GPT-2's \
             byte-level split, `llama-bpe` for Llama 3's, `qwen2`, `smollm`, ...)",
            dir.display()
        ),
    }
}

pub fn run(args: ExportArgs) -> Result<()> {
    ensure!(
        !args.out.exists(),
        "{}: already exists; remove it or choose another --out",
        args.out.display()
    );
    let model_dir = resolve_model(&args.model, args.revision.as_deref(), |f| eprintln!("{f}"))?;
    let device = Default::default();
    // The adapter is folded into each projection in f32 as that tensor is written.
    let (hold, declared) = super::held_as_stored(&model_dir)?;
    let loaded =
        Pretrained::<Cpu>::load_with_adapter(&model_dir, args.adapter.as_deref(), hold, &device)
            .with_context(|| format!("loading {}", model_dir.display()))?;
    ensure!(
        !loaded.model.is_classifier(),
        "{}: a sequence classifier (a reward model); GGUF export writes language models",
        args.adapter.as_deref().unwrap_or(&model_dir).display()
    );
    let pre = match (args.pre_tokenizer, uses_sentencepiece(&model_dir)) {
        (Some(_), true) => {
            eprintln!(
                "note: --pre-tokenizer is for byte-level BPE vocabularies; this model's \
                 SentencePiece vocabulary has none, and it is not used"
            );
            "default".into()
        }
        (None, true) => "default".into(),
        (Some(name), false) => name,
        (None, false) => pre_tokenizer(&model_dir)?,
    };
    let kind = match args.out_type {
        OutType::F32 => GgufType::F32,
        OutType::F16 => GgufType::F16,
        OutType::Bf16 => GgufType::Bf16,
        OutType::Q8_0 => GgufType::Q8_0,
        OutType::Auto => match declared {
            Some(SaveDtype::BF16) => GgufType::Bf16,
            _ => GgufType::F16,
        },
    };
    let source = args.adapter.as_deref().unwrap_or(&model_dir);
    let name = args.name.unwrap_or_else(|| {
        source
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    });
    let decoder = &loaded.config.decoder;
    if decoder.model_type == "mistral"
        && let Some(window) = decoder.sliding_window
    {
        eprintln!(
            "note: llama.cpp runs Mistral as Llama, attending to every earlier token: its \
             outputs differ from this model's past {window} tokens (its sliding_window)"
        );
    }
    let weights = lazy_weights(&loaded.model, true);
    // The template the adapter's run was trained with, when its recipe chose one, else the
    // model's own `chat_template.jinja` (which transformers and burnish read before
    // tokenizer_config.json's, as a full fine-tune's run directory may hold both).
    let template_file = [args.adapter.as_deref(), Some(model_dir.as_path())]
        .into_iter()
        .flatten()
        .find_map(super::template_file);
    let chat_template = match &template_file {
        Some(file) => Some(
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
        ),
        None => None,
    };
    let gguf = GgufModel {
        config: &loaded.config,
        tokenizer_dir: &model_dir,
        pre_tokenizer: &pre,
        name: &name,
        chat_template: chat_template.as_deref(),
    };
    export_gguf(&gguf, weights, kind, &args.out)?;
    eprintln!(
        "wrote {} ({kind:?}, pre-tokenizer {pre})",
        args.out.display()
    );
    Ok(())
}
