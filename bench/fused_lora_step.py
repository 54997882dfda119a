"""One forward + backward of SmolLM2-135M with LoRA r8 on all linears: PEFT's forward vs `fused_lora`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fused_lora_step.py [--tokens 740] [--rounds 5] [--bf16]

One model (bench/train.py's converted SmolLM2, float32, `lora_target: all`, B randomised so
every path computes; `--bf16`: under bf16 autocast, as `bf16: true` trains), one batch of `--tokens` random ids; the grouped forward of
`train/model/lora_groups.py` is switched on and off on the same modules, alternating round by
round in one process (a shared machine's load hits both alike), and each step's CPU seconds
are timed. Prints the medians and the largest loss / LoRA-gradient difference. A whole
`bench/train.py` run is ~8 CPU s a step, in which a few percent drown in the load noise of a
shared 2-core machine; this is the same step's model part, measured pairwise.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/tokenize.py shadows tokenize

import argparse
import statistics
import time
from pathlib import Path

import torch


def build(base: Path):
    from transformers import AutoModelForCausalLM

    from tunepipe.config import TrainConfig
    from tunepipe.train.model.adapters import attach_lora

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="sdpa")
    model = attach_lora(model, TrainConfig(finetuning_type="lora", lora_target="all", lora_rank=8,
                                           lora_alpha=16, fused_lora=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model


def switch(model, fused: bool) -> None:
    """PEFT's own forward back (the instance attribute removed) or the grouped one reinstalled."""
    import types

    from tunepipe.train.model.lora_groups import GROUP_ATTR, grouped_forward

    for module in model.modules():
        if hasattr(module, GROUP_ATTR):
            if fused:
                module.forward = types.MethodType(grouped_forward, module)
            else:
                module.__dict__.pop("forward", None)


def step(model, ids, bf16: bool) -> tuple[float, torch.Tensor, dict]:
    model.zero_grad()
    start = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.process_time() - start
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return seconds, loss.detach(), grads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=740)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    parser.add_argument("--base", type=Path, default=Path(_HERE) / ".cache" / "smollm2-base")
    args = parser.parse_args()
    model = build(args.base)
    ids = torch.randint(3, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    times = {"peft": [], "fused_lora": []}
    results = {}
    for round_no in range(args.rounds + 1):
        order = ("peft", "fused_lora") if round_no % 2 == 0 else ("fused_lora", "peft")
        for name in order:
            switch(model, name == "fused_lora")
            seconds, loss, grads = step(model, ids, args.bf16)
            if round_no > 0:  # round 0 warms allocations up
                times[name].append(seconds)
            results[name] = (loss, grads)
    (loss_a, grads_a), (loss_b, grads_b) = results["peft"], results["fused_lora"]
    grad_gap = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    for name, values in times.items():
        print(f"{name:<11} CPU s per forward+backward: median {statistics.median(values):.3f} "
              f"(all: {', '.join(f'{v:.3f}' for v in values)}); {args.tokens / statistics.median(values):.1f} tokens per CPU s")
    print(f"saving: {100 * (1 - statistics.median(times['fused_lora']) / statistics.median(times['peft'])):.1f}%; "
          f"|loss difference| {abs(loss_a - loss_b).item():.2e}, max |LoRA gradient difference| {grad_gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
