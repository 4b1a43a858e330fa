#!/usr/bin/env python3
"""Load adapters that burnish wrote into PEFT and check PEFT scores them as burnish does.

burnish's test `adapters::our_writer_reproduces_peft_files` re-saves every PEFT fixture adapter
with burnish's writer; with BURNISH_EXPORT_ADAPTERS=DIR set it also leaves them in DIR/<name>.
This script loads each with `PeftModel.from_pretrained` and compares PEFT's per-token log-probs
with the references in tests/fixtures/adapters/<name>/golden.json (tolerance 1e-4); a reward
model's adapter (`llama-reward`, left by `adapters::reward_adapters_reproduce_peft...`) is loaded
onto the base as a one-label sequence classifier and its rewards compared instead:

    BURNISH_EXPORT_ADAPTERS=/tmp/ours cargo test --test burnish adapters::
    .venv/bin/python scripts/golden/check_adapter_in_peft.py /tmp/ours
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def main(exported: Path) -> int:
    failures = 0
    for adapter in sorted(p for p in exported.iterdir() if p.is_dir()):
        golden = json.loads((REPO_ROOT / "tests/fixtures/adapters" / adapter.name / "golden.json").read_text())
        base_dir = REPO_ROOT / "tests/fixtures/models" / golden["base_model"]
        if "rewards" in golden:
            base = AutoModelForSequenceClassification.from_pretrained(
                base_dir, num_labels=1, dtype=torch.float32, attn_implementation="eager"
            )
            model = PeftModel.from_pretrained(base, adapter).eval()
            worst = 0.0
            for case in golden["rewards"]:
                with torch.no_grad():
                    reward = model(torch.tensor([case["token_ids"]])).logits[0, 0].item()
                worst = max(worst, abs(reward - case["reward"]))
            status = "ok" if worst <= TOLERANCE else "FAILED"
            failures += status != "ok"
            print(f"{adapter.name}: PEFT loads burnish's reward adapter, max |Δ reward| = {worst:.2e} {status}")
            continue
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, adapter).eval()
        worst = 0.0
        for case in golden["score"]:
            ids = case["token_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
            ours = [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
            worst = max(worst, max(abs(a - b) for a, b in zip(ours, case["logprobs"])))
        status = "ok" if worst <= TOLERANCE else "FAILED"
        failures += status != "ok"
        print(f"{adapter.name}: PEFT loads burnish's adapter, max |Δ logprob| = {worst:.2e} {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
