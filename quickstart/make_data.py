#!/usr/bin/env python3
"""Writes the quickstart's tiny world: a word-level tokenizer and model config (`init/`), a
pre-training corpus of ordered sequences (numbers, the alphabet, days, months) with plain-text
questions and answers about them, chat data that asks the same questions through the chat
template, and preference pairs for DPO (`data/`). As with real base models, the knowledge comes
from pre-training and the chat behaviour from fine-tuning: the held-out chat questions are ones
the base has only seen as plain text.

Everything is drawn from a fixed seed, so running it again rewrites the same bytes. Only the
Python standard library is needed:

    python3 quickstart/make_data.py
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RNG = random.Random(20261126)

SEQUENCES = {
    "counting": ("one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split(),
    "the alphabet": list("abcdefghijklmnopqrstuvwxyz"),
    "the days": "monday tuesday wednesday thursday friday saturday sunday".split(),
    "the months": ("january february march april may june july august september october "
                   "november december").split(),
}
# Days and months go round; numbers and letters end.
CYCLIC = {"the days", "the months"}

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def step(name, i, delta):
    """The index `delta` places from `i` in sequence `name`, or None past an end."""
    n = len(SEQUENCES[name])
    j = i + delta
    if name in CYCLIC:
        return j % n
    return j if 0 <= j < n else None


def window(name, start, length, delta=1):
    """`length` words of `name` from `start`, walking by `delta`, or None past an end."""
    out, i = [], start
    for _ in range(length):
        if i is None:
            return None
        out.append(SEQUENCES[name][i])
        i = step(name, i, delta)
    return out


def neighbours():
    """Every (sequence, word, next word)."""
    for name, words in SEQUENCES.items():
        for i, w in enumerate(words):
            j = step(name, i, 1)
            if j is not None:
                yield name, w, words[j]


# --- pre-training corpus -------------------------------------------------------------------

def corpus(count, by_key):
    docs = []
    pairs = list(neighbours())
    names = list(SEQUENCES)
    keys = sorted(by_key, key=repr)
    while len(docs) < count:
        kind = RNG.random()
        if kind < 0.35:
            question, answer = RNG.choice(by_key[RNG.choice(keys)])
            docs.append(f"question : {question} answer : {answer} .")
            continue
        kind = (kind - 0.35) / 0.65
        name = RNG.choice(names)
        start = RNG.randrange(len(SEQUENCES[name]))
        length = RNG.randint(3, 8)
        if kind < 0.4:
            words = window(name, start, length)
            if words:
                docs.append(f"{name} : {' '.join(words)} .")
        elif kind < 0.65:
            words = window(name, start, length, -1)
            if words:
                docs.append(f"{name} backwards : {' '.join(words)} .")
        else:
            _, a, b = RNG.choice(pairs)
            if RNG.random() < 0.5:
                docs.append(f"after {a} comes {b} .")
            else:
                docs.append(f"before {b} comes {a} .")
    return [{"text": d} for d in docs]


# --- chat questions ------------------------------------------------------------------------

AFTER = ["what comes after {} ?", "what is after {} ?", "which word follows {} ?"]
BEFORE = ["what comes before {} ?", "what is before {} ?", "which word precedes {} ?"]
CONTINUE = ["continue : {}", "what comes next : {} ?"]
COUNT = ["count from {} to {}", "list {} to {}"]


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def questions():
    """Every question of the four kinds, keyed by what it asks about (for a clean split)."""
    by_key = {}
    for name, a, b in neighbours():
        by_key[("after", a)] = [(q.format(a), b) for q in AFTER]
        by_key[("before", b)] = [(q.format(b), a) for q in BEFORE]
    for name, words in SEQUENCES.items():
        for start in range(len(words)):
            six = window(name, start, 6)
            if six:
                by_key[("continue", name, start)] = [
                    (q.format(" ".join(six[:3])), " ".join(six[3:])) for q in CONTINUE
                ]
            for length in range(3, 6):
                span = window(name, start, length)
                if span:
                    by_key[("count", name, start, length)] = [
                        (q.format(span[0], span[-1]), " ".join(span)) for q in COUNT
                    ]
    return by_key


def split(by_key, held_fraction):
    keys = sorted(by_key, key=repr)
    RNG.shuffle(keys)
    held = set(keys[: int(len(keys) * held_fraction)])
    return [k for k in keys if k not in held], [k for k in keys if k in held]


def main():
    (ROOT / "init").mkdir(exist_ok=True)
    (ROOT / "data").mkdir(exist_ok=True)

    words = sorted({w for ws in SEQUENCES.values() for w in ws})
    structure = sorted(set(
        "counting the alphabet days months backwards : . ? after before comes what is which word "
        "follows precedes continue next count from to list question answer user assistant "
        "system".split()
    ) - set(words))
    vocab = {t: i for i, t in enumerate(SPECIAL + structure + words)}
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for t in SPECIAL]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "chat_template": TEMPLATE,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in added},
    }
    eos = vocab["<|im_end|>"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab),
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "initializer_range": 0.02, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": None, "eos_token_id": eos,
        "pad_token_id": vocab["<|endoftext|>"], "dtype": "float32",
    }
    generation = {"eos_token_id": eos, "pad_token_id": vocab["<|endoftext|>"]}
    for name, value in [("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config),
                        ("config.json", config), ("generation_config.json", generation)]:
        (ROOT / "init" / name).write_text(json.dumps(value, indent=2) + "\n")

    def write(name, rows):
        with open(ROOT / "data" / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    by_key = questions()
    write("corpus.jsonl", corpus(12000, by_key))

    train_keys, held_keys = split(by_key, 0.25)
    train = [chat(q, a) for k in train_keys for q, a in by_key[k]]
    RNG.shuffle(train)
    held = []
    for kind in ["after", "before", "continue", "count"]:
        keys = [k for k in held_keys if k[0] == kind][:12]
        held += [chat(*RNG.choice(by_key[k])) for k in keys]
    write("chat.jsonl", train)
    write("chat_held_out.jsonl", held)

    # DPO prefers a whole sentence to the bare answer SFT taught.
    def pair(question, short):
        return {"prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": f"the answer is {short} ."}],
                "rejected": [{"role": "assistant", "content": short}]}

    pairs = [pair(*RNG.choice(by_key[k])) for k in train_keys]
    held_pairs = [pair(*RNG.choice(by_key[k])) for k in held_keys[:24]]
    write("prefs.jsonl", pairs)
    write("prefs_held_out.jsonl", held_pairs)
    print(f"vocab {len(vocab)}; corpus 12000 docs; chat {len(train)} train, {len(held)} held out; "
          f"pairs {len(pairs)} train, {len(held_pairs)} held out")


if __name__ == "__main__":
    main()
