#!/usr/bin/env python3
"""Reference values for burnish's training objectives, written to tests/fixtures/losses/golden.json.

- `sft`: transformers' causal-LM loss (labels with -100 on untrained positions) of a fixed
  two-sequence batch on the llama fixture, in float32: the mean over every trained token of the
  batch.
- `dpo`: TRL 1.16's DPO losses and reward metrics (`DPOTrainer._compute_loss`), evaluated on fixed
  sequence log-probs with the same formulas: sigmoid, hinge, ipo (log-ratios averaged per
  completion token), robust; plus the label-smoothed sigmoid (conservative DPO) that older TRL
  releases computed under `loss_type="sigmoid"`.

Run from the repository root after make_models.py:

    .venv/bin/python scripts/golden/make_losses.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests" / "fixtures" / "losses"


def sft_case() -> dict:
    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cases = json.loads((model_dir / "golden.json").read_text())["score"]
    length = 24
    ids = [cases[0]["token_ids"][:length], cases[1]["token_ids"][:length]]
    # Untrained prompt prefixes of different lengths, and an untrained hole in the second row.
    labels = [list(row) for row in ids]
    for i in range(5):
        labels[0][i] = -100
    for i in list(range(12)) + [18, 19]:
        labels[1][i] = -100
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss
    return {"model": "llama", "input_ids": ids, "labels": labels, "loss": loss.item()}


def dpo_cases() -> dict:
    gen = torch.Generator().manual_seed(3)
    pairs = 6
    policy_chosen = -20 - 10 * torch.rand(pairs, generator=gen)
    policy_rejected = -20 - 10 * torch.rand(pairs, generator=gen)
    reference_chosen = policy_chosen + torch.randn(pairs, generator=gen)
    reference_rejected = policy_rejected + torch.randn(pairs, generator=gen)
    chosen_tokens = torch.randint(3, 30, (pairs,), generator=gen).float()
    rejected_tokens = torch.randint(3, 30, (pairs,), generator=gen).float()
    beta, eps = 0.1, 0.1

    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    ipo_delta = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)
    losses = {
        "sigmoid": (-F.logsigmoid(beta * delta)).mean(),
        "sigmoid_smoothed": (
            -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        ).mean(),
        "hinge": torch.relu(1 - beta * delta).mean(),
        "ipo": ((ipo_delta - 1 / (2 * beta)) ** 2).mean(),
        "robust": (
            (-(1 - eps) * F.logsigmoid(beta * delta) - (-eps * F.logsigmoid(-beta * delta))) / (1 - 2 * eps)
        ).mean(),
    }
    chosen_rewards = beta * chosen_ratio
    rejected_rewards = beta * rejected_ratio
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.mean().item(),
        "logps/rejected": policy_rejected.mean().item(),
    }
    return {
        "beta": beta,
        "label_smoothing": eps,
        "policy_chosen": policy_chosen.tolist(),
        "policy_rejected": policy_rejected.tolist(),
        "reference_chosen": reference_chosen.tolist(),
        "reference_rejected": reference_rejected.tolist(),
        "chosen_tokens": chosen_tokens.tolist(),
        "rejected_tokens": rejected_tokens.tolist(),
        "losses": {k: v.item() for k, v in losses.items()},
        "metrics": metrics,
    }


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    golden = {"sft": sft_case(), "dpo": dpo_cases()}
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("sft loss", golden["sft"]["loss"], "| dpo", golden["dpo"]["losses"])


if __name__ == "__main__":
    main()
