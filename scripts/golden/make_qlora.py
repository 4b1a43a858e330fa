#!/usr/bin/env python3
"""Reference outputs for QLoRA's 4-bit bases, written to tests/fixtures/qlora/:

  codes.safetensors   bitsandbytes' NF4 quantization of every projection of the llama fixture,
                      as transformers quantizes them when it loads the model in 4 bits:
                      `<module>.codes` (uint8, one code per weight in row-major order, unpacked
                      from bitsandbytes' two-to-a-byte packing) and `<module>.absmax` (f32, one
                      per block of 64 weights)
  golden.json         per adapter (llama-qv, llama-dora), the per-token log-probs of the first
                      two score cases of the llama fixture loaded by transformers in 4 bits
                      (BitsAndBytesConfig: nf4, blocks of 64, no double quantization, compute
                      dtype float32, the LM head left unquantized) with that adapter, and the
                      first case's mean negative log-prob
  grads.safetensors   that loss's gradients of every adapter tensor, keyed
                      `<adapter>/<name in adapter_model.safetensors>`

Needs torch, transformers, peft and bitsandbytes (its CPU backend). Run after make_models.py
and make_adapters.py, from the repository root:

    .venv/bin/python scripts/golden/make_qlora.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = Path("tests") / "fixtures" / "models"
ADAPTERS = Path("tests") / "fixtures" / "adapters"
OUT = Path("tests") / "fixtures" / "qlora"


def use_flat_blocks_on_cpu() -> None:
    """bitsandbytes (0.50) dequantizes on the CPU with a kernel that counts blocks within each
    row, where its quantization (and its CUDA kernels) count them over the flattened weight: the
    two disagree on weights whose rows are not whole blocks (the fixture's down projections,
    160 wide). The references take bitsandbytes' own portable dequantization instead, which
    counts them as quantization does."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _get_4bit_code

    @torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")
    def _(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


def load_4bit():
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        MODELS / "llama",
        quantization_config=config,
        dtype=torch.float32,
        device_map="cpu",
        attn_implementation="eager",
    )
    # On CPUs with AVX512-BF16, bitsandbytes' inference repacks the codes for a CPU kernel and
    # rounds the maxima to bf16; its training path, and every path on GPUs, dequantizes each
    # weight (maxima in f32) for a plain product. The references take the latter.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def codes_of(model) -> dict[str, torch.Tensor]:
    """Each 4-bit weight's codes, one per weight, and its blocks' maxima."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        state = weight.quant_state
        assert state.blocksize == 64 and state.quant_type == "nf4" and not state.nested
        packed = weight.data.reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: state.shape.numel()]
        out[f"{name}.codes"] = codes.contiguous()
        out[f"{name}.absmax"] = state.absmax.float().contiguous()
    return out


def token_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def main() -> None:
    os.chdir(REPO_ROOT)
    torch.set_num_threads(1)
    use_flat_blocks_on_cpu()
    OUT.mkdir(parents=True, exist_ok=True)
    cases = json.loads((MODELS / "llama" / "golden.json").read_text())["score"][:2]
    save_file(codes_of(load_4bit()), OUT / "codes.safetensors", metadata={"format": "pt"})
    golden, grads = {}, {}
    for adapter in ["llama-qv", "llama-dora"]:
        model = PeftModel.from_pretrained(load_4bit(), ADAPTERS / adapter, is_trainable=True).eval()
        score = [{"token_ids": c["token_ids"], "logprobs": token_logprobs(model, c["token_ids"])} for c in cases]
        ids = cases[0]["token_ids"]
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        loss = -logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()
        loss.backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                saved = name.replace(".default", "")
                if "lora_magnitude_vector" in saved:
                    saved = saved.removesuffix(".weight")
                grads[f"{adapter}/{saved}"] = param.grad.contiguous()
        golden[adapter] = {"score": score, "loss": loss.item()}
        print(f"{adapter}: loss {loss.item():.6f}")
    save_file(grads, OUT / "grads.safetensors", metadata={"format": "pt"})
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
