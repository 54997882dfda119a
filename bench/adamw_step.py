"""One AdamW step over SmolLM2-135M's LoRA tensors: torch's per-tensor loop, foreach, fused.

    OMP_NUM_THREADS=1 .venv/bin/python bench/adamw_step.py [--rank 8] [--rounds 9]

The tensors `lora_rank: 8, lora_target: all` trains on SmolLM2-135M-Instruct (30 layers x 7
linear layers x A and B: 420 tensors, 2.44M values), float32, with gradients; each variant
steps its own copy, the variants interleaved round after round (a shared machine's load hits
them alike), medians printed, and the fused update compared with the loop's. This is the
optimizer's part of a `bench/train.py` step, measured alone: in a whole step it drowns in
the load noise of a shared 2-core machine.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/adamw_step.py`, this folder would come first on sys.path and
# bench/tokenize.py would shadow the standard library's tokenize module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import statistics
import time

import torch

# SmolLM2-135M-Instruct: hidden 576, 3 key-value heads of 64, MLP 1536, 30 layers
HIDDEN, KV, INNER, LAYERS = 576, 192, 1536, 30


def lora_shapes(rank: int) -> list[tuple[int, int]]:
    linears = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INNER, HIDDEN), (INNER, HIDDEN),
               (HIDDEN, INNER)]
    return [shape for out, inp in linears * LAYERS for shape in ((rank, inp), (out, rank))]


def params_with_grads(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    shapes = lora_shapes(args.rank)
    variants = {"per-tensor loop (CPU default)": {"foreach": False}, "foreach": {"foreach": True},
                "fused (tunepipe default)": {"fused": True}}
    steppers = {}
    for name, settings in variants.items():
        params = params_with_grads(shapes)
        steppers[name] = (params, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **settings))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (_, optimizer) in steppers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    loop, fused = steppers["per-tensor loop (CPU default)"][0], steppers["fused (tunepipe default)"][0]
    diff = max((a - b).abs().max().item() for a, b in zip(loop, fused))
    print(f"{len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes):,} values, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (the first left out)")
    for name, values in times.items():
        print(f"{name:<32} {1000 * statistics.median(values[1:]):8.1f} ms per step")
    print(f"max |fused - loop| after {args.rounds} steps: {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
