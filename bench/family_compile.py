"""`torch_compile` (regional compilation, train/fast_path.py) against eager, per model family.

    OMP_NUM_THREADS=1 .venv/bin/python bench/family_compile.py [--backend inductor] [--families llama qwen2]

For each tiny family model of tests/fixtures/families.py, with LoRA (rank 4, every linear
layer, B randomised so A gets a gradient) on tunepipe's attention path for `flash_attn: auto`:
the loss and the LoRA gradients of three padding-free batches (five, three and two samples)
through compiled decoder layers, against the same model eager; prints the max differences,
the graphs dynamo had built after each layout and the wall / CPU seconds of the first
(compiling) call (CPU seconds count inductor's compile only with TORCHINDUCTOR_COMPILE_THREADS=1,
which keeps it in this process). tests/test_fast_path.py asserts the same within 1e-5 on
aot_eager for every family (a subset in `make test`, all with TUNEPIPE_COMPILE_SWEEP=1); this
runs inductor's own kernels, which take minutes to build on a small CPU. Not a test: it prints.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import tempfile
import time

import torch
from _common import machine_summary, print_machine
from tests.fixtures.families import FAMILIES, build_family_dir
from tests.test_model_families import config_for, labelled, lora_grads, randomise_lora_b, samples

from tunepipe.layout import Layout
from tunepipe.train.batches.collate import SegmentCollator
from tunepipe.train.fast_path import compile_decoder_layers
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model.model_setup import build_trainable_model, decoder_layers

ORDERS = ((0, 1, 2, 3, 4), (4, 0, 2), (1, 3))


def compare(name: str, root: Layout, backend: str) -> str:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    build_family_dir(root.base_model, name)
    cfg = config_for(root)
    eager = build_trainable_model(cfg, root)
    randomise_lora_b(eager)
    compiled = build_trainable_model(cfg, root)
    compiled.load_state_dict(eager.state_dict())
    compile_decoder_layers(decoder_layers(compiled), backend=backend)
    attn = eager.config._attn_implementation
    rows = [labelled(ids) for ids in samples()]
    loss_diff = grad_diff = 0.0
    first_call = first_cpu = 0.0
    graphs = []
    for order in ORDERS:
        batch = SegmentCollator(0, attn, flatten=True)([rows[i] for i in order])
        eager.zero_grad()
        compiled.zero_grad()
        want = causal_lm_loss(eager, batch)
        want.backward()
        start, start_cpu = time.perf_counter(), time.process_time()
        got = causal_lm_loss(compiled, batch)
        got.backward()
        first_call = first_call or time.perf_counter() - start
        first_cpu = first_cpu or time.process_time() - start_cpu
        loss_diff = max(loss_diff, abs(got - want).item())
        want_grads, got_grads = lora_grads(eager), lora_grads(compiled)
        grad_diff = max(grad_diff, max((got_grads[key] - want_grads[key]).abs().max().item() for key in want_grads))
        graphs.append(counters["stats"]["unique_graphs"])
    layouts = " / ".join(str(g) for g in graphs)
    return f"| {name} | {attn} | {loss_diff:.1e} | {grad_diff:.1e} | {layouts} | {first_call:.0f} | {first_cpu:.0f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    args = parser.parse_args()
    print_machine(machine_summary())
    print(f"backend {args.backend}, float32, {torch.get_num_threads()} threads\n")
    print("| family | attention | max loss diff | max LoRA grad diff | graphs after layouts 1 / 2 / 3 "
          "| first call wall s | first call CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="tunepipe-family-compile-") as tmp:
        for name in args.families:
            try:
                row = compare(name, Layout.at(os.path.join(tmp, name)), args.backend)
            except Exception as error:  # noqa: BLE001 -- a family that fails to compile is a row, not the end
                row = f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:160]} | | | | | |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
