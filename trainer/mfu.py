"""Model FLOPs utilization of a LoRA training run: achieved model FLOP/s over the peak GEMM FLOP/s of the
same dtype, measured on the same machine (a CPU's peak is not on any data sheet we can read at run time).

Model FLOPs count useful work only (real tokens, not padding), PaLM-style: per token, every frozen linear
weight costs 2 FLOPs forward and 2 for the input gradient; a trainable one 2 more for its weight gradient;
attention's two activation products cost 4 x length x width per layer forward and twice that backward.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def step_flops_per_token(model: torch.nn.Module, mean_length: float) -> float:
    """Model FLOPs of one training step per real token (forward + backward). Where the model runs its last
    layer for the first token only (trainer/modeling.py sets loraship_last_layer = "cls"), that layer's work
    apart from its keys and values is done once per text."""
    cls_only_last_layer = getattr(model, "loraship_last_layer", "full") == "cls"
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layers", 0)
    width = getattr(config, "hidden_size", 0) or getattr(config, "dim", 0)
    last = f"layer.{layers - 1}."
    frozen = trainable = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            n = module.weight.numel()
            if cls_only_last_layer and last in name and ".key" not in name and ".value" not in name:
                n /= mean_length  # one row per text instead of one per token
            if module.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    # 4 s d forward + 8 s d backward per layer and token; a first-token-only last layer has 1 query, not s.
    attention = 12 * width * (mean_length * (layers - 1) + (1 if cls_only_last_layer else mean_length))
    return 4 * frozen + 6 * trainable + attention


def peak_gemm_flops(dtype: torch.dtype, device: torch.device, max_n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on `device` (this process's threads). n doubles from
    256 until one product takes 50 ms (or n = max_n): big enough for the peak, and bounded where the dtype is
    slow (bf16 on a CPU without native bf16 is emulated, tens of times slower than fp32)."""

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    n = 256
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        timed(a, b)  # warm-up
        if n >= max_n or timed(a, b) >= 0.05:
            break
        n *= 2
    # The fastest of the reps: a peak is what the machine can do; slower reps met other work on the cores.
    return 2 * n**3 / min(timed(a, b) for _ in range(reps))


def report(accelerator: Any, model: torch.nn.Module, mixed_precision: str, tokens_per_second: float, mean_length: float) -> dict[str, Any]:
    """MFU of the run. Every process measures its peak at the same time and the peaks add up, so processes
    that share a CPU's cores are not each credited with the whole CPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    accelerator.wait_for_everyone()
    peak = torch.tensor([peak_gemm_flops(dtype, accelerator.device)], device=accelerator.device)
    if accelerator.num_processes > 1:
        peak = accelerator.reduce(peak, reduction="sum")
    per_token = step_flops_per_token(accelerator.unwrap_model(model), mean_length)
    achieved = per_token * tokens_per_second
    return {"dtype": str(dtype).removeprefix("torch."), "flops_per_token": round(per_token), "achieved_gflops": round(achieved / 1e9, 4),
            "peak_gemm_gflops": round(float(peak[0]) / 1e9, 2), "mfu": round(achieved / float(peak[0]), 6)}
