#!/usr/bin/env python3
"""What llama.cpp's own converter writes for the fixture models, for `burnish export` to equal,
and how llama.cpp runs burnish's exports: tests/fixtures/gguf/<model>.json.

    make_gguf.py LLAMA_CPP_DIR BURNISH_BIN

LLAMA_CPP_DIR is a llama.cpp source tree (its `convert_hf_to_gguf.py` and `gguf-py`; the one
vendored in llama-cpp-python's sdist will do). For each of the llama, mistral, qwen2 and qwen3
fixtures and each of f32, f16, bf16 and q8_0, the converter writes a GGUF file; its metadata (but the
names it makes up: `general.name`, `general.size_label`) and its tensors (name, type, dimensions,
SHA-256 of the data) go into the JSON. The fixtures' tokenizer is unknown to llama.cpp's table of
pre-tokenizers, so the converter is told its split, GPT-2's, which is what the fixtures use; the
JSON records the hash llama.cpp computes for it (`pre_tokenizer_hash`), which burnish must
compute too.

Then BURNISH_BIN exports the same models (`--pre-tokenizer gpt-2`) and llama.cpp (the
`llama_cpp` package, with an f32 KV cache) scores each `score` case of the model's golden.json;
the largest distance to transformers' log-probabilities goes into the JSON as
`llama_cpp_on_burnish` (for mistral, over its sliding window only: llama.cpp's llama
architecture attends to every earlier token).

`llama-bos` is the llama fixture with a tokenizer that adds its BOS token to every input (a
post-processor as Llama 3's), whose config names the chat template and the prefix-space rule:
its two tokenizer files are written to tests/fixtures/gguf/llama-bos/, and the converter's f32
file of the model with them is summarised in llama-bos.json. `llama-spm` is the llama fixture
with a SentencePiece vocabulary (as Llama 2's, TinyLlama's and Mistral 7B's: BPE with byte
fallback, trained here on a synthetic corpus; `tokenizer.model` and transformers' files of it),
likewise. For every model, llama.cpp's tokenization of a text with burnish's export (the
vocabulary alone) must equal transformers'.

Needs `pip install llama-cpp-python gguf sentencepiece` besides transformers and torch.
"""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests" / "fixtures" / "models"
OUT = REPO / "tests" / "fixtures" / "gguf"
TYPES = ["f32", "f16", "bf16", "q8_0"]
# Log-prob distance allowed between llama.cpp on burnish's export and transformers.
BOUNDS = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1, "q8_0": 2e-1}
LEFT_OUT = {"general.name", "general.size_label"}


def plain(value):
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def summary(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata = {
        key: plain(field.contents())
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and key not in LEFT_OUT
    }
    tensors = {
        t.name: {
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "sha256": hashlib.sha256(t.data.tobytes()).hexdigest(),
        }
        for t in reader.tensors
    }
    return {"metadata": metadata, "tensors": tensors}


def convert(llama_cpp: Path, model_dir: Path, out_type: str, out: Path) -> None:
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import conversion.base as base
    import convert_hf_to_gguf

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", out_type]
    convert_hf_to_gguf.main()


def bos_variant(llama_cpp: Path) -> None:
    """The llama fixture with a tokenizer that adds `<|im_start|>` as its BOS token."""
    import shutil

    files = OUT / "llama-bos"
    files.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((MODELS / "llama" / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (files / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n")
    config = json.loads((MODELS / "llama" / "tokenizer_config.json").read_text())
    config.update(
        {
            "bos_token": "<|im_start|>",
            "add_eos_token": False,
            "add_prefix_space": False,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        }
    )
    (files / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-bos"
        shutil.copytree(MODELS / "llama", model_dir)
        (model_dir / "chat_template.jinja").unlink()
        for name in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(files / name, model_dir / name)
        out = Path(tmp) / "theirs.gguf"
        convert(llama_cpp, model_dir, "f32", out)
        record = summary(out)
    (OUT / "llama-bos.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print("llama-bos", {k: v for k, v in record["metadata"].items() if "add_" in k})


def pre_tokenizer_hash(llama_cpp: Path, model: str) -> str:
    from transformers import AutoTokenizer

    source = (llama_cpp / "conversion" / "base.py").read_text()
    start = source.index("chktxt = ")
    check_text = eval(source[start + len("chktxt = ") : source.index("\n", start)])
    ids = AutoTokenizer.from_pretrained(MODELS / model).encode(check_text)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def llama_cpp_distance(path: Path, model: str) -> float:
    from llama_cpp import Llama

    golden = json.loads((MODELS / model / "golden.json").read_text())
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, n_threads=2, type_k=0, type_v=0)
    window = json.loads((MODELS / model / "config.json").read_text()).get("sliding_window") or 10**9
    worst = 0.0
    for case in golden["score"]:
        ids = case["token_ids"]
        llm.reset()
        llm.eval(ids)
        x = np.array(llm.scores[: len(ids)], dtype=np.float64)
        top = x.max(1, keepdims=True)
        logprobs = x - top - np.log(np.exp(x - top).sum(1, keepdims=True))
        n = min(len(ids), window) - 1
        worst = max(worst, max(abs(logprobs[i, ids[i + 1]] - case["logprobs"][i]) for i in range(n)))
    return worst


def spm_variant(llama_cpp: Path, burnish: Path) -> None:
    """The llama fixture with a SentencePiece vocabulary of its own."""
    import io
    import random
    import shutil

    import sentencepiece
    from transformers import AutoTokenizer

    files = OUT / "llama-spm"
    files.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "red blue green cat dog bird sun moon tree fish one two three hello world the a is big small".split()
    lines = [" ".join(rng.choice(words) for _ in range(8)) + rng.choice(".?!") for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=390, model_type="bpe", byte_fallback=True,
        hard_vocab_limit=False, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1,
        minloglevel=2, normalization_rule_name="identity",
    )
    (files / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        source.mkdir()
        shutil.copy(files / "tokenizer.model", source)
        (source / "tokenizer_config.json").write_text(json.dumps(config))
        AutoTokenizer.from_pretrained(source).save_pretrained(files)
        model_dir = Path(tmp) / "llama-spm"
        shutil.copytree(MODELS / "llama", model_dir)
        for name in ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(files / name, model_dir / name)
        out = Path(tmp) / "theirs.gguf"
        convert(llama_cpp, model_dir, "f32", out)
        record = summary(out)
        ours = Path(tmp) / "ours.gguf"
        subprocess.run([burnish, "export", "--model", model_dir, "--type", "f32", "--out", ours], check=True)
        tokenization_check(ours, model_dir, "the big cat is hello world. two moons!")
    (OUT / "llama-spm.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print("llama-spm", record["metadata"]["tokenizer.ggml.model"])


def tokenization_check(path: Path, model_dir: Path, text: str) -> None:
    """llama.cpp's ids of `text` with the vocabulary in `path` equal transformers' of the
    tokenizer in `model_dir`."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(model_dir).encode(text)
    ours = Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(text.encode(), add_bos=True)
    assert ours == theirs, (model_dir.name, ours, theirs)


def main() -> None:
    llama_cpp, burnish = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    for model in ["llama", "mistral", "qwen2", "qwen3"]:
        record = {"pre_tokenizer_hash": pre_tokenizer_hash(llama_cpp, model), "types": {}, "llama_cpp_on_burnish": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for out_type in TYPES:
                theirs, ours = Path(tmp) / f"theirs-{out_type}.gguf", Path(tmp) / f"ours-{out_type}.gguf"
                convert(llama_cpp, MODELS / model, out_type, theirs)
                record["types"][out_type] = summary(theirs)
                subprocess.run(
                    [burnish, "export", "--model", MODELS / model, "--pre-tokenizer", "gpt-2", "--type", out_type, "--out", ours],
                    check=True,
                )
                distance = llama_cpp_distance(ours, model)
                golden = json.loads((MODELS / model / "golden.json").read_text())
                tokenization_check(ours, MODELS / model, golden["score"][1]["text"])
                assert distance <= BOUNDS[out_type], (model, out_type, distance)
                record["llama_cpp_on_burnish"][out_type] = distance
        (OUT / f"{model}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(model, record["llama_cpp_on_burnish"])
    bos_variant(llama_cpp)
    spm_variant(llama_cpp, burnish)


if __name__ == "__main__":
    main()
