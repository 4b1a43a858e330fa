#!/usr/bin/env python3
"""Reference outputs for QLoRA's 4-bit bases, written to tests/fixtures/qlora/:

  codes.safetensors   bitsandbytes' NF4 quantization of every projection of the llama fixture,
                      as transformers quantizes them when it loads the model in 4 bits:
                      `<module>.codes` (uint8, one code per weight in row-major order, unpacked
                      from bitsandbytes' two-to-a-byte packing) and `<module>.absmax` (f32, one
                      per block of 64 weights)
  golden.json         per case, named `<adapter>` or `<adapter>@<base>`: the per-token log-probs
                      of the first two score cases of the llama fixture loaded by transformers in
                      4 bits (BitsAndBytesConfig: nf4, blocks of 64, no double quantization,
                      compute dtype float32, the LM head left unquantized), or of the 4-bit
                      checkpoint `<base>`, with that adapter, and the first case's mean negative
                      log-prob
  grads.safetensors   that loss's gradients of every adapter tensor, keyed
                      `<case>/<name in adapter_model.safetensors>`
  stored_maxima.safetensors
                      the block maxima of every projection of the 4-bit checkpoint below as
                      bitsandbytes reads them back from their double quantization (f32)

and tests/fixtures/models/llama-bnb-4bit/, the llama fixture as transformers saves it once loaded
in 4 bits with double quantization (`bnb_4bit_use_double_quant=True`): a `*-bnb-4bit` checkpoint,
its projections stored as codes two to a byte, 8-bit maxima and their nested statistics.

Needs torch, transformers, peft and bitsandbytes (its CPU backend). Run after make_models.py
and make_adapters.py, from the repository root:

    .venv/bin/python scripts/golden/make_qlora.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = Path("tests") / "fixtures" / "models"
ADAPTERS = Path("tests") / "fixtures" / "adapters"
OUT = Path("tests") / "fixtures" / "qlora"


def use_portable_kernels_on_cpu() -> None:
    """Two of bitsandbytes' (0.50) CPU kernels are replaced by its portable ones, which compute
    as its CUDA kernels do:
    - `dequantize_4bit`: the CPU kernel counts blocks within each row, where quantization counts
      them over the flattened weight, so the two disagree on weights whose rows are not whole
      blocks (the fixture's 160-wide down projections);
    - `quantize_blockwise` (the maxima's double quantization): the CPU kernel looks codes up in
      a 65536-entry table over [-1, 1], which picks a neighbour of the nearest code where the
      dynamic map's codes are closer together than the table's steps (near zero)."""
    portable = torch._C.DispatchKey.CompositeExplicitAutograd
    for name in ["dequantize_4bit", "quantize_blockwise"]:
        op = getattr(torch.ops.bitsandbytes, name).default

        def kernel(*args, op=op):
            return op._op_dk(portable, *args)

        torch.library.register_kernel(f"bitsandbytes::{name}", "cpu")(kernel)


def load_4bit(double_quant: bool = False):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        MODELS / "llama",
        quantization_config=config,
        dtype=torch.float32,
        device_map="cpu",
        attn_implementation="eager",
    )
    return without_avx512_bf16(model)


def load_saved_4bit(directory: Path):
    """A checkpoint saved in 4 bits, loaded as it is stored (its own quantization_config)."""
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, device_map="cpu", attn_implementation="eager"
    )
    return without_avx512_bf16(model)


def without_avx512_bf16(model):
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


def save_prequantized() -> Path:
    """The llama fixture loaded in 4 bits with double quantization, saved as transformers saves
    it, with the llama fixture's tokenizer and template beside it."""
    out = MODELS / "llama-bnb-4bit"
    if out.exists():
        shutil.rmtree(out)
    load_4bit(double_quant=True).save_pretrained(out)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(MODELS / "llama" / name, out / name)
    return out


def stored_maxima_of(model) -> dict[str, torch.Tensor]:
    """Each 4-bit weight's block maxima read back from their double quantization."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_blockwise

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            assert state.nested
            maxima = dequantize_blockwise(state.absmax, state.state2) + state.offset
            out[name] = maxima.float().contiguous()
    return out


def token_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def main() -> None:
    os.chdir(REPO_ROOT)
    torch.set_num_threads(1)
    use_portable_kernels_on_cpu()
    OUT.mkdir(parents=True, exist_ok=True)
    cases = json.loads((MODELS / "llama" / "golden.json").read_text())["score"][:2]
    save_file(codes_of(load_4bit()), OUT / "codes.safetensors", metadata={"format": "pt"})
    stored = save_prequantized()
    save_file(
        stored_maxima_of(load_saved_4bit(stored)),
        OUT / "stored_maxima.safetensors",
        metadata={"format": "pt"},
    )
    golden, grads = {}, {}
    cases_of_bases = [
        ("llama-qv", "llama-qv", load_4bit),
        ("llama-dora", "llama-dora", load_4bit),
        ("llama-qv@llama-bnb-4bit", "llama-qv", lambda: load_saved_4bit(stored)),
    ]
    for case, adapter, load in cases_of_bases:
        model = PeftModel.from_pretrained(load(), ADAPTERS / adapter, is_trainable=True).eval()
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
                grads[f"{case}/{saved}"] = param.grad.contiguous()
        golden[case] = {"score": score, "loss": loss.item()}
        print(f"{case}: loss {loss.item():.6f}")
    save_file(grads, OUT / "grads.safetensors", metadata={"format": "pt"})
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
