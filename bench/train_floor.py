"""The arithmetic floor of one LoRA SFT step on this machine: how fast any trainer could go.

A LoRA step on a frozen model cannot avoid, per batch: every frozen linear layer's forward
matmul and its input-gradient matmul (backward must reach the lowest LoRA layer), the output
projection on the trained tokens (forward and input gradient), and causal attention inside
each sample (forward and backward). This script times exactly those kernels, at the shapes
of SmolLM2-135M-Instruct and the batches `bench/train.py` trains on (alpaca_en_demo, chatml,
`cutoff_len: 512`, batch 4, rows laid end to end), and prints the tokens/s they allow.
Nothing else a trainer does (norms, activations, LoRA's own small matmuls, the optimizer,
Python) is counted, so a real trainer is slower than this.

    .venv/bin/python bench/train_floor.py [--steps 8] [--lf-tokens-per-s 52.9]
    .venv/bin/python bench/train_floor.py --batches-from /tmp/train_fp32.json   # bench/train.py's own batches
    .venv/bin/python bench/train_floor.py --dtype bfloat16   # the same kernels in bf16 (an AMX / AVX512-BF16 CPU)
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/train_floor.py`, this folder would come first on sys.path and
# bench/tokenize.py would shadow the standard library's tokenize module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import DEFAULT_WORK, LF_DEMO, base_model_dir
from transformers import AutoConfig, AutoTokenizer


def batches(tokenizer, steps: int, batch_size: int, cutoff: int) -> list[tuple[list[int], int]]:
    """(sample lengths, trained tokens) of `steps` batches of consecutive alpaca rows."""
    rows = json.loads((LF_DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    shapes = []
    for start in range(0, steps * batch_size, batch_size):
        lengths, trained = [], 0
        for row in rows[start:start + batch_size]:
            user = f"{row['instruction']}\n{row['input']}".strip()
            prompt = len(tokenizer(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
            answer = len(tokenizer(f"{row['output']}<|im_end|>\n")["input_ids"])
            lengths.append(min(prompt + answer, cutoff))
            trained += max(min(prompt + answer, cutoff) - prompt, 0)
        shapes.append((lengths, trained))
    return shapes


def recorded_batches(path: Path) -> tuple[list[tuple[list[int], int]], float | None]:
    """The fp32 tunepipe batches a bench/train.py run recorded, and LLaMA-Factory's tokens/s there."""
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"]["fp32"]
    work = [(batch["lengths"], batch["trained"]) for batch in runs["tunepipe"][0]["batches"]]
    lf = runs.get("llamafactory")
    return work, (lf[0]["real_tokens_per_s"] if lf else None)


def linear_shapes(config) -> list[tuple[int, int]]:
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden),
             (hidden, inner)]
    return layer * config.num_hidden_layers


DTYPE = torch.float32  # --dtype bfloat16: the kernels a bf16 run cannot avoid (AMX / AVX512-BF16)


def time_matmuls(shapes, tokens: int, trained: int, vocab: int, hidden: int) -> float:
    weights = [torch.randn(out, inp, dtype=DTYPE) for out, inp in shapes]
    inputs = [torch.randn(tokens, inp, dtype=DTYPE) for _, inp in shapes]
    grads = [torch.randn(tokens, out, dtype=DTYPE) for out, _ in shapes]
    head, states = torch.randn(vocab, hidden, dtype=DTYPE), torch.randn(trained, hidden, dtype=DTYPE)
    start, cpu_start = time.perf_counter(), time.process_time()
    for w, x, g in zip(weights, inputs, grads):
        x @ w.t()  # forward
        g @ w  # input gradient
    logits = states @ head.t()
    logits @ head
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_attention(config, lengths: list[int]) -> float:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    pieces = [tuple(torch.randn(1, h, n, dim, dtype=DTYPE, requires_grad=True) for h in (heads, kv_heads, kv_heads))
              for n in lengths]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(config.num_hidden_layers):
        for q, k, v in pieces:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--lf-tokens-per-s", type=float, default=None,
                        help="LLaMA-Factory's real tokens/s from bench/train.py, to print the ratios")
    parser.add_argument("--batches-from", type=Path, default=None,
                        help="a bench/train.py --json file: use the batches tunepipe trained on there "
                             "(its ratios then come from that file's LLaMA-Factory figure)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--emit", action="store_true", help="print a BENCH_RESULT line (bench/train.py --switches)")
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    base = base_model_dir(DEFAULT_WORK)
    config, tokenizer = AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    shapes = linear_shapes(config)
    if args.batches_from:
        work, args.lf_tokens_per_s = recorded_batches(args.batches_from)
    else:
        work = batches(tokenizer, args.steps, args.batch_size, args.cutoff_len)
    time_matmuls(shapes, 64, 32, config.vocab_size, config.hidden_size)  # warm-up
    matmul_s = attention_s = cpu_s = 0.0  # cpu_s, with one thread: the seconds a quiet core would take
    for lengths, trained in work:
        wall, cpu = time_matmuls(shapes, sum(lengths), trained, config.vocab_size, config.hidden_size)
        matmul_s, cpu_s = matmul_s + wall, cpu_s + cpu
        wall, cpu = time_attention(config, lengths)
        attention_s, cpu_s = attention_s + wall, cpu_s + cpu
    tokens = sum(sum(lengths) for lengths, _ in work)
    print(f"[floor] {len(work)} batches, {tokens} tokens, {torch.get_num_threads()} threads")
    for name, seconds in (("frozen matmuls + output head", matmul_s),
                          ("  + per-sample causal attention", matmul_s + attention_s)):
        rate = tokens / seconds
        ratio = f", {rate / args.lf_tokens_per_s:.2f}x LLaMA-Factory" if args.lf_tokens_per_s else ""
        print(f"[floor] {name:<32} {seconds:7.1f} s  {rate:7.1f} tokens/s at most{ratio}")
    if args.emit:
        from _common import emit

        emit({"tokens": tokens, "matmul_s": round(matmul_s, 3), "attention_s": round(attention_s, 3),
              "tokens_per_s": round(tokens / (matmul_s + attention_s), 2), "dtype": args.dtype,
              "cpu_s": round(cpu_s, 3), "tokens_per_cpu_s": round(tokens / cpu_s, 2),
              "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
