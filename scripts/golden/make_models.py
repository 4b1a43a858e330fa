#!/usr/bin/env python3
"""Build the tiny random test checkpoints under tests/fixtures/models/ and their goldens.

Everything is made locally from fixed seeds; nothing is downloaded. For each model
directory the script writes what `save_pretrained` writes (config.json,
generation_config.json, safetensors weights, tokenizer files) plus `golden.json`,
which holds reference outputs computed by transformers from the *saved* checkpoint,
reloaded in float32 with eager attention (the same upcast the Rust loader does).

Run from the repository root:

    .venv/bin/python scripts/golden/make_models.py

See scripts/golden/README.md for the package versions the committed fixtures came from.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "models"

# Special tokens, in id order: they are registered first, so they get ids 0, 1, 2.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
TOKENIZER_VOCAB_SIZE = 400
MODEL_MAX_LENGTH = 256

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Re-initialisation scales: large enough that the logits are far from uniform.
WEIGHT_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher",
            "our neighbour", "the children", "a farmer", "the red fox", "she", "he", "they"]
VERBS = ["sees", "likes", "finds", "carries", "watches", "follows", "paints", "builds",
         "opens", "reads", "remembers", "wants"]
OBJECTS = ["the box", "a green apple", "the river", "an old book", "the garden", "a letter",
           "the window", "a warm coat", "the mountain", "some bread", "the little boat"]
PLACES = ["in the morning", "near the house", "after dinner", "at the market", "by the sea",
          "under the tree", "every day", "in the rain", "before school", "on the hill"]
QUESTIONS = ["Where is {o}?", "Why does {s} like {o}?", "What did {s} find {p}?",
             "Can {s} see {o}?", "Who opens {o}?"]


def make_corpus(seed: int = 1234, n_sentences: int = 600) -> list[str]:
    """A few hundred English-ish sentences (and some questions) built from word lists."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s, v, o, p = (rng.choice(xs) for xs in (SUBJECTS, VERBS, OBJECTS, PLACES))
        if rng.random() < 0.2:
            line = rng.choice(QUESTIONS).format(s=s, o=o, p=p)
        else:
            line = f"{s} {v} {o} {p}."
            if rng.random() < 0.3:
                line += f" Then {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
        lines.append(line[0].upper() + line[1:])
    return lines


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pieces, no prefix space, no post-processor)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols are in the vocabulary, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"{t} should have id {i}"

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHATML_TEMPLATE,
    )


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

EOT_ID, IM_START_ID, IM_END_ID = 0, 1, 2


def model_specs(vocab_size: int) -> list[dict]:
    """One entry per fixture directory: config, model class, save dtype, extra save args."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        # Like Qwen2 checkpoints: BOS and PAD are <|endoftext|>, EOS is <|im_end|>.
        bos_token_id=EOT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=EOT_ID,
        attn_implementation="eager",
    )
    return [
        dict(
            name="llama",
            seed=1,
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=160,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                # original_max_position_embeddings is tiny so that, with head_dim 16,
                # the llama3 rule leaves some frequencies alone, smoothly interpolates
                # some and divides the rest by `factor`.
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=32,
                ),
            ),
            dtype=torch.float32,
            # A list, so loaders must accept both forms.
            eos_token_id=[IM_END_ID, EOT_ID],
            save_kwargs={},
        ),
        dict(
            name="mistral",
            seed=2,
            cls=MistralForCausalLM,
            config=MistralConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=24,  # not hidden_size / num_heads = 16
                intermediate_size=128,
                sliding_window=8,  # shorter than the golden sequences
                tie_word_embeddings=False,
            ),
            dtype=torch.float16,
            eos_token_id=IM_END_ID,
            # ~260 kB of f16 weights: this gives a few shards plus an index file.
            save_kwargs=dict(max_shard_size="100KB"),
        ),
        dict(
            name="qwen2",
            seed=3,
            cls=Qwen2ForCausalLM,
            config=Qwen2Config(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                tie_word_embeddings=True,
                use_sliding_window=False,
            ),
            dtype=torch.bfloat16,
            eos_token_id=IM_END_ID,
            save_kwargs={},
        ),
        dict(
            name="qwen3",
            seed=5,
            cls=Qwen3ForCausalLM,
            config=Qwen3Config(
                **common,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=24,  # not hidden_size / num_heads = 16, as in Qwen3's own configs
                intermediate_size=128,
                tie_word_embeddings=True,
                rope_theta=1000000.0,
                use_sliding_window=False,
            ),
            dtype=torch.bfloat16,
            eos_token_id=IM_END_ID,
            save_kwargs={},
        ),
        dict(
            name="llama-linear",
            seed=4,
            cls=LlamaForCausalLM,
            config=LlamaConfig(
                **common,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=128,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rope_scaling=dict(rope_type="linear", factor=2.0),
            ),
            dtype=torch.float32,
            eos_token_id=IM_END_ID,
            save_kwargs={},
        ),
    ]


@torch.no_grad()
def reinit_weights(model: torch.nn.Module) -> None:
    """Redraw every weight with scales that make the outputs far from uniform.

    Relies on the global torch seed set just before the model was built. Tied
    weights are shared tensors, so they are simply drawn twice (deterministically).
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, WEIGHT_STD)
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0.0, BIAS_STD)
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.copy_(1.0 + NORM_STD * torch.randn_like(module.weight))


def build_model(spec: dict, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    torch.manual_seed(spec["seed"])
    model = spec["cls"](spec["config"])
    reinit_weights(model)
    model.generation_config = GenerationConfig(
        bos_token_id=EOT_ID,
        eos_token_id=spec["eos_token_id"],
        pad_token_id=EOT_ID,
    )
    model = model.to(spec["dtype"]).eval()
    model.save_pretrained(out, **spec["save_kwargs"])
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------
# Goldens
# ---------------------------------------------------------------------------

SCORE_TEXT_SHORT = "The little boat follows the river under the old tree every morning."
SCORE_TEXT_LONG = (
    "Where is the green apple? My friend remembers a letter near the house,\n"
    "and the teacher reads an old book by the sea. Café crème, naïve fox!"
)
GREEDY_SHORT = "The red fox likes the"
GREEDY_CHAT = [{"role": "user", "content": "Hi!"}]
RANDOM_IDS_SEED = 99
RANDOM_IDS_LEN = 48


def floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]


def score_case(model, ids: list[int], text: str | None) -> dict:
    """Per-token log-probabilities of ids[1:] given their prefixes."""
    logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[:-1]
    picked = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    return dict(text=text, token_ids=ids, logprobs=floats(picked), sum=float(picked.sum()))


def greedy_case(model, prompt_ids: list[int], prompt_text: str) -> dict:
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=32,
        do_sample=False,
    )
    new_ids = out[0, len(prompt_ids):].tolist()

    # Re-run the whole sequence without a KV cache: every generated token must be the
    # argmax there too. The smallest top-1/top-2 logit gap tells the Rust test how much
    # numerical slack it has before a greedy run could legitimately diverge.
    logits = model(out).logits[0, len(prompt_ids) - 1 : -1]
    top2 = logits.topk(2, dim=-1)
    assert top2.indices[:, 0].tolist() == new_ids
    margin = float((top2.values[:, 0] - top2.values[:, 1]).min())
    return dict(prompt_text=prompt_text, prompt_ids=prompt_ids, new_ids=new_ids,
                min_top2_margin=margin)


@torch.no_grad()
def make_golden(model_dir: Path) -> dict:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    # The Rust side reads tokenizer.json with the `tokenizers` crate directly, so make
    # sure the bare library agrees with transformers, and that nothing (no BOS) is added.
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(text)["input_ids"] == raw.encode(text).ids
        assert raw.decode(ids, skip_special_tokens=False) == text
        return ids

    short_ids, long_ids = encode(SCORE_TEXT_SHORT), encode(SCORE_TEXT_LONG)
    assert 20 <= len(short_ids) <= 30, len(short_ids)
    assert len(long_ids) >= 40, len(long_ids)
    gen = torch.Generator().manual_seed(RANDOM_IDS_SEED)
    random_ids = torch.randint(0, len(tokenizer), (RANDOM_IDS_LEN,), generator=gen).tolist()

    chat_text = tokenizer.apply_chat_template(GREEDY_CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = encode(chat_text)
    assert 15 <= len(chat_ids) <= 25, len(chat_ids)

    score = [
        score_case(model, short_ids, SCORE_TEXT_SHORT),
        score_case(model, long_ids, SCORE_TEXT_LONG),
        score_case(model, random_ids, None),
    ]
    greedy = [
        greedy_case(model, encode(GREEDY_SHORT), GREEDY_SHORT),
        greedy_case(model, chat_ids, chat_text),
    ]
    logits_last = model(torch.tensor([long_ids])).logits[0, -1].float()
    return dict(score=score, greedy=greedy, logits_last=floats(logits_last))


def main() -> None:
    torch.set_num_threads(1)  # keep float reductions in one fixed order
    transformers.utils.logging.disable_progress_bar()
    tokenizer = train_tokenizer()
    for spec in model_specs(len(tokenizer)):
        out = OUT_DIR / spec["name"]
        if out.exists():
            shutil.rmtree(out)
        build_model(spec, tokenizer, out)
        golden = make_golden(out)
        (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{spec['name']:>13}: {size / 1024:7.1f} KiB  "
              + ", ".join(sorted(f.name for f in out.iterdir())))


if __name__ == "__main__":
    main()
