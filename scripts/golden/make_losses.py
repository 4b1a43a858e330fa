#!/usr/bin/env python3
"""Reference values for burnish's training objectives, written to tests/fixtures/losses/golden.json.

- `sft`: transformers' causal-LM loss (labels with -100 on untrained positions) of a fixed
  two-sequence batch on the llama fixture, in float32: the mean over every trained token of the
  batch.
- `accuracy`: TRL's `mean_token_accuracy` (the fraction of trained targets that are the first
  most likely token of their position, as its fused head's `is_top1` decides) and `entropy` (the
  mean entropy of the trained positions' next-token distributions, from its fused head) of two
  rows on the llama fixture, one of them continued greedily by the model, so that the fraction is
  neither 0 nor 1.
- `reward`: TRL 1.16's reward-model loss and metrics (`RewardTrainer.compute_loss` on a stub
  trainer, through TRL's own preference collator) for preference pairs of whole sequences on the
  llama fixture as a one-label sequence classifier with the llama-reward adapter (LoRA plus its
  `score` head): each sequence's reward is read at its last token that is not the pad token, as
  transformers reads it, so one sequence holds the pad token within it and one ends with it;
  plain, with `center_rewards_coefficient`, and with per-pair margins (TRL's `margin` column)
  besides it; and `reward["tokenized"]`, the token ids TRL's `RewardTrainer._prepare_dataset`
  makes of each row of tests/fixtures/data/rows/preference.jsonl with the llama fixture's
  tokenizer (whole conversations through the chat template, text rows with EOS appended).
- `grpo`: TRL 1.16's GRPO loss and metrics (`GRPOTrainer._compute_loss` on a stub trainer, its
  own per-token log-probs through the fused head at the sampling temperature) for two prompts of
  two completions each on the llama fixture with the llama-qv adapter as the policy (the adapter
  off as the reference for the KL term): the `dapo`, `grpo` and `dr_grpo` losses, with and
  without `beta`, on the update that drew the completions and (`*_reused`) on a later one given
  their old log-probabilities, with TRL's clipping metrics; and the advantages of fixed rewards by the lines of
  `GRPOTrainer._generate_and_score_completions` (group mean, TRL's `nanstd`, `+ 1e-4`) for each
  `scale_rewards`; and `grpo["functions"]`, TRL's `think_format_reward` and
  `get_soft_overlong_punishment` on fixed completions.
- `schedules`: learning rates of transformers' `get_scheduler` (constant with warmup, linear,
  cosine) at every step of a 10-step run with 3 warmup steps.
- `adamw_steps.*`: three LoRA SFT steps with PEFT + torch AdamW and global-norm clipping from the
  llama-qv adapter on the `sft` batch: the adapter after the third step, losses and gradient norms.
- `adamw_groups.*`: the same three steps from the llama-dora adapter with the parameter groups
  the trainers make: transformers' `Trainer` (weight decay on every parameter but biases and
  norms, so on DoRA's magnitudes too) and PEFT's `create_loraplus_optimizer` (LoRA+: the B
  factors and the magnitudes at `loraplus_lr_ratio` times the learning rate); the adapter after
  the third step of each (keys prefixed `trainer/` and `loraplus/`), losses and gradient norms.
- `orpo`: TRL 1.16's ORPO loss and metrics (`experimental.orpo.ORPOTrainer.get_batch_loss_metrics`,
  the trainer's own code run on a stub trainer) for two preference pairs of different prompt and
  completion lengths, padded, on the llama fixture in float32; and TRL's `log1mexp` at points on
  both sides of its branch.
- `cpo`: TRL 1.16's CPO losses and metrics (`experimental.cpo.CPOTrainer.get_batch_loss_metrics`
  on a stub trainer, the same pairs and model as `orpo`) for every loss type (sigmoid with label
  smoothing, hinge, ipo, simpo), for SimPO proper (`cpo_alpha = 0`) and for AlphaPO's rewards
  (`alpha`).
- `kto`: TRL 1.16's KTO loss and metrics (`KTOTrainer._compute_loss` on a stub trainer, through
  TRL's own unpaired-preference collator and fused LM head) for labeled completions on the llama
  fixture with the llama-qv adapter as the policy and the adapter switched off as the reference:
  the `kto` loss with its KL term (completions rotated by one row within the batch, some of those
  rows cut at `max_length`), with desirable/undesirable weights, and `apo_zero_unpaired`; with
  its metrics, entropy and the mean logits of each side included.
- `dpo_model`: TRL 1.16's DPO loss and metrics (`DPOTrainer._compute_loss` on a stub trainer,
  through TRL's own preference collator and fused LM head) for three pairs on the llama fixture
  with the llama-qv adapter as the policy and the adapter switched off as the reference: every
  loss type, weighted combinations (RPO, MPO) and the f-divergences; `dpo_model["weighted"]`,
  LD-DPO's weighted log-probs (`ld_alpha`, with and without the unweighted SFT term) and WPO's
  weighted pairs (`use_weighting`), through the model; and `dpo_model["stub"]`,
  the same method on six pairs of fixed per-token log-probs (stub policy and reference models
  return them), whose margins the policy and the reference order differently, as the sorting
  losses (`aot`, `aot_unpaired`) need to be told apart from unsorted ones.
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


def stub_trainer(cls, **attributes):
    """A `cls` trainer built without __init__ (no dataset, no training arguments), holding only
    what the trainer methods these goldens call read: `attributes`, empty metrics, and an
    accelerator of one CPU process whose gathers and reductions return their input."""
    from collections import defaultdict
    from contextlib import nullcontext
    from types import SimpleNamespace

    trainer = cls.__new__(cls)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        is_main_process=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
        unwrap_model=lambda m: m,
        autocast=nullcontext,
    )
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


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


def accuracy_case() -> dict:
    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cases = json.loads((model_dir / "golden.json").read_text())["score"]
    length = 24
    greedy = list(cases[1]["token_ids"][:8])
    with torch.no_grad():
        while len(greedy) < length:
            greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
    ids = [cases[0]["token_ids"][:length], greedy]
    # The first five tokens of each row untrained.
    labels = [[-100] * 5 + row[5:] for row in ids]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits
    shifted = torch.tensor(labels)[:, 1:]
    trained = shifted != -100
    top1 = logits[:, :-1].argmax(-1) == shifted
    accuracy = ((top1 & trained).sum() / trained.sum()).item()
    # TRL's own fused head gives the same accuracy and the mean entropy SFTTrainer logs.
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    with torch.no_grad():
        fused = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels), fused_lm_head=True)
    valid = fused.label_mask.sum()
    assert abs((fused.is_top1.sum() / valid).item() - accuracy) < 1e-9
    entropy = (fused.entropy.sum() / valid).item()
    return {"model": "llama", "input_ids": ids, "labels": labels, "accuracy": accuracy, "entropy": entropy}


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
    # TRL 1.16's "sft" loss type (the RPO term when combined with "sigmoid" through
    # loss_weights): mean negative log-likelihood over every chosen completion token of the batch.
    sft_term = -(policy_chosen.sum() / chosen_tokens.sum())
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
        "sft_term": sft_term.item(),
        "metrics": metrics,
    }


def padded_pairs(pairs: list, pad: int) -> dict:
    """The batch TRL's preference collators make: each side's prompt + completion padded to the
    side's longest row, labels -100 on the prompt and the padding."""

    def side(name: str) -> dict:
        rows = [p["prompt"] + p[name] for p in pairs]
        width = max(len(r) for r in rows)
        input_ids = [r + [pad] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        labels = [[-100] * len(p["prompt"]) + p[name] + [-100] * (width - len(p["prompt"]) - len(p[name])) for p in pairs]
        return {
            f"{name}_input_ids": torch.tensor(input_ids),
            f"{name}_attention_mask": torch.tensor(mask),
            f"{name}_labels": torch.tensor(labels),
        }

    return {**side("chosen"), **side("rejected")}


def cpo_cases(orpo: dict) -> dict:
    """CPO and SimPO through TRL's own CPOTrainer methods on ORPO's pairs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    settings = [
        {"name": "sigmoid", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.1, "cpo_alpha": 1.0},
        {"name": "hinge", "loss_type": "hinge", "beta": 0.3, "label_smoothing": 0.0, "cpo_alpha": 0.5},
        {"name": "ipo", "loss_type": "ipo", "beta": 0.2, "label_smoothing": 0.0, "cpo_alpha": 1.0},
        {"name": "simpo", "loss_type": "simpo", "beta": 2.0, "label_smoothing": 0.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5},
        {"name": "cpo_simpo", "loss_type": "simpo", "beta": 2.0, "label_smoothing": 0.1, "cpo_alpha": 0.3, "simpo_gamma": 1.2},
        # AlphaPO (TRL's `loss_type="alphapo"`: simpo with cpo_alpha 0), and its rewards under the sigmoid loss.
        {"name": "alphapo", "loss_type": "simpo", "beta": 2.0, "label_smoothing": 0.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5, "alpha": 0.25},
        {"name": "sigmoid_alpha", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "cpo_alpha": 1.0, "alpha": -0.05},
    ]
    cases = []
    for setting in settings:
        trainer = stub_trainer(
            CPOTrainer,
            **{key: setting[key] for key in ["loss_type", "beta", "label_smoothing", "cpo_alpha"]},
            simpo_gamma=setting.get("simpo_gamma", 0.5),
            alpha=setting.get("alpha", 0.0),
            is_encoder_decoder=False,
            pad_token_id=0,
            aux_loss_enabled=False,
        )
        with torch.no_grad():
            loss, metrics = trainer.get_batch_loss_metrics(model, padded_pairs(orpo["pairs"], 0))
        metrics = {k: float(v) for k, v in metrics.items() if not k.startswith("logits/")}
        cases.append(
            {**setting, "simpo_gamma": trainer.simpo_gamma, "alpha": trainer.alpha, "loss": loss.item(), "metrics": metrics}
        )
    return {"pairs": orpo["pairs"], "cases": cases}


def orpo_case() -> dict:
    """ORPO on the llama fixture through TRL's own ORPOTrainer methods. The trainer is built
    without __init__ (no dataset, no training arguments): only the attributes those methods read
    are set."""

    from trl.experimental.orpo.orpo_trainer import ORPOTrainer, log1mexp

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = json.loads((model_dir / "golden.json").read_text())["score"][1]["token_ids"]
    pad = 0
    pairs = [
        {"prompt": ids[0:7], "chosen": ids[7:12], "rejected": ids[20:29]},
        {"prompt": ids[30:34], "chosen": ids[40:51], "rejected": ids[51:54]},
    ]
    beta = 0.25

    trainer = stub_trainer(ORPOTrainer, beta=beta, is_encoder_decoder=False, padding_value=pad, aux_loss_enabled=False)
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(model, padded_pairs(pairs, pad))
    points = [-20.0, -3.0, -0.7, -0.6931, -0.5, -0.1, -1e-3, -1e-6]
    return {
        "model": "llama",
        "beta": beta,
        "pairs": pairs,
        "loss": loss.item(),
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("logits/")},
        "log1mexp": {"x": points, "y": log1mexp(torch.tensor(points, dtype=torch.float64)).tolist()},
    }


# Through the model, TRL's DPO also reports the policy's entropy over the completions, its token
# accuracy on the chosen ones and each side's mean logit.
THROUGH_MODEL_DPO_METRICS = ("rewards/", "logps/", "entropy", "mean_token_accuracy", "logits/")


def dpo_model_cases() -> dict:
    """DPO and its variants through TRL's own DPOTrainer._compute_loss (see trl_dpo_loss)."""
    from peft import PeftModel
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    model = PeftModel.from_pretrained(base, REPO_ROOT / "tests" / "fixtures" / "adapters" / "llama-qv").eval()
    ids = json.loads((model_dir / "golden.json").read_text())["score"][1]["token_ids"]
    pairs = [
        {"prompt": ids[0:7], "chosen": ids[7:12], "rejected": ids[20:29]},
        {"prompt": ids[30:34], "chosen": ids[40:51], "rejected": ids[51:54]},
        {"prompt": ids[12:15], "chosen": ids[2:6], "rejected": ids[60:68]},
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in pairs]
    )
    single = [
        ("sigmoid", 0.1, 0.0),
        ("hinge", 0.3, 0.0),
        ("ipo", 0.2, 0.0),
        ("robust", 0.1, 0.2),
        ("exo_pair", 0.1, 1e-3),
        ("nca_pair", 0.5, 0.0),
        ("bco_pair", 0.5, 0.0),
        ("sppo_hard", 0.5, 0.0),
        ("aot", 0.5, 0.1),
        ("aot_unpaired", 0.5, 0.1),
        ("apo_zero", 0.5, 0.0),
        ("apo_down", 0.5, 0.0),
        ("discopop", 0.5, 0.0),
        ("sigmoid_norm", 2.0, 0.0),
        ("sft", 0.1, 0.0),
    ]
    settings = [
        {"name": name, "loss_type": [name], "loss_weights": [1.0], "beta": beta, "label_smoothing": e}
        for name, beta, e in single
    ]
    settings += [
        {"name": "rpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1, "label_smoothing": 0.0},
        {"name": "mpo", "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.1, "label_smoothing": 0.0},
        {"name": "forward_kl", "loss_type": ["sigmoid"], "loss_weights": [1.0], "beta": 0.5, "label_smoothing": 0.0, "f_divergence_type": "forward_kl"},
        {"name": "js_ipo", "loss_type": ["ipo"], "loss_weights": [1.0], "beta": 0.5, "label_smoothing": 0.0, "f_divergence_type": "js_divergence"},
        {"name": "alpha_hinge", "loss_type": ["hinge"], "loss_weights": [1.0], "beta": 0.5, "label_smoothing": 0.0, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ]
    # Weighted log-probs (LD-DPO) and weighted pairs (WPO): through the model only.
    weighted = [
        {"name": "ld_dpo", "loss_type": ["sigmoid"], "loss_weights": [1.0], "beta": 0.5, "label_smoothing": 0.0, "ld_alpha": 0.5},
        {"name": "ld_rpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.5, "label_smoothing": 0.0, "ld_alpha": 0.2},
        {"name": "wpo", "loss_type": ["sigmoid"], "loss_weights": [1.0], "beta": 0.5, "label_smoothing": 0.0, "use_weighting": True},
        {"name": "wpo_ld_ipo", "loss_type": ["ipo", "hinge"], "loss_weights": [1.0, 0.3], "beta": 0.2, "label_smoothing": 0.0, "use_weighting": True, "ld_alpha": 0.0},
    ]

    def run(settings: list) -> list:
        cases = []
        for setting in settings:
            setting = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, **setting}
            with torch.no_grad():
                loss, metrics = trl_dpo_loss(setting, model, None, batch, kept=THROUGH_MODEL_DPO_METRICS)
            cases.append({**setting, "loss": loss, "metrics": metrics})
        return cases

    return {
        "model": "llama",
        "adapter": "llama-qv",
        "pairs": pairs,
        "cases": run(settings),
        "weighted": run(weighted),
        "stub": dpo_stub_cases(settings),
    }


def trl_dpo_loss(setting: dict, model, ref_model, batch: dict, kept=("rewards/", "logps/")) -> tuple[float, dict]:
    """TRL's DPOTrainer._compute_loss of `batch` on a trainer built without __init__ (only the
    attributes that method reads are set): the loss and the metrics whose names start with one of
    `kept`."""
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = stub_trainer(
        DPOTrainer,
        model=model,
        ref_model=ref_model,
        beta=setting["beta"],
        loss_types=setting["loss_type"],
        loss_weights=setting["loss_weights"],
        label_smoothing=setting["label_smoothing"],
        f_divergence_type=setting["f_divergence_type"],
        f_alpha_divergence_coef=setting["f_alpha_divergence_coef"],
        ld_alpha=setting.get("ld_alpha"),
        use_weighting=setting.get("use_weighting", False),
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=setting["discopop_tau"]),
    )
    loss = trainer._compute_loss(model, batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if k.startswith(kept)}
    return loss.item(), metrics


def dpo_stub_cases(settings: list) -> dict:
    """DPOTrainer._compute_loss with stub models that return fixed per-token log-probs: six
    pairs, completions of 2 to 7 tokens after a one-token prompt, padded to 8."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(11)
    pairs, width = 6, 8
    lengths = torch.randint(2, 8, (2 * pairs,), generator=gen)
    completion_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion_mask[row, 1 : 1 + n] = 1
    shifted = completion_mask[:, 1:].float()
    policy = -3 * torch.rand(2 * pairs, width - 1, generator=gen) * shifted
    reference = (policy + 0.8 * torch.randn(2 * pairs, width - 1, generator=gen)).clamp(max=0) * shifted

    class Stub(torch.nn.Module):
        """A model whose fused LM head returns `per_token` whatever the input."""

        is_gradient_checkpointing = False

        def __init__(self, per_token):
            super().__init__()
            self.per_token = per_token

        def forward(self, **_kwargs):
            zeros = torch.zeros_like(self.per_token)
            return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    batch = {
        "input_ids": torch.zeros(2 * pairs, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, width, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    cases = []
    for setting in settings:
        setting = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, **setting}
        loss, metrics = trl_dpo_loss(setting, Stub(policy).eval(), Stub(reference), batch)
        cases.append({"name": setting["name"], "loss": loss, "metrics": metrics})
    tokens = completion_mask.sum(dim=1).float()
    return {
        "policy": policy.sum(dim=1).tolist(),
        "reference": reference.sum(dim=1).tolist(),
        "tokens": tokens.tolist(),
        "cases": cases,
    }


def kto_cases() -> dict:
    """KTO through TRL's own KTOTrainer._compute_loss. The trainer is built without __init__:
    only the attributes that method reads are set. Each batch is TRL's collator output for rows
    whose KL completion is the previous row's (the first row takes the last's)."""
    from types import SimpleNamespace

    from peft import PeftModel
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits"))
    model = PeftModel.from_pretrained(base, REPO_ROOT / "tests" / "fixtures" / "adapters" / "llama-qv").eval()
    ids = json.loads((model_dir / "golden.json").read_text())["score"][1]["token_ids"]
    rows = [
        {"prompt": ids[0:7], "completion": ids[7:12], "label": True},
        {"prompt": ids[30:34], "completion": ids[40:51], "label": False},
        {"prompt": ids[12:15], "completion": ids[20:29], "label": True},
        {"prompt": ids[2:11], "completion": ids[51:54], "label": False},
    ]
    settings = [
        {"name": "kto", "loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "max_length": None, "rows": [0, 1, 2, 3]},
        {"name": "weighted", "loss_type": "kto", "beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7, "max_length": 16, "rows": [1, 2, 3]},
        {"name": "apo_zero_unpaired", "loss_type": "apo_zero_unpaired", "beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 0.5, "max_length": None, "rows": [0, 1, 2]},
    ]
    cases = []
    for setting in settings:
        picked = [rows[i] for i in setting["rows"]]
        calculate_kl = setting["loss_type"] == "kto"
        examples = []
        for i, row in enumerate(picked):
            example = {"prompt_ids": row["prompt"], "completion_ids": row["completion"], "label": row["label"]}
            if calculate_kl:
                example["KL_completion_ids"] = picked[i - 1]["completion"]
            examples.append(example)
        batch = DataCollatorForUnpairedPreference(pad_token_id=0, max_length=setting["max_length"])(examples)

        trainer = stub_trainer(
            KTOTrainer,
            model=model,
            ref_model=None,
            loss_type=setting["loss_type"],
            beta=setting["beta"],
            desirable_weight=setting["desirable_weight"],
            undesirable_weight=setting["undesirable_weight"],
            calculate_KL=calculate_kl,
            precompute_ref_logps=False,
            aux_loss_enabled=False,
            args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        )
        with torch.no_grad():
            loss = trainer._compute_loss(model, batch, return_outputs=False)
        kept = ("kl", "rewards/", "logps/", "entropy", "logits/")
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if k.startswith(kept)}
        cases.append({**setting, "rows": picked, "loss": loss.item(), "metrics": metrics})
    return {"model": "llama", "adapter": "llama-qv", "cases": cases}


def reward_cases() -> dict:
    """Reward modelling through TRL's own RewardTrainer.compute_loss on a stub trainer (only the
    attributes that method reads are set), on TRL's collator output."""
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, REPO_ROOT / "tests" / "fixtures" / "adapters" / "llama-reward").eval()
    pad = model.config.pad_token_id
    ids = json.loads((model_dir / "golden.json").read_text())["score"][1]["token_ids"]
    pairs = [
        {"chosen_ids": ids[0:7] + ids[40:48], "rejected_ids": ids[0:12]},
        {"chosen_ids": ids[12:20] + [pad], "rejected_ids": ids[12:16] + ids[55:58]},
        {"chosen_ids": ids[30:34] + [pad] + ids[50:55], "rejected_ids": ids[30:34] + ids[20:29]},
    ]
    settings = [
        {"name": "plain", "center_rewards_coefficient": None, "margins": None},
        {"name": "centered", "center_rewards_coefficient": 0.01, "margins": None},
        {"name": "margin_centered", "center_rewards_coefficient": 0.01, "margins": [0.5, 0.0, -1.0]},
    ]
    cases = []
    for setting in settings:
        examples = [dict(p) for p in pairs]
        if setting["margins"] is not None:
            for example, margin in zip(examples, setting["margins"]):
                example["margin"] = margin
        batch = DataCollatorForPreference(pad_token_id=pad)(examples)
        trainer = stub_trainer(
            RewardTrainer,
            model=model,
            args=SimpleNamespace(center_rewards_coefficient=setting["center_rewards_coefficient"]),
        )
        with torch.no_grad():
            loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if k != "num_tokens"}
        rewards = outputs.logits.squeeze(-1).tolist()
        cases.append({**setting, "loss": loss.item(), "rewards": rewards, "metrics": metrics})
    return {
        "model": "llama",
        "adapter": "llama-reward",
        "pad_token_id": pad,
        "pairs": pairs,
        "cases": cases,
        "tokenized": reward_tokenization(model_dir),
    }


def reward_tokenization(model_dir: Path) -> list:
    """TRL's own preprocessing of preference rows for a reward model, one row at a time (the
    rows' shapes differ, which one Arrow table cannot hold)."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.reward_trainer import RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = REPO_ROOT / "tests" / "fixtures" / "data" / "rows" / "preference.jsonl"
    trainer = RewardTrainer.__new__(RewardTrainer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None)
    out = []
    for line in path.read_text().splitlines():
        row = RewardTrainer._prepare_dataset(trainer, Dataset.from_list([json.loads(line)]), tokenizer, args, "train")[0]
        out.append({"chosen_ids": row["chosen_ids"], "rejected_ids": row["rejected_ids"]})
    return out


def grpo_cases() -> dict:
    """GRPO's loss through TRL's own GRPOTrainer._compute_loss on a stub trainer (only the
    attributes that method reads are set): on the update that drew the completions (old
    log-probs = current), and, for the `*_reused` cases, on a later update that reuses them
    (`num_iterations` > 1: old log-probs given, the current ones moved by fixed offsets so that
    ratios fall on both sides of the clipping range)."""
    from types import SimpleNamespace

    from peft import PeftModel
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head, nanstd

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    ids = json.loads((model_dir / "golden.json").read_text())["score"][1]["token_ids"]
    prompts = [ids[0:6], ids[10:16]]
    # Two completions per prompt, right-padded with 0; two end with EOS (id 2).
    completions = [ids[20:23] + [2], ids[30:35], ids[40:42], ids[50:56] + [2]]
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    prompt_ids = torch.tensor([prompts[0], prompts[0], prompts[1], prompts[1]])
    prompt_mask = torch.ones_like(prompt_ids)
    advantages = torch.tensor([0.8, -0.8, 1.3, -0.2])
    settings = [
        {"name": "dapo", "loss_type": "dapo", "beta": 0.0, "temperature": 1.0, "max_completion_length": 8},
        {"name": "grpo_kl", "loss_type": "grpo", "beta": 0.04, "temperature": 0.7, "max_completion_length": 8},
        {"name": "dr_grpo", "loss_type": "dr_grpo", "beta": 0.0, "temperature": 1.0, "max_completion_length": 8},
        {"name": "dapo_kl", "loss_type": "dapo", "beta": 0.1, "temperature": 1.3, "max_completion_length": 8},
        {"name": "dapo_reused", "loss_type": "dapo", "beta": 0.0, "temperature": 1.0, "max_completion_length": 8},
        {"name": "grpo_kl_reused", "loss_type": "grpo", "beta": 0.04, "temperature": 0.7, "max_completion_length": 8},
    ]
    cases = []
    for setting in settings:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        add_fused_lm_head(base, temperature=setting["temperature"], outputs=("log_probs", "entropy"))
        model = PeftModel.from_pretrained(base, REPO_ROOT / "tests" / "fixtures" / "adapters" / "llama-qv").eval()
        trainer = stub_trainer(
            GRPOTrainer,
            model=model,
            loss_type=setting["loss_type"],
            beta=setting["beta"],
            epsilon_low=0.2,
            epsilon_high=0.2,
            importance_sampling_level="token",
            top_entropy_quantile=1.0,
            off_policy_mask_threshold=None,
            use_vllm=False,
            _entropy_bonus_enabled=False,
            aux_loss_enabled=False,
            max_completion_length=setting["max_completion_length"],
            current_gradient_accumulation_steps=1,
            args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        )
        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "num_items_in_batch": completion_mask.sum(),
        }
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        if setting["beta"] != 0.0:
            with torch.no_grad(), model.disable_adapter():
                inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, completion_ids.size(1)
                )
        old = None
        if setting["name"].endswith("_reused"):
            with torch.no_grad():
                current, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, completion_ids.size(1)
                )
            rows, width = current.shape
            k = torch.arange(width, dtype=torch.float32)
            offsets = torch.stack([0.35 * torch.sin(1.7 * i + 0.9 * k) for i in range(rows)])
            old = (current + offsets) * completion_mask
            inputs["old_per_token_logps"] = old
        with torch.no_grad():
            loss = trainer._compute_loss(model, inputs)
        kept = ("entropy", "kl") + tuple(k for k in trainer._metrics["eval"] if k.startswith("clip_ratio/"))
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if k in kept}
        case = {**setting, "loss": loss.item(), "metrics": metrics}
        if old is not None:
            case["old_per_token_logps"] = old.tolist()
        cases.append(case)

    # Advantages, as _generate_and_score_completions computes them (sum_then_normalize).
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0])
    generations = 2
    scaled = {}
    for scale in ["group", "batch", "none"]:
        mean = torch.nanmean(rewards.view(-1, generations), dim=1).repeat_interleave(generations, dim=0)
        if scale in ["group", "none"]:
            std = nanstd(rewards.view(-1, generations), dim=1).repeat_interleave(generations, dim=0)
        else:
            std = nanstd(rewards).expand_as(rewards)
        adv = rewards - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
        zero = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
        scaled[scale] = {"advantages": adv.tolist(), "frac_reward_zero_std": zero}
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    texts = [
        "<think>\nreasoning\n</think>\nanswer",
        "<think>reasoning, no close",
        "answer first <think>x</think>",
        "<think>a</think><think>b</think>",
        "<think></think>",
        "",
    ]
    lengths = [10, 79, 80, 81, 90, 100, 101, 130]
    functions = {
        "texts": texts,
        "think_format": think_format_reward([[{"content": t}] for t in texts]),
        "lengths": lengths,
        "max_completion_len": 100,
        "soft_punish_cache": 20,
        "soft_overlong": get_soft_overlong_punishment(100, 20)([[1] * n for n in lengths]),
    }
    return {
        "model": "llama",
        "adapter": "llama-qv",
        "functions": functions,
        "prompts": prompts,
        "completions": completions,
        "advantages": advantages.tolist(),
        "cases": cases,
        "rewards": rewards.tolist(),
        "num_generations": generations,
        "scaled": scaled,
    }


def schedules() -> dict:
    """transformers' get_scheduler multipliers over 10 steps with 3 warmup steps, and the warmup
    that warmup_ratio 0.25 of 10 steps gives."""
    from transformers import get_scheduler

    out = {"peak_lr": 2e-4, "total_steps": 10, "warmup_steps": 3}
    for name, kind in [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=out["peak_lr"])
        scheduler = get_scheduler(kind, optimizer, num_warmup_steps=3, num_training_steps=10)
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        out[name] = lrs
    from transformers import TrainingArguments

    # transformers 5 takes a warmup ratio as a warmup_steps value below 1.
    args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=0.25, report_to=[])
    out["warmup_ratio_0.25_of_10"] = args.get_warmup_steps(10)
    return out


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    orpo = orpo_case()
    golden = {
        "sft": sft_case(),
        "accuracy": accuracy_case(),
        "dpo": dpo_cases(),
        "orpo": orpo,
        "cpo": cpo_cases(orpo),
        "kto": kto_cases(),
        "reward": reward_cases(),
        "grpo": grpo_cases(),
        "dpo_model": dpo_model_cases(),
        "schedules": schedules(),
    }
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("sft loss", golden["sft"]["loss"], "| dpo", golden["dpo"]["losses"])


def three_steps(model, optimizer, ids, labels, max_grad_norm: float) -> tuple[list[float], list[float]]:
    """Three optimizer steps on one batch with global-norm clipping: each step's loss and
    gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses, grad_norms = [], []
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item())
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses, grad_norms


def trained_state(model, prefix: str = "") -> dict:
    """The trained parameters under the adapter's own names (`model.layers.0...lora_A.weight`)."""
    return {
        prefix + n.replace("base_model.model.", "").replace(".default", ""): p.detach().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def adamw_steps() -> None:
    """Three LoRA SFT steps with PEFT + torch AdamW and global-norm clipping, from the llama-qv
    adapter, on the `sft` batch: the adapter after each step and the gradient norms."""
    from peft import PeftModel
    from safetensors.torch import save_file

    model_dir = REPO_ROOT / "tests" / "fixtures" / "models" / "llama"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, REPO_ROOT / "tests/fixtures/adapters/llama-qv", is_trainable=True)
    model.train()  # lora_dropout is 0, so training mode changes nothing numerically
    golden = json.loads((OUT / "golden.json").read_text())["sft"]
    ids, labels = torch.tensor(golden["input_ids"]), torch.tensor(golden["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    settings = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0}
    optimizer = torch.optim.AdamW(
        params, lr=settings["lr"], betas=settings["betas"], eps=settings["eps"], weight_decay=settings["weight_decay"]
    )
    losses, grad_norms = three_steps(model, optimizer, ids, labels, settings["max_grad_norm"])
    save_file(trained_state(model), OUT / "adamw_steps.safetensors")
    (OUT / "adamw_steps.json").write_text(
        json.dumps({**settings, "losses": losses, "grad_norms": grad_norms}, indent=1) + "\n"
    )
    print("adamw: losses", losses, "grad norms", grad_norms)


def adamw_groups() -> None:
    """`adamw_steps` from the DoRA adapter, under the Trainer's and LoRA+'s parameter groups."""
    from peft import PeftModel
    from peft.optimizers import create_loraplus_optimizer
    from safetensors.torch import save_file
    from transformers import Trainer

    settings = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "max_grad_norm": 1.0}
    settings["loraplus_lr_ratio"] = 4.0
    golden = json.loads((OUT / "golden.json").read_text())["sft"]
    ids, labels = torch.tensor(golden["input_ids"]), torch.tensor(golden["labels"])
    state, cases = {}, {}
    for case in ["trainer", "loraplus"]:
        base = AutoModelForCausalLM.from_pretrained(
            REPO_ROOT / "tests/fixtures/models/llama", dtype=torch.float32, attn_implementation="eager"
        )
        model = PeftModel.from_pretrained(base, REPO_ROOT / "tests/fixtures/adapters/llama-dora", is_trainable=True)
        model.train()
        adam = {"betas": settings["betas"], "eps": settings["eps"]}
        if case == "trainer":
            # Trainer.create_optimizer's two groups (the method reads nothing of the trainer).
            decayed = set(Trainer.get_decay_parameter_names(None, model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decayed], "weight_decay": settings["weight_decay"]},
                {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
            ]
            assert any("magnitude" in n for n, _ in named if n in decayed)
            optimizer = torch.optim.AdamW(groups, lr=settings["lr"], **adam)
        else:
            optimizer = create_loraplus_optimizer(
                model,
                torch.optim.AdamW,
                lr=settings["lr"],
                loraplus_lr_ratio=settings["loraplus_lr_ratio"],
                loraplus_weight_decay=settings["weight_decay"],
                **adam,
            )
        losses, grad_norms = three_steps(model, optimizer, ids, labels, settings["max_grad_norm"])
        cases[case] = {"losses": losses, "grad_norms": grad_norms}
        state.update(trained_state(model, f"{case}/"))
    save_file(state, OUT / "adamw_groups.safetensors")
    (OUT / "adamw_groups.json").write_text(json.dumps({**settings, **cases}, indent=1) + "\n")
    print("adamw groups:", cases)


if __name__ == "__main__":
    main()
    adamw_steps()
    adamw_groups()
