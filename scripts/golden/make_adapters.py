#!/usr/bin/env python3
"""Build PEFT LoRA adapters on the fixture models and the reference outputs burnish is held to.

Writes, under tests/fixtures/adapters/:
  <name>/adapter_config.json, <name>/adapter_model.safetensors   saved by PEFT
  <name>/golden.json      PEFT's trainable-parameter count and per-token log-probs of
                          model + adapter on the model's score cases
  <name>/merged.safetensors  the adapted weights after PEFT's merge_and_unload (f32)
  <name>/grads.safetensors   (DoRA only) the adapter's gradients of the first score case's
                          mean negative log-prob, its value in golden.json's `loss`
and, for `llama-reward` (a reward model: LlamaForSequenceClassification with one label, LoRA on
q/v and its `score` head trained whole, PEFT's task_type SEQ_CLS), golden.json holds each score
case's reward instead of log-probs, and tests/fixtures/models/llama-reward is that model merged
and saved by transformers (a sequence-classification checkpoint: `score.weight`, no `lm_head`);
and tests/fixtures/merges/golden.safetensors + golden.json: PEFT's merge_utils (task
arithmetic, TIES, DARE) and the linear / SLERP formulas on small random task tensors.

Adapters are created with init_lora_weights=False so B is non-zero and the adapter really
changes the outputs; a DoRA adapter's magnitudes are then scaled by random factors, so that
its rescaling of each row matters too. Run after make_models.py, from the repository root:

    .venv/bin/python scripts/golden/make_adapters.py

`check_adapter_in_peft.py` is the other direction: it loads an adapter burnish wrote into PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parents[2]
# Relative paths, so the base_model_name_or_path PEFT records names the fixture, not this machine.
MODELS = Path("tests") / "fixtures" / "models"
ADAPTERS = Path("tests") / "fixtures" / "adapters"
MERGES = Path("tests") / "fixtures" / "merges"

# name -> (base model fixture, LoraConfig keyword arguments)
ADAPTER_SPECS = {
    # The common case: attention q/v only.
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    # all-linear with rsLoRA and per-module rank / alpha overrides, on biased projections.
    "qwen2-all": (
        "qwen2",
        dict(
            r=4,
            lora_alpha=16,
            target_modules="all-linear",
            use_rslora=True,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"q_proj": 4},
        ),
    ),
    # A list restricted to one layer, with a regex-free suffix list.
    "mistral-layer1": (
        "mistral",
        dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "o_proj"], layers_to_transform=[1]),
    ),
    # DoRA on attention and an MLP projection.
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
}


def load_base(name: str):
    model = AutoModelForCausalLM.from_pretrained(
        MODELS / name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def token_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def make_adapter(name: str, base_name: str, kwargs: dict) -> None:
    out = ADAPTERS / name
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(1234)
    model = load_base(base_name)
    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **kwargs)
    peft_model = get_peft_model(model, config)
    if config.use_dora:
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in param_name:
                    param.mul_(1 + 0.2 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    (out / "README.md").unlink()  # PEFT's model card template; not needed by the tests
    trainable, _ = peft_model.get_nb_trainable_parameters()

    # Reload from disk, exactly as a user would, before computing references.
    reloaded = PeftModel.from_pretrained(load_base(base_name), out).eval()
    cases = json.loads((MODELS / base_name / "golden.json").read_text())["score"]
    score = [
        {"token_ids": c["token_ids"], "logprobs": token_logprobs(reloaded, c["token_ids"])}
        for c in cases
    ]
    loss = None
    if config.use_dora:
        loss = save_gradients(out, base_name, cases[0]["token_ids"])
    base_model = reloaded.get_base_model()
    adapted = sorted(n.removesuffix(".base_layer") for n, m in base_model.named_modules() if hasattr(m, "lora_A"))
    merged = reloaded.merge_and_unload()
    state = merged.state_dict()
    merged_weights = {f"{n}.weight": state[f"{n}.weight"].contiguous() for n in adapted}
    save_file(merged_weights, out / "merged.safetensors", metadata={"format": "pt"})
    golden = {
        "base_model": base_name,
        "trainable_parameters": trainable,
        "adapted_modules": adapted,
        "score": score,
    }
    if loss is not None:
        golden["loss"] = loss
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"{name}: {len(adapted)} modules, {trainable} trainable parameters")


def reward_of(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def make_reward_adapter() -> None:
    """A reward model's adapter as TRL's RewardTrainer trains it with PEFT: the base loaded as a
    one-label sequence classifier (a fresh `score` head), LoRA with task_type SEQ_CLS, which makes
    PEFT train and save the head whole (`modules_to_save`). The head is set to larger random
    values than its initialisation so that rewards are of order one."""
    name, base_name = "llama-reward", "llama"
    out = ADAPTERS / name
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(1234)

    def load_classifier(path):
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, attn_implementation="eager"
        )
        return model.eval()

    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "v_proj"],
    )
    peft_model = get_peft_model(load_classifier(MODELS / base_name), config)
    with torch.no_grad():
        head = peft_model.base_model.model.score.modules_to_save["default"].weight
        head.copy_(0.3 * torch.randn_like(head))
    peft_model.save_pretrained(out)
    (out / "README.md").unlink()
    trainable, _ = peft_model.get_nb_trainable_parameters()

    reloaded = PeftModel.from_pretrained(load_classifier(MODELS / base_name), out).eval()
    cases = json.loads((MODELS / base_name / "golden.json").read_text())["score"]
    rewards = [{"token_ids": c["token_ids"], "reward": reward_of(reloaded, c["token_ids"])} for c in cases]
    golden = {"base_model": base_name, "trainable_parameters": trainable, "rewards": rewards}
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")

    merged_dir = MODELS / name
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    reloaded.merge_and_unload().save_pretrained(merged_dir)
    for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(MODELS / base_name / file, merged_dir / file)
    merged = load_classifier(merged_dir)
    for case in rewards:
        assert abs(reward_of(merged, case["token_ids"]) - case["reward"]) < 1e-5
    print(f"{name}: {trainable} trainable parameters, rewards {[round(r['reward'], 4) for r in rewards]}")


def save_gradients(out: Path, base_name: str, ids: list[int]) -> float:
    """The gradients of `ids`' mean negative log-prob for every adapter tensor, keyed as in
    adapter_model.safetensors, written to grads.safetensors; returns the loss."""
    model = PeftModel.from_pretrained(load_base(base_name), out, is_trainable=True).eval()
    logits = model(torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(ids[1:])
    loss = -logprobs[:-1].gather(1, targets[:, None]).mean()
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            saved = name.replace(".default", "")
            if "lora_magnitude_vector" in saved:
                saved = saved.removesuffix(".weight")
            grads[saved] = param.grad.contiguous()
    save_file(grads, out / "grads.safetensors", metadata={"format": "pt"})
    return loss.item()


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two weight tensors as mergekit defines it: the angle comes
    from the normalised tensors, the interpolation applies to the originals, and nearly
    parallel tensors fall back to linear interpolation."""
    n0 = v0 / v0.norm()
    n1 = v1 / v1.norm()
    dot = (n0 * n1).sum()
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta_0 = torch.arccos(dot)
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / torch.sin(theta_0)
    s1 = torch.sin(theta_t) / torch.sin(theta_0)
    return s0 * v0 + s1 * v1


def make_merges() -> None:
    """PEFT's merge_utils on three random task tensors, plus linear and SLERP."""
    MERGES.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    tasks = [torch.randn(6, 10, generator=gen, dtype=torch.float64).float() for _ in range(3)]
    weights = torch.tensor([0.5, 0.3, 0.8])
    density = 0.4
    tensors = {f"task_{i}": t for i, t in enumerate(tasks)}
    tensors["task_arithmetic"] = merge_utils.task_arithmetic(tasks, weights)
    tensors["magnitude_prune"] = merge_utils.magnitude_prune(tasks, weights, density)
    tensors["ties_total"] = merge_utils.ties(tasks, weights, density, "total")
    tensors["ties_frequency"] = merge_utils.ties(tasks, weights, density, "frequency")
    # DARE draws its masks with torch's RNG; record them so the rest of the computation can be
    # compared exactly (burnish draws its own masks from its seed).
    torch.manual_seed(11)
    masks = [torch.bernoulli(torch.full_like(t, density)) for t in tasks]
    torch.manual_seed(11)
    tensors["dare_linear"] = merge_utils.dare_linear(tasks, weights, density)
    torch.manual_seed(11)
    tensors["dare_ties"] = merge_utils.dare_ties(tasks, weights, density, "total")
    for i, m in enumerate(masks):
        tensors[f"dare_mask_{i}"] = m
    # Full-weight merges of two "models" (base + task).
    base = torch.randn(6, 10, generator=gen, dtype=torch.float64).float()
    tensors["base"] = base
    models = [base + t for t in tasks]
    tensors["linear"] = sum(w * m for w, m in zip(weights, models)) / weights.sum()
    tensors["slerp_0.3"] = slerp(0.3, models[0], models[1])
    tensors["slerp_parallel"] = slerp(0.6, models[0], 2.0 * models[0])
    save_file({k: v.contiguous() for k, v in tensors.items()}, MERGES / "golden.safetensors")
    (MERGES / "golden.json").write_text(
        json.dumps({"weights": weights.tolist(), "density": density, "slerp_t": 0.3}, indent=1) + "\n"
    )
    print(f"merges: {len(tensors)} tensors")


def main() -> None:
    os.chdir(REPO_ROOT)
    torch.set_num_threads(1)
    ADAPTERS.mkdir(parents=True, exist_ok=True)
    for name, (base_name, kwargs) in ADAPTER_SPECS.items():
        make_adapter(name, base_name, kwargs)
    make_reward_adapter()
    make_merges()


if __name__ == "__main__":
    main()
