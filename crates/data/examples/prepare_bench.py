"""The Python peer of prepare_bench.rs: transformers' apply_chat_template with
return_assistant_tokens_mask on the same file, template and tokenizer.

    python prepare_bench.py OUT_DIR           # after prepare_bench.rs wrote OUT_DIR

Times a plain loop (one process) and datasets.map with one process per core.
Make the environment with `python3 -m venv .venv && .venv/bin/pip install torch transformers peft trl`,
then `.venv/bin/pip install datasets`.
"""

import json
import os
import sys
import time
from pathlib import Path

from transformers import PreTrainedTokenizerFast

FIXTURE = Path(__file__).resolve().parents[3] / "tests/fixtures/models/llama/tokenizer.json"


def make_tokenizer(template):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(FIXTURE), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def encode(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def main():
    out_dir = Path(sys.argv[1])
    template = (out_dir / "chat_template.jinja").read_text()
    path = out_dir / "conversations.jsonl"
    tok = make_tokenizer(template)

    start, cpu = time.perf_counter(), time.process_time()
    rows = tokens = trained = 0
    with open(path) as f:
        for line in f:
            ids, mask = encode(tok, json.loads(line)["messages"])
            rows += 1
            tokens += len(ids)
            trained += sum(mask)
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"python loop: {rows} rows, {tokens} tokens ({trained} trained) in {secs:.2f} s "
          f"({cpu:.2f} CPU s): {rows / secs:.0f} rows/s, {tokens / secs:.0f} tokens/s")
    if "--loop-only" in sys.argv:
        return

    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    procs = os.cpu_count()

    def batch_encode(batch):
        t = make_tokenizer(template)
        ids, masks = zip(*(encode(t, m) for m in batch["messages"]))
        return {"input_ids": list(ids), "assistant_masks": list(masks)}

    start = time.perf_counter()
    mapped = ds.map(batch_encode, batched=True, batch_size=1000, num_proc=procs, remove_columns=["messages"],
                    load_from_cache_file=False)
    secs = time.perf_counter() - start
    tokens = sum(len(x) for x in mapped["input_ids"])
    print(f"datasets.map (num_proc={procs}): {len(mapped)} rows, {tokens} tokens in {secs:.2f} s: "
          f"{len(mapped) / secs:.0f} rows/s, {tokens / secs:.0f} tokens/s")


if __name__ == "__main__":
    main()
