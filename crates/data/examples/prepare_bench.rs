//! Data-preparation speed: render + tokenize + mask a synthetic 50k-conversation file, as
//! training does (`burnish_data::load`, parallel over all cores), and print rows/s and tokens/s.
//!
//! ```sh
//! cargo run --release -p burnish-data --example prepare_bench -- OUT_DIR [ROWS]
//! ```
//!
//! `RAYON_NUM_THREADS=1` measures one core. Besides wall time it prints the process's CPU time
//! (user + system, from `/proc/self/stat` on Linux), which is what matters when other work shares
//! the machine.
//!
//! Writes `OUT_DIR/conversations.jsonl` (seeded, the same on every run) and
//! `OUT_DIR/chat_template.jinja` (the built-in ChatML template, with `{% generation %}` blocks)
//! when missing, so `prepare_bench.py` times transformers on exactly the same input. The tokenizer
//! is the fixture in `tests/fixtures/models/llama`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burnish_data::{ChatTemplate, DataConfig, Encoder, Tokenizer, TrainOn, load};

const WORDS: [&str; 32] = [
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "data",
    "with",
    "care",
    "and",
    "a",
    "short",
    "reply",
    "when",
    "asked",
    "for",
    "numbers",
    "like",
    "42",
    "or",
    "names",
    "such",
    "as",
    "Zoë",
    "Ångström",
    "São",
    "Paulo",
    "日本",
    "🤖",
    "tests",
    "every",
];

/// A tiny seeded generator (64-bit LCG), so the file is identical everywhere.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }

    fn sentence(&mut self, min: usize, max: usize) -> String {
        let n = min + self.next(max - min + 1);
        let words: Vec<&str> = (0..n).map(|_| WORDS[self.next(WORDS.len())]).collect();
        let mut s = words.join(" ");
        s.push('.');
        s
    }
}

fn write_inputs(dir: &Path, rows: usize) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let template = ChatTemplate::builtin("chatml").expect("built-in");
    std::fs::write(dir.join("chat_template.jinja"), template.source())?;
    let path = dir.join("conversations.jsonl");
    if path.exists() {
        return Ok(path);
    }
    let mut rng = Lcg(2026);
    let mut out = String::new();
    for _ in 0..rows {
        let mut messages = Vec::new();
        if rng.next(2) == 0 {
            messages.push(serde_json::json!({"role": "system", "content": rng.sentence(5, 15)}));
        }
        for _ in 0..1 + rng.next(3) {
            messages.push(serde_json::json!({"role": "user", "content": rng.sentence(8, 40)}));
            messages
                .push(serde_json::json!({"role": "assistant", "content": rng.sentence(10, 80)}));
        }
        writeln!(out, "{}", serde_json::json!({ "messages": messages })).expect("String");
    }
    std::fs::write(&path, out)?;
    Ok(path)
}

/// User + system CPU time of this process, where `/proc` has it.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: prepare_bench OUT_DIR [ROWS]")?);
    let rows: usize = args
        .next()
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(50_000);
    let data = write_inputs(&dir, rows)?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama");
    let tokenizer = Tokenizer::from_dir(&fixture)?;
    for (label, template) in [
        (
            "chatml with {% generation %} blocks",
            ChatTemplate::from_file(&dir.join("chat_template.jinja"))?,
        ),
        (
            "fixture chatml, masks by prefix rendering",
            ChatTemplate::from_dir(&fixture)?,
        ),
    ] {
        let encoder = Encoder::new(tokenizer.clone(), template, TrainOn::Assistant);
        let (start, cpu) = (Instant::now(), cpu_seconds());
        let ds = load(&[&data], &encoder, &DataConfig::default())?;
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu).map(|(b, a)| format!("{:.2}", b - a));
        let r = &ds.report;
        println!(
            "{label}: {} rows, {} tokens ({} trained) in {secs:.2} s ({} CPU s): {:.0} rows/s, {:.0} tokens/s ({} threads)",
            r.rows,
            r.tokens,
            r.trained_tokens,
            cpu.unwrap_or_else(|| "?".into()),
            r.rows as f64 / secs,
            r.tokens as f64 / secs,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
