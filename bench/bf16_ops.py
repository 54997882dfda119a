"""Where a bf16 training step spends work on dtype casts: op counts, not wall time.

One LoRA SFT micro-batch (forward, loss, backward) through tunepipe's own path
(`build_trainable_model`, the padding-free `SegmentCollator` batch, `causal_lm_loss`) under
the Trainer's CPU autocast, at float32, `bf16: true` and `pure_bf16: true`. A torch dispatch
mode records every op: dtype casts (how many, how many bytes written, and which of them re-cast
a frozen weight), and matrix products by dtype (count and GFLOP). Counts do not depend on the
machine, so this runs anywhere; the speed a cast costs does (bf16 needs AVX512-BF16 / AMX to pay
on a CPU: see docs/benchmarks.md).

    .venv/bin/python bench/bf16_ops.py [--model smollm2|tiny | --base HF_DIR] [--samples 4] [--length 256]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
CASTS = {"_to_copy", "copy_"}


class OpCounter(TorchDispatchMode):
    """Counts casts (by source -> target dtype, bytes written) and matmuls (by dtype, FLOPs)."""

    def __init__(self, frozen_ptrs: set[int]):
        super().__init__()
        self.frozen_ptrs = frozen_ptrs
        self.casts = collections.Counter()
        self.cast_bytes = collections.Counter()
        self.matmuls = collections.Counter()
        self.flops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in CASTS and torch.is_tensor(out):
            src = args[1] if name == "copy_" else args[0]
            if torch.is_tensor(src) and src.dtype != out.dtype:
                frozen = src.data_ptr() in self.frozen_ptrs
                key = (f"{src.dtype} -> {out.dtype}".replace("torch.", ""), "frozen weight" if frozen else "other")
                self.casts[key] += 1
                self.cast_bytes[key] += out.numel() * out.element_size()
        elif name in MATMULS and torch.is_tensor(out):
            inner = (args[1] if name in ("addmm", "baddbmm") else args[0]).shape[-1]
            self.matmuls[str(out.dtype).replace("torch.", "")] += 1
            self.flops[str(out.dtype).replace("torch.", "")] += 2 * out.numel() * inner
        return out


def base_dir(choice: str, work: Path) -> Path:
    if choice == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fixtures.tiny_model import build_tiny_model_dir

        return build_tiny_model_dir(work / "tiny", layers=4, hidden=256)
    from _common import DEFAULT_WORK, base_model_dir

    return base_model_dir(DEFAULT_WORK)


def one_step(base: Path, mode: str, samples: int, length: int, work: Path) -> dict:
    from tunepipe.config import Config, ModelConfig, TrainConfig
    from tunepipe.layout import Layout
    from tunepipe.models.base import prepare_base_model
    from tunepipe.train.loss import causal_lm_loss
    from tunepipe.train.model.model_setup import build_trainable_model
    from tunepipe.train.sft import batch_layout

    cfg = Config(model=ModelConfig(model_name_or_path=str(base)),
                 train=TrainConfig(finetuning_type="lora", lora_target="all", lora_rank=8,
                                   bf16=mode == "bf16", pure_bf16=mode == "pure_bf16"))
    layout = Layout.at(work / mode)
    prepare_base_model(cfg.model, layout.base_model)
    model = build_trainable_model(cfg, layout)
    model.train()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = []
    for _ in range(samples):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    batch = batch_layout(model, pad_token_id=0)(rows)
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    counter = OpCounter(frozen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16_compute)
    with counter:
        with autocast:
            loss = causal_lm_loss(model, batch)
        loss.backward()
    params = collections.Counter(str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad)
    return {"mode": mode, "loss": round(float(loss), 4), "loss_dtype": str(loss.dtype).replace("torch.", ""),
            "frozen_dtypes": dict(params), "counter": counter}


def report(results: list[dict]) -> None:
    print("\n| mode | loss (dtype) | frozen weights | casts: count / MB (of which frozen weights) "
          "| matmuls bf16: count / GFLOP | matmuls fp32: count / GFLOP |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        c = r["counter"]
        count, mb = sum(c.casts.values()), sum(c.cast_bytes.values()) / 2**20
        frozen_count = sum(n for (_, kind), n in c.casts.items() if kind == "frozen weight")
        frozen_mb = sum(b for (_, kind), b in c.cast_bytes.items() if kind == "frozen weight") / 2**20
        mm = {d: f"{c.matmuls.get(d, 0)} / {c.flops.get(d, 0) / 1e9:.1f}" for d in ("bfloat16", "float32")}
        print(f"| {r['mode']} | {r['loss']} ({r['loss_dtype']}) | {r['frozen_dtypes']} | {count} / {mb:.1f} "
              f"({frozen_count} / {frozen_mb:.1f}) | {mm['bfloat16']} | {mm['float32']} |")
    for r in results:
        print(f"\n{r['mode']}: casts by kind (count, MB written)")
        c = r["counter"]
        for key in sorted(c.casts, key=lambda k: -c.cast_bytes[k]):
            print(f"  {key[0]:<22} {key[1]:<13} {c.casts[key]:5d}  {c.cast_bytes[key] / 2**20:9.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "pure_bf16"])
    parser.add_argument("--base", type=Path, default=None, help="an HF model dir to use instead of --model")
    args = parser.parse_args()
    from _common import machine_summary, print_machine

    print_machine(machine_summary())
    with tempfile.TemporaryDirectory(prefix="tunepipe-bf16-ops-") as tmp:
        work = Path(tmp)
        base = args.base or base_dir(args.model, work)
        print(f"model: {base}; one micro-batch of {args.samples} x {args.length} tokens, half of them trained")
        report([one_step(base, mode, args.samples, args.length, work) for mode in args.modes])
    return 0


if __name__ == "__main__":
    sys.exit(main())
