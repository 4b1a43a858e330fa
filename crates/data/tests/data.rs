//! burnish-data against transformers: renders of the chat templates shipped with trl, and token
//! ids and assistant masks, compared byte for byte with the goldens that
//! `scripts/golden/make_templates.py` wrote (transformers 5.24, jinja2 3.1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use burnish_data::{
    AlpacaStyle, Batch, ChatTemplate, DataConfig, Encoded, Encoder, Example, Message, OnBadRow,
    SOURCE_DATE_EPOCH, Sample, SpecialTokens, Tokenizer, TrainOn, Truncation, load,
    mask_from_spans, pack_best_fit_decreasing,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Golden {
    json: Value,
    conversations: BTreeMap<String, Vec<Message>>,
    special: SpecialTokens,
    extra: serde_json::Map<String, Value>,
}

fn golden() -> Golden {
    let dir = fixtures().join("data/templates");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    pin_render_time(json["render_epoch"].as_i64().unwrap());
    let convs: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("conversations.json")).unwrap())
            .unwrap();
    let conversations = convs
        .into_iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                serde_json::from_value(c["messages"].clone()).unwrap(),
            )
        })
        .collect();
    let tok = |k: &str| json["special_tokens"][k].as_str().map(String::from);
    let special = SpecialTokens {
        bos_token: tok("bos_token"),
        eos_token: tok("eos_token"),
        pad_token: tok("pad_token"),
        unk_token: tok("unk_token"),
    };
    let mut extra = serde_json::Map::new();
    extra.insert("date_string".into(), json["date_string"].clone());
    Golden {
        json,
        conversations,
        special,
        extra,
    }
}

/// Renders `strftime_now` at the time the goldens were rendered at (templates that print
/// today's date would otherwise differ from them on any other day).
fn pin_render_time(epoch: i64) {
    static PIN: Once = Once::new();
    PIN.call_once(|| {
        // SAFETY: one value, set once, before this binary renders any template, and read
        // through `std::env` only, which holds its lock while reading.
        unsafe { std::env::set_var(SOURCE_DATE_EPOCH, epoch.to_string()) }
    });
}

fn template(name: &str) -> ChatTemplate {
    ChatTemplate::from_file(&fixtures().join(format!("data/templates/{name}.jinja"))).unwrap()
}

/// Every template x conversation x add_generation_prompt renders byte for byte as transformers
/// renders it, and raises where it raises.
#[test]
fn trl_templates_render_byte_exact() {
    let g = golden();
    let texts = g.json["texts"].as_array().unwrap();
    let mut templates = BTreeMap::new();
    let (mut exact, mut raised_both, mut failures) = (0, 0, Vec::new());
    let renders = g.json["renders"].as_array().unwrap();
    for r in renders {
        let name = r["template"].as_str().unwrap();
        let conv = r["conversation"].as_str().unwrap();
        let agp = r["add_generation_prompt"].as_bool().unwrap();
        let t = templates.entry(name).or_insert_with(|| template(name));
        let ours = t.render_spans(&g.conversations[conv], None, agp, &g.special, &g.extra);
        match (r.get("text"), ours) {
            (Some(i), Ok(ours)) if ours.text == texts[i.as_u64().unwrap() as usize] => exact += 1,
            (None, Err(_)) => raised_both += 1,
            (expected, ours) => failures.push(format!(
                "{name} × {conv} (agp={agp}): expected {:?}, got {:?}",
                expected
                    .map(|i| &texts[i.as_u64().unwrap() as usize])
                    .or(r.get("error")),
                ours.map(|o| o.text)
            )),
        }
    }
    eprintln!(
        "{} templates × {} conversations × 2: {exact} renders byte-exact, {raised_both} raise in both, {} differ",
        templates.len(),
        g.conversations.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(exact + raised_both, renders.len());
}

fn golden_tokenizer(g: &Golden) -> Tokenizer {
    let mut t = Tokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    t.special = g.special.clone();
    t
}

fn golden_text<'a>(g: &'a Golden, template: &str, conv: &str, agp: bool) -> Option<&'a str> {
    let r = g.json["renders"].as_array().unwrap().iter().find(|r| {
        r["template"] == template && r["conversation"] == conv && r["add_generation_prompt"] == agp
    })?;
    let i = r.get("text")?.as_u64()? as usize;
    g.json["texts"][i].as_str()
}

fn mask_string(mask: &[bool]) -> String {
    mask.iter().map(|&m| if m { '1' } else { '0' }).collect()
}

/// Templates whose prefix-derived masks equal their `_training` variant's on every conversation
/// both render alike.
const PREFIX_EXACT: &[&str] = &[
    "cohere",
    "cohere2",
    "diffusion_gemma",
    "gemma",
    "gemma3",
    "idefics3",
    "qwen3",
    "smolvlm",
];

/// Templates whose prefix-derived masks differ from their `_training` variant's on some
/// conversation, legitimately: the training variant puts the `{% generation %}` block somewhere
/// other than where the generation prompt ends (gpt-oss's channel header, an empty think block,
/// the newline after the end-of-turn token). Every other template either matches or cannot be
/// prefix-rendered (it renders earlier turns differently once later ones follow, e.g. reasoning
/// stripped from history, or raises on a prefix), and the row is then rejected with a reason.
const PREFIX_DIFFERENT: &[&str] = &[
    "glm4moe",
    "gptoss",
    "llava_next",
    "muse_glimmer",
    "qwen2_5",
    "qwen3_5_nothink",
    "qwen3_5_think",
    "qwen3_6",
    "qwen3_8",
];

/// Token ids and assistant masks of templates with `{% generation %}` blocks equal
/// `apply_chat_template(..., return_assistant_tokens_mask=True)`; a conversation with an empty
/// assistant turn is rejected by the encoder (the turn would train its end token alone); the
/// original templates, without markers, give the same masks by prefix rendering except where
/// [`PREFIX_DIFFERENT`] says why not.
#[test]
fn assistant_masks_match_transformers() {
    let g = golden();
    let tokenizer = golden_tokenizer(&g);
    let (mut exact, mut derived_same, mut derived_checked) = (0, 0, 0);
    let mut failures = Vec::new();
    let mut differing = std::collections::BTreeSet::new();
    let mut prefix_checked = std::collections::BTreeSet::new();
    let mut silently_different = std::collections::BTreeSet::new();
    let masks = g.json["masks"].as_array().unwrap();
    for m in masks {
        let name = m["template"].as_str().unwrap();
        let conv = m["conversation"].as_str().unwrap();
        let ids: Vec<u32> = m["input_ids"]
            .as_str()
            .unwrap()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let expected = m["assistant_masks"].as_str().unwrap();
        let messages = &g.conversations[conv];
        let mut encoder = Encoder::new(tokenizer.clone(), template(name), TrainOn::Assistant);
        encoder.template_vars = g.extra.clone();
        let rendered = encoder
            .template
            .render_spans(messages, None, false, &g.special, &g.extra)
            .unwrap();
        let (our_ids, offsets) = tokenizer
            .encode_with_offsets(&rendered.text, false)
            .unwrap();
        let ours = mask_string(&mask_from_spans(&offsets, &rendered.generation_spans));
        if our_ids != ids || ours != expected {
            failures.push(format!("{name} × {conv}: mask {ours} != {expected}"));
            continue;
        }
        let empty_turn = messages
            .iter()
            .any(|m| m.role == "assistant" && m.content.is_empty());
        if expected.contains('1') {
            // The encoder's output for a training row is the same.
            let sample = Sample::Chat {
                messages: messages.clone(),
                prompt_len: None,
                tools: None,
            };
            match encoder.encode(&sample) {
                Ok(Encoded::Single(e))
                    if !empty_turn
                        && e.input_ids == ids
                        && mask_string(&e.labels_mask) == expected => {}
                Err(reason) if empty_turn && reason.contains("is empty") => {}
                other => failures.push(format!("{name} × {conv}: encoder gave {other:?}")),
            }
        }
        exact += 1;
        // The original template, without markers, through prefix rendering.
        let Some(base) = name.strip_suffix("_training") else {
            continue;
        };
        if !expected.contains('1')
            || empty_turn
            || golden_text(&g, base, conv, false) != Some(rendered.text.as_str())
        {
            continue;
        }
        derived_checked += 1;
        let mut plain = Encoder::new(tokenizer.clone(), template(base), TrainOn::Assistant);
        plain.template_vars = g.extra.clone();
        let sample = Sample::Chat {
            messages: messages.clone(),
            prompt_len: None,
            tools: None,
        };
        prefix_checked.insert(base);
        match plain.encode(&sample) {
            Ok(Encoded::Single(e)) if mask_string(&e.labels_mask) == expected => derived_same += 1,
            Ok(_) => {
                silently_different.insert(base);
                differing.insert(base);
            }
            Err(reason) => {
                if !reason.contains("differently once later messages follow")
                    && !reason.contains("chat template")
                {
                    failures.push(format!(
                        "{base} × {conv}: prefix rendering failed: {reason}"
                    ));
                }
                differing.insert(base);
            }
        }
    }
    // The split into exact and differing templates is the one documented above.
    let exact_templates: Vec<&str> = prefix_checked.difference(&differing).copied().collect();
    assert_eq!(exact_templates, PREFIX_EXACT);
    assert_eq!(
        silently_different.into_iter().collect::<Vec<_>>(),
        PREFIX_DIFFERENT
    );
    eprintln!(
        "{exact}/{} token+mask goldens exact; prefix-derived masks equal the training template's on {derived_same}/{derived_checked} (differ or not prefix-stable: {differing:?})",
        masks.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The named built-ins render exactly what the model families' own templates render.
#[test]
fn builtins_render_like_the_originals() {
    let g = golden();
    let mut compared = 0;
    for (builtin, original) in [("llama3", "llama3"), ("gemma", "gemma"), ("phi3", "phi3")] {
        let t = ChatTemplate::builtin(builtin).unwrap();
        for (conv, messages) in &g.conversations {
            for agp in [false, true] {
                let Some(expected) = golden_text(&g, original, conv, agp) else {
                    continue;
                };
                if messages
                    .iter()
                    .any(|m| matches!(m.content, burnish_data::Content::Parts(_)))
                {
                    // The originals print a list content as Python's repr (or raise); a
                    // built-in gets the parts' text joined.
                    let joined: Vec<Message> = messages
                        .iter()
                        .map(|m| Message::new(m.role.clone(), m.text()))
                        .collect();
                    assert_eq!(
                        t.render(messages, agp, &g.special).unwrap(),
                        t.render(&joined, agp, &g.special).unwrap(),
                        "{builtin} × {conv}"
                    );
                    continue;
                }
                let ours = t.render(messages, agp, &g.special).unwrap();
                assert_eq!(ours, expected, "{builtin} × {conv} agp={agp}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 30, "{compared}");
}

// ---- datasets: row shapes, train_on modes, bad rows -------------------------------------------

fn chatml_encoder(train_on: TrainOn) -> Encoder {
    let dir = fixtures().join("models/llama");
    Encoder::new(
        Tokenizer::from_dir(&dir).unwrap(),
        ChatTemplate::from_dir(&dir).unwrap(),
        train_on,
    )
}

fn rows(name: &str) -> PathBuf {
    fixtures().join("data/rows").join(name)
}

/// The text of each run of trained tokens.
fn trained_text(tokenizer: &Tokenizer, e: &Example) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (&id, &m) in e.input_ids.iter().zip(&e.labels_mask) {
        if m && !prev {
            runs.push(Vec::new());
        }
        if m {
            runs.last_mut().unwrap().push(id);
        }
        prev = m;
    }
    runs.iter()
        .map(|r| tokenizer.decode(r, false).unwrap())
        .collect()
}

#[test]
fn every_row_shape_loads_with_exact_masks() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let cfg = DataConfig::default();
    let tok = &enc.tokenizer;
    let ds = load(&[&rows("messages.jsonl")], &enc, &cfg).unwrap();
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(
        trained_text(tok, &ds.examples[0]),
        vec!["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]
    );
    let ds = load(&[&rows("sharegpt.json")], &enc, &cfg).unwrap();
    assert_eq!(
        ds.example_sources[1].line, 3,
        "line of the second row of the data array"
    );
    assert_eq!(trained_text(tok, &ds.examples[1]), vec!["9<|im_end|>\n"]);
    let ds = load(&[&rows("alpaca.json")], &enc, &cfg).unwrap();
    assert_eq!(trained_text(tok, &ds.examples[0]), vec!["chat<|im_end|>\n"]);
    assert!(
        tok.decode(&ds.examples[0].input_ids, false)
            .unwrap()
            .contains("Translate to French\n\ncat")
    );
    let plain = DataConfig {
        alpaca_style: AlpacaStyle::Plain,
        ..Default::default()
    };
    let ds = load(&[&rows("alpaca.json")], &enc, &plain).unwrap();
    let text = tok.decode(&ds.examples[1].input_ids, false).unwrap();
    assert!(text.ends_with("### Response:\nhi<|im_end|>"), "{text}");
    assert_eq!(trained_text(tok, &ds.examples[1]), vec!["hi<|im_end|>"]);
    let ds = load(&[&rows("prompt_completion.jsonl")], &enc, &cfg).unwrap();
    assert_eq!(trained_text(tok, &ds.examples[0]), vec![" blue.<|im_end|>"]);
    assert_eq!(
        trained_text(tok, &ds.examples[1]),
        vec!["Green.<|im_end|>\n"]
    );
    let ds = load(&[&rows("preference.jsonl")], &enc, &cfg).unwrap();
    assert_eq!(ds.pairs.len(), 3);
    let text = |ids: &[u32]| tok.decode(ids, false).unwrap();
    assert_eq!(text(&ds.pairs[0].chosen_ids), "Paris.<|im_end|>\n");
    assert_eq!(text(&ds.pairs[0].rejected_ids), "Lyon.<|im_end|>\n");
    assert!(text(&ds.pairs[1].prompt_ids).ends_with("2+2?<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(text(&ds.pairs[1].rejected_ids), "5<|im_end|>\n");
    assert_eq!(text(&ds.pairs[2].chosen_ids), " blue<|im_end|>");
    let chosen = ds.pairs[0].chosen();
    assert_eq!(chosen.trained(), ds.pairs[0].chosen_ids.len());
    assert_eq!(ds.report.rows, 3);
    assert!(ds.report.rejected.is_empty());
}

#[test]
fn labeled_completions_load_and_pairs_split_into_them() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let tok = &enc.tokenizer;
    let text = |ids: &[u32]| tok.decode(ids, false).unwrap();
    let ds = load(&[&rows("unpaired.jsonl")], &enc, &DataConfig::default()).unwrap();
    assert_eq!(
        (ds.examples.len(), ds.pairs.len(), ds.labeled.len()),
        (0, 0, 3)
    );
    let labels: Vec<bool> = ds.labeled.iter().map(|l| l.desirable).collect();
    assert_eq!(labels, [true, false, false]);
    assert_eq!(text(&ds.labeled[0].completion_ids), "Paris.<|im_end|>\n");
    assert!(text(&ds.labeled[1].prompt_ids).ends_with("2+2?<|im_end|>\n<|im_start|>assistant\n"));
    // A text completion ends with the end-of-sequence token, as TRL appends it.
    assert_eq!(text(&ds.labeled[2].completion_ids), " green<|im_end|>");
    let sequence = ds.labeled[0].example();
    assert_eq!(sequence.trained(), ds.labeled[0].completion_ids.len());
    assert_eq!(ds.labeled_sources[2].line, 3);

    // `max_length` cuts the completion after its prompt.
    let prompt = ds.labeled[0].prompt_ids.len();
    let short = DataConfig {
        max_length: Some(prompt + 1),
        ..Default::default()
    };
    let cut = load(&[&rows("unpaired.jsonl")], &enc, &short).unwrap();
    assert_eq!(cut.labeled[0].completion_ids.len(), 1);
    for l in &cut.labeled {
        assert!(l.prompt_ids.len() + l.completion_ids.len() <= prompt + 1);
    }
    assert_eq!(cut.report.truncated, 1, "the other rows fit");

    // Pairs split into their chosen completions (desirable), then their rejected ones.
    let pairs = load(&[&rows("preference.jsonl")], &enc, &DataConfig::default()).unwrap();
    let split = pairs.clone().unpaired();
    assert!(split.pairs.is_empty());
    assert_eq!(split.labeled.len(), 6);
    for (i, pair) in pairs.pairs.iter().enumerate() {
        let (chosen, rejected) = (&split.labeled[i], &split.labeled[i + 3]);
        assert!(chosen.desirable && !rejected.desirable);
        assert_eq!(chosen.prompt_ids, pair.prompt_ids);
        assert_eq!(chosen.completion_ids, pair.chosen_ids);
        assert_eq!(rejected.completion_ids, pair.rejected_ids);
        assert_eq!(split.labeled_sources[i + 3], pairs.pair_sources[i]);
    }

    // Labeled rows among pairs are bad rows of another kind (a tie goes to the first row's).
    let mixed = [rows("preference.jsonl"), rows("unpaired.jsonl")];
    let err = load(&[&mixed[0], &mixed[1]], &enc, &DataConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unpaired.jsonl:1")
            && err.contains("a labeled completion in a dataset of preference pairs"),
        "{err}"
    );
}

#[test]
fn train_on_modes_select_the_right_tokens() {
    let path = rows("messages.jsonl");
    let run = |mode| {
        let enc = chatml_encoder(mode);
        let ds = load(&[&path], &enc, &DataConfig::default()).unwrap();
        (
            trained_text(&enc.tokenizer, &ds.examples[0]),
            ds.examples[0].clone(),
        )
    };
    let (all, e) = run(TrainOn::All);
    // Every token but the first, which nothing predicts.
    assert!(e.labels_mask.iter().all(|&m| m));
    assert_eq!(e.trained(), e.len() - 1);
    assert_eq!(all.len(), 1);
    assert_eq!(
        run(TrainOn::Assistant).0,
        vec!["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]
    );
    assert_eq!(run(TrainOn::LastTurn).0, vec!["Goodbye.<|im_end|>\n"]);
    assert_eq!(run(TrainOn::Completion).0, vec!["Goodbye.<|im_end|>\n"]);
    // The end-of-turn token is trained in every mode.
    let eot = chatml_encoder(TrainOn::Assistant)
        .tokenizer
        .token_to_id("<|im_end|>")
        .unwrap();
    for mode in [
        TrainOn::All,
        TrainOn::Assistant,
        TrainOn::LastTurn,
        TrainOn::Completion,
    ] {
        let e = run(mode).1;
        let last_eot = e.input_ids.iter().rposition(|&i| i == eot).unwrap();
        assert!(e.labels_mask[last_eot], "{mode:?}");
    }
}

#[test]
fn bad_rows_are_errors_or_counted_skips_with_file_and_line() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let path = rows("bad.jsonl");
    let err = load(&[&path], &enc, &DataConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad.jsonl:2: invalid JSON"), "{msg}");
    let cfg = DataConfig {
        on_bad_row: OnBadRow::Skip,
        max_length: Some(24),
        truncation: Truncation::Drop,
        ..Default::default()
    };
    let ds = load(&[&path], &enc, &cfg).unwrap();
    assert_eq!(ds.examples.len(), 1);
    let got: Vec<(usize, &str)> = ds
        .report
        .rejected
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    let expect = [
        (2, "invalid JSON"),
        (3, "unknown role `wizard`"),
        (4, "empty conversation"),
        (5, "no assistant turn to train on"),
        (6, "must be a string or a list of text parts"),
        (7, "identical"),
        (8, "longer than max_length = 24"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:?}");
    for ((line, reason), (eline, ereason)) in got.iter().zip(expect) {
        assert_eq!(*line, eline);
        assert!(reason.contains(ereason), "line {line}: {reason}");
    }
    assert!(ds.report.rejected.iter().all(|r| r.path == path));
    // keep-start truncation is counted, never silent.
    let keep = DataConfig {
        on_bad_row: OnBadRow::Skip,
        max_length: Some(24),
        ..Default::default()
    };
    let ds = load(&[&path], &enc, &keep).unwrap();
    assert_eq!(ds.report.truncated, 1);
    assert!(ds.examples.iter().all(|e| e.len() <= 24));
    // A template that raises is a bad row too.
    let raising = Encoder::new(
        enc.tokenizer.clone(),
        ChatTemplate::new("strict", "{{ raise_exception('no thanks') }}").unwrap(),
        TrainOn::Assistant,
    );
    let err = load(&[&rows("messages.jsonl")], &raising, &DataConfig::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("messages.jsonl:1: chat template `strict`"),
        "{err}"
    );
    assert!(err.to_string().contains("no thanks"), "{err}");
    // Config typos are errors naming the key.
    let typo = serde_json::from_str::<DataConfig>(r#"{"max_lenght": 5}"#).unwrap_err();
    assert!(typo.to_string().contains("max_lenght"), "{typo}");
}

/// A tokenizer whose post-processor adds BOS: the template's own BOS is not doubled, and a
/// template without one gets exactly one from the post-processor.
#[test]
fn bos_appears_exactly_once() {
    let src = fixtures().join("models/llama");
    let dir = std::env::temp_dir().join(format!("burnish-data-bos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let sample = Sample::Chat {
        messages: vec![Message::new("user", "Hi"), Message::new("assistant", "Yo")],
        prompt_len: None,
        tools: None,
    };
    for template in ["llama3", "chatml"] {
        let enc = Encoder::new(
            tokenizer.clone(),
            ChatTemplate::builtin(template).unwrap(),
            TrainOn::Assistant,
        );
        let Encoded::Single(e) = enc.encode(&sample).unwrap() else {
            panic!("a conversation gives one example")
        };
        assert_eq!(e.input_ids[0], 0, "{template}");
        assert_eq!(
            e.input_ids.iter().filter(|&&i| i == 0).count(),
            1,
            "{template}"
        );
        assert!(!e.labels_mask[0]);
    }
}

/// Packing keeps every document's tokens, masks and positions as if it were alone.
#[test]
fn packed_batches_keep_documents_apart() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let cfg = DataConfig::default();
    let mut examples = Vec::new();
    for f in [
        "messages.jsonl",
        "sharegpt.json",
        "alpaca.json",
        "prompt_completion.jsonl",
    ] {
        examples.extend(load(&[&rows(f)], &enc, &cfg).unwrap().examples);
    }
    let lengths: Vec<usize> = examples.iter().map(|e| e.len()).collect();
    let cap = *lengths.iter().max().unwrap() + 8;
    let bins = pack_best_fit_decreasing(&lengths, cap);
    assert!(bins.len() < examples.len());
    let rows_: Vec<Vec<&Example>> = bins
        .iter()
        .map(|b| b.iter().map(|&i| &examples[i]).collect())
        .collect();
    let batch = Batch::from_rows(&rows_, 0);
    for (r, bin) in bins.iter().enumerate() {
        let mut at = r * batch.seq_len;
        for &i in bin {
            let e = &examples[i];
            let span = at..at + e.len();
            assert_eq!(batch.input_ids[span.clone()], e.input_ids[..]);
            assert_eq!(batch.labels_mask[span.clone()], e.labels_mask[..]);
            assert_eq!(
                batch.position_ids[span.clone()],
                (0..e.len() as u32).collect::<Vec<_>>()[..]
            );
            let seg = batch.segment_ids[at];
            assert!(batch.segment_ids[span.clone()].iter().all(|&s| s == seg));
            at += e.len();
        }
    }
}

#[test]
fn seeded_split_is_reproducible_and_keeps_sources() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let paths = [
        rows("messages.jsonl"),
        rows("sharegpt.json"),
        rows("alpaca.json"),
        rows("prompt_completion.jsonl"),
    ];
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let mut ds = load(&refs, &enc, &DataConfig::default()).unwrap();
    let pairs = load(&[&rows("preference.jsonl")], &enc, &DataConfig::default()).unwrap();
    ds.pairs = pairs.pairs;
    ds.pair_sources = pairs.pair_sources;
    assert_eq!((ds.examples.len(), ds.pairs.len()), (7, 3));
    let (train, eval) = ds.clone().split_eval(0.3, 7);
    let (train2, eval2) = ds.clone().split_eval(0.3, 7);
    assert_eq!(train.examples, train2.examples);
    assert_eq!(eval.example_sources, eval2.example_sources);
    assert_eq!((train.examples.len(), eval.examples.len()), (5, 2));
    assert_eq!((train.pairs.len(), eval.pairs.len()), (2, 1));
    for (e, s) in eval.examples.iter().zip(&eval.example_sources) {
        let i = ds.example_sources.iter().position(|x| x == s).unwrap();
        assert_eq!(&ds.examples[i], e);
    }
}

/// A BPE merge across the start of a generation block (` t` + `he` = ` the`) is trained, as in
/// transformers (expected ids and mask from `apply_chat_template(..., return_assistant_tokens_mask=True)`
/// with the fixture tokenizer, transformers 5.24).
#[test]
fn a_token_straddling_the_boundary_is_trained() {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let template = ChatTemplate::new(
        "straddle",
        "{{ 'user: t' }}{% generation %}{{ 'he end' }}{% endgeneration %}",
    )
    .unwrap();
    let enc = Encoder::new(tokenizer, template, TrainOn::Assistant);
    let sample = Sample::Chat {
        messages: vec![Message::new("user", "x")],
        prompt_len: None,
        tools: None,
    };
    let Ok(Encoded::Single(e)) = enc.encode(&sample) else {
        panic!("the template marks a generation span")
    };
    assert_eq!(e.input_ids, vec![87, 85, 264, 28, 261, 223, 389]);
    assert_eq!(mask_string(&e.labels_mask), "0000111");
}

/// A file named `name` holding `bytes`, in a directory of its own.
fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnish-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The rejected rows of `text` (JSON Lines) as (line, reason), loaded with `on_bad_row = "skip"`.
fn rejections(name: &str, text: &str, enc: &Encoder, cfg: DataConfig) -> Vec<(usize, String)> {
    let path = temp_file(name, text.as_bytes());
    let cfg = DataConfig {
        on_bad_row: OnBadRow::Skip,
        ..cfg
    };
    let ds = load(&[&path], enc, &cfg).unwrap();
    ds.report
        .rejected
        .iter()
        .map(|r| (r.line, r.reason.clone()))
        .collect()
}

fn assert_reasons(got: &[(usize, String)], expect: &[(usize, &str)]) {
    assert_eq!(got.len(), expect.len(), "{got:?}");
    for ((line, reason), (eline, ereason)) in got.iter().zip(expect) {
        assert_eq!(line, eline, "{reason}");
        assert!(reason.contains(ereason), "line {line}: {reason}");
    }
}

#[test]
fn rows_with_nothing_to_learn_are_bad_rows() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let sft = concat!(
        "{\"text\": \"\"}\n",
        "{\"text\": \"<|im_end|>\"}\n",
        "{\"prompt\": \"p\", \"completion\": \"\"}\n",
        "{\"instruction\": \"x\", \"output\": \"\"}\n",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"\"}]}\n",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    assert_reasons(
        &rejections("empty.jsonl", sft, &enc, DataConfig::default()),
        &[
            (1, "the text is empty"),
            (2, "the text is empty"),
            (3, "the completion is empty"),
            (
                4,
                "the assistant turn at message 1 (counting from 0) is empty",
            ),
            (
                5,
                "the assistant turn at message 1 (counting from 0) is empty",
            ),
        ],
    );
    let dpo = concat!(
        "{\"prompt\": \"\", \"chosen\": \"\", \"rejected\": \"no\"}\n",
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"q\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"r\"}]}\n",
        "{\"prompt\": \"q\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n",
    );
    assert_reasons(
        &rejections("empty_pairs.jsonl", dpo, &enc, DataConfig::default()),
        &[
            (1, "`chosen` is empty"),
            (2, "the `chosen` assistant turn at completion message 0"),
        ],
    );
    // A plain-text pair ends with EOS exactly once, as a plain-text example does.
    let path = temp_file(
        "eos.jsonl",
        b"{\"prompt\": \"q\", \"chosen\": \"yes<|im_end|>\", \"rejected\": \"no\"}\n",
    );
    let ds = load(&[&path], &enc, &DataConfig::default()).unwrap();
    let eos = enc.tokenizer.token_to_id("<|im_end|>").unwrap();
    let pair = &ds.pairs[0];
    assert_eq!(pair.chosen_ids.iter().filter(|&&i| i == eos).count(), 1);
    assert_eq!(pair.rejected_ids.last(), Some(&eos));
    assert_eq!(
        ds.report.trained_tokens,
        pair.chosen().trained() + pair.rejected().trained()
    );
    // The first token is never a target: it does not count as trained.
    let e = Example {
        input_ids: vec![1, 2, 3],
        labels_mask: vec![true, false, true],
    };
    assert_eq!(e.trained(), 1);
    // A length that leaves nothing to predict is a config error naming the key.
    let one = DataConfig {
        max_length: Some(1),
        ..Default::default()
    };
    let err = load(&[&path], &enc, &one).unwrap_err().to_string();
    assert!(
        err.contains("`data.max_length`: must be at least 2"),
        "{err}"
    );
}

#[test]
fn a_dataset_of_one_kind_rejects_rows_of_the_other() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let text = concat!(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
        "{\"prompt\": \"q\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"c\"}, {\"role\": \"assistant\", \"content\": \"d\"}]}\n",
    );
    let path = temp_file("mixed.jsonl", text.as_bytes());
    let err = load(&[&path], &enc, &DataConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mixed.jsonl:2: a preference pair in a dataset of single sequences"),
        "{err}"
    );
    let skip = DataConfig {
        on_bad_row: OnBadRow::Skip,
        ..Default::default()
    };
    let ds = load(&[&path], &enc, &skip).unwrap();
    assert_eq!((ds.examples.len(), ds.pairs.len()), (2, 0));
    assert_eq!(ds.report.rejected.len(), 1);
    assert_eq!(ds.report.rejected[0].line, 2);
}

#[test]
fn completion_training_needs_the_assistant_to_speak_last() {
    let row = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}, {\"role\": \"user\", \"content\": \"c\"}]}\n";
    assert_reasons(
        &rejections(
            "trailing.jsonl",
            row,
            &chatml_encoder(TrainOn::Completion),
            DataConfig::default(),
        ),
        &[(
            1,
            "the conversation ends on a `user` turn; the last message must be the assistant's",
        )],
    );
    // Assistant-turn training trains the assistant turn and leaves the trailing one untrained.
    let enc = chatml_encoder(TrainOn::Assistant);
    let path = temp_file("trailing_ok.jsonl", row.as_bytes());
    let ds = load(&[&path], &enc, &DataConfig::default()).unwrap();
    assert_eq!(
        trained_text(&enc.tokenizer, &ds.examples[0]),
        vec!["b<|im_end|>\n"]
    );
}

#[test]
fn truncation_that_makes_a_pair_identical_rejects_it() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let prompt = enc.tokenizer.encode("q", false).unwrap().len();
    let row = "{\"prompt\": \"q\", \"chosen\": \"the same long start, then yes\", \"rejected\": \"the same long start, then no\"}\n";
    let cfg = DataConfig {
        max_length: Some(prompt + 2),
        ..Default::default()
    };
    assert_reasons(
        &rejections("identical.jsonl", row, &enc, cfg),
        &[(
            1,
            &format!(
                "identical after truncation to max_length = {}; raise data.max_length",
                prompt + 2
            ),
        )],
    );
}

#[test]
fn file_layout_comes_from_the_content() {
    let enc = chatml_encoder(TrainOn::Assistant);
    let row = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}";
    let cfg = DataConfig::default();
    // A byte-order mark is skipped.
    let bom = temp_file("bom.jsonl", format!("\u{feff}{row}\n{row}\n").as_bytes());
    assert_eq!(load(&[&bom], &enc, &cfg).unwrap().examples.len(), 2);
    // A line that is not UTF-8 is a bad row with its line, which can be skipped.
    let mut bytes = format!("{row}\n").into_bytes();
    bytes.extend_from_slice(b"{\"text\": \"\xff\"}\n");
    bytes.extend_from_slice(format!("{row}\n").as_bytes());
    let latin1 = temp_file("latin1.jsonl", &bytes);
    let err = load(&[&latin1], &enc, &cfg).unwrap_err().to_string();
    assert!(err.contains("latin1.jsonl:2: invalid UTF-8"), "{err}");
    let skip = DataConfig {
        on_bad_row: OnBadRow::Skip,
        ..Default::default()
    };
    let ds = load(&[&latin1], &enc, &skip).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.report.rejected[0].line, 2);
    // JSON Lines in a `.json` file and a pretty-printed array in a `.jsonl` file both read.
    let lines = temp_file("lines.json", format!("{row}\n{row}\n").as_bytes());
    assert_eq!(load(&[&lines], &enc, &cfg).unwrap().examples.len(), 2);
    let array = temp_file(
        "array.jsonl",
        format!("[\n  {row},\n  {row}\n]\n").as_bytes(),
    );
    let ds = load(&[&array], &enc, &cfg).unwrap();
    assert_eq!(ds.example_sources[1].line, 3);
    // A file that is neither is a file-level error, with no advice to skip rows.
    for (name, text) in [
        ("object.json", "{\"rows\": []}".to_string()),
        ("pretty.jsonl", format!("{{\n  \"rows\": [{row}]\n}}\n")),
    ] {
        let path = temp_file(name, text.as_bytes());
        let err = load(&[&path], &enc, &cfg).unwrap_err().to_string();
        assert!(err.contains(&format!("{name}:")), "{err}");
        assert!(err.contains("`data` array"), "{err}");
        assert!(!err.contains("on_bad_row"), "{err}");
    }
}

#[test]
fn builtin_templates_join_text_parts_and_reject_other_parts() {
    let t = ChatTemplate::builtin("chatml").unwrap();
    let part = |kind: &str, text: &str| burnish_data::ContentPart {
        kind: kind.into(),
        text: text.into(),
    };
    let parts = |p| Message {
        role: "user".into(),
        content: burnish_data::Content::Parts(p),
        extra: Default::default(),
    };
    let special = SpecialTokens::default();
    let text = t
        .render(
            &[parts(vec![part("text", "Hi "), part("text", "there")])],
            false,
            &special,
        )
        .unwrap();
    assert_eq!(text, "<|im_start|>user\nHi there<|im_end|>\n");
    let err = t
        .render(&[parts(vec![part("image", "x")])], false, &special)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("message 0 (counting from 0) has a `image` part"),
        "{err}"
    );
}

/// A template that renders tool schemas, tool calls and tool results, as tool-using models'
/// templates do, without `{% generation %}` blocks (assistant spans come from prefixes).
const TOOL_TEMPLATE: &str = concat!(
    "{%- if tools -%}{{ 'tools: ' ~ (tools | length) ~ '\\n' }}{%- endif -%}",
    "{%- for m in messages -%}",
    "{%- if m.role == 'tool' -%}{{ 'tool ' ~ m.tool_call_id ~ ': ' ~ m.content ~ '\\n' }}",
    "{%- elif m.role == 'assistant' -%}{{ 'assistant: ' }}",
    "{%- if m.tool_calls -%}{{ 'call ' ~ m.tool_calls[0].function.name }}",
    "{%- else -%}{{ m.content }}{%- endif -%}{{ '.\\n' }}",
    "{%- else -%}{{ m.role ~ ': ' ~ m.content ~ '\\n' }}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}",
);

/// A tool-using conversation as TRL's datasets have it: tool calls and tool results in the
/// messages, the tool schemas in a `tools` column beside them.
const TOOL_ROW: &str = concat!(
    r#"{"messages": ["#,
    r#"{"role": "user", "content": "Weather in Paris?"}, "#,
    r#"{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, "#,
    r#"{"role": "tool", "content": "sunny", "tool_call_id": "call_1"}, "#,
    r#"{"role": "assistant", "content": "Sunny"}], "#,
    r#""tools": [{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "get_time"}}]}"#,
    "\n",
);

#[test]
fn tool_calls_and_tools_reach_the_template_and_tool_calls_are_trained() {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let template = ChatTemplate::new("tools", TOOL_TEMPLATE).unwrap();
    let enc = Encoder::new(tokenizer, template, TrainOn::Assistant);
    let path = temp_file("tools.jsonl", TOOL_ROW.as_bytes());
    let ds = load(&[&path], &enc, &DataConfig::default()).unwrap();
    let e = &ds.examples[0];
    assert_eq!(
        enc.tokenizer.decode(&e.input_ids, true).unwrap(),
        concat!(
            "tools: 2\n",
            "user: Weather in Paris?\n",
            "assistant: call get_weather.\n",
            "tool call_1: sunny\n",
            "assistant: Sunny.\n",
        )
    );
    // The tool-call turn (whose content was null) is an assistant turn, trained as such (the
    // space before `call` and `call` are one token, which straddles the turn's start).
    assert_eq!(
        trained_text(&enc.tokenizer, e),
        vec![" call get_weather.\n", "Sunny.\n"]
    );
    // A preference pair whose chosen side calls a tool with empty content is no empty turn.
    let pair = concat!(
        r#"{"prompt": [{"role": "user", "content": "Weather?"}], "#,
        r#""chosen": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather"}}]}], "#,
        r#""rejected": [{"role": "assistant", "content": "No idea"}], "tools": [{"name": "get_weather"}]}"#,
        "\n",
    );
    let path = temp_file("tool_pair.jsonl", pair.as_bytes());
    let ds = load(&[&path], &enc, &DataConfig::default()).unwrap();
    let p = &ds.pairs[0];
    let text = |ids: &[u32]| enc.tokenizer.decode(ids, true).unwrap();
    assert_eq!(text(&p.prompt_ids), "tools: 1\nuser: Weather?\nassistant: ");
    assert_eq!(text(&p.chosen_ids), "call get_weather.\n");
    assert_eq!(text(&p.rejected_ids), "No idea.\n");
}

#[test]
fn builtin_templates_reject_what_they_cannot_render() {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let builtin = |name: &str| {
        Encoder::new(
            tokenizer.clone(),
            ChatTemplate::builtin(name).unwrap(),
            TrainOn::Assistant,
        )
    };
    let advice =
        "which this built-in template does not render; use the model's own chat template instead";
    let rows = concat!(
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [{"name": "f"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "hmm"}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}"#,
        "\n",
    );
    assert_reasons(
        &rejections(
            "builtin_tools.jsonl",
            rows,
            &builtin("chatml"),
            DataConfig::default(),
        ),
        &[
            (
                1,
                &format!("message 1 (counting from 0) has `tool_calls`, {advice}"),
            ),
            (2, &format!("the row has `tools`, {advice}")),
            (
                3,
                &format!("message 1 (counting from 0) has `reasoning_content`, {advice}"),
            ),
        ],
    );
    // phi3 has no tool turn (its template would leave it out); chatml renders one.
    assert_reasons(
        &rejections(
            "builtin_tool_turn.jsonl",
            rows,
            &builtin("phi3"),
            DataConfig::default(),
        ),
        &[
            (1, "has `tool_calls`"),
            (2, "the row has `tools`"),
            (3, "has `reasoning_content`"),
            (
                4,
                &format!("message 1 (counting from 0) has role `tool`, {advice}"),
            ),
        ],
    );
    // As an error, the row's file and line lead.
    let path = temp_file("builtin_tools_error.jsonl", rows.as_bytes());
    let err = load(&[&path], &builtin("llama3"), &DataConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("builtin_tools_error.jsonl:1: chat template `llama3`: message 1 (counting from 0) has `tool_calls`"),
        "{err}"
    );
    // Keys that hold nothing (an export filling missing columns with null) change nothing.
    let plain = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let filled = concat!(
        r#"{"messages": [{"role": "user", "content": "q", "tool_calls": null, "name": null}, "#,
        r#"{"role": "assistant", "content": "a", "tool_calls": [], "reasoning_content": null}], "tools": null}"#,
    );
    let enc = builtin("chatml");
    let load_one = |name: &str, row: &str| {
        let path = temp_file(name, format!("{row}\n").as_bytes());
        load(&[&path], &enc, &DataConfig::default())
            .unwrap()
            .examples
    };
    assert_eq!(
        load_one("plain.jsonl", plain),
        load_one("filled.jsonl", filled)
    );
}
