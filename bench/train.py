"""Benchmark: LoRA SFT real tokens/s and peak memory, tunepipe vs LLaMA-Factory 0.9.5, CPU.

SmolLM2-135M-Instruct (the embedded GGUF converted once to a float32 HF dir that both
sides load), `alpaca_en_demo` read in place from ../shared/datasets/llamafactory-demo,
LoRA rank 8 on every linear layer, `cutoff_len: 512`, batch 4, gradient accumulation 1,
8 optimizer steps, `template: chatml`, at float32 and at bf16, each precision run side by
side (alternating which side goes first). Both sides get the same flat YAML; each keeps
its own defaults for everything else (LLaMA-Factory: gradient checkpointing on, padded
batches; tunepipe: whatever `tunepipe train` does by default).

Measured by bench/trainer_probe.py inside each training process: real (non-pad) tokens
and the time from the first optimizer step's start to the last one's end; the loss of the
first batch (logging_steps 1) and a fingerprint of its rows, so the two losses are only
compared when both sides trained on the same rows; peak resident memory is `ru_maxrss` of
the whole training process (model load and tokenization included).

    .venv/bin/python bench/train.py [--precision fp32 bf16] [--rounds 1] [--steps 8]

`--switches` measures tunepipe alone, once per speed switch (VARIANTS: each named set of
extra keys on top of the same YAML), the variants interleaved round by round (the order
rotating), then `bench/train_floor.py` on the very batches tunepipe trained on, in the same
run, and prints each variant's real tokens/s (all steps, and steady: step 1 left out, where
a compile warm-up lands), the time from process start to the end of step 1, and the ratio to
the floor. Medians over rounds. The LLaMA-Factory venv is not needed for it:

    OMP_NUM_THREADS=2 .venv/bin/python bench/train.py --switches --precision fp32 bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from _common import (
    BENCH,
    DEFAULT_WORK,
    LF_DEMO,
    LF_DRIVER,
    LF_PYTHON,
    TUNEPIPE_PYTHON,
    base_model_dir,
    check_prerequisites,
    machine_summary,
    print_machine,
    require_ok,
    run_measured,
)

SIDES = ("tunepipe", "llamafactory")

# tunepipe's speed switches (train keys); "default" is what `tunepipe train` does unasked.
VARIANTS = {
    "default": {},
    "no_fused_adamw": {"fused_optimizer": False},  # AdamW's per-tensor loop (torch's CPU default)
    "torch_compile": {"torch_compile": True},  # regional compilation of the decoder layers
    "fused_lora": {"fused_lora": True},  # one A matmul per q/k/v, gate/up; scaling folded into B's addmm
    "no_fused_lora": {"fused_lora": False},  # PEFT's own LoRA forward, module by module
    "pure_bf16": {"pure_bf16": True},  # frozen weights stored in bf16 (with --precision bf16)
    "pure_bf16_compile": {"pure_bf16": True, "torch_compile": True},
}


def shared_yaml(base: Path, out: Path, precision: str, steps: int) -> dict:
    """The one flat LLaMA-Factory YAML both sides read (tunepipe warns about use_cpu and ignores it)."""
    return {
        "model_name_or_path": str(base), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_target": "all", "dataset": "alpaca_en_demo", "dataset_dir": str(LF_DEMO),
        "template": "chatml", "cutoff_len": 512, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 1.0e-4,
        "lr_scheduler_type": "cosine", "logging_steps": 1, "seed": 42, "output_dir": str(out),
        "overwrite_output_dir": True, "report_to": "none", "use_cpu": True, "bf16": precision == "bf16",
    }


def run_side(side: str, precision: str, round_no: int, tmp: Path, base: Path, steps: int,
             variant: str | None = None) -> dict:
    name = f"{side}-{precision}-{round_no}" if variant is None else f"{variant}-{precision}-{round_no}"
    out = tmp / name
    config = tmp / f"{name}.json"  # JSON is YAML: the same text serves both sides
    keys = {**shared_yaml(base, out, precision, steps), **(VARIANTS[variant] if variant else {})}
    config.write_text(json.dumps(keys, indent=2))
    if side == "llamafactory":
        cmd = [str(LF_PYTHON), "-P", str(LF_DRIVER), "train", str(config)]
    else:
        cmd = [str(TUNEPIPE_PYTHON), "-P", str(BENCH / "tp_driver.py"), "train", str(config)]
    env = {"HF_DATASETS_CACHE": str(tmp / f"{name}-hf-cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    measured = run_measured(cmd, tmp / "logs" / f"{name}.log", env=env)
    require_ok(name, measured)
    result = dict(measured.result)
    result["process_wall_s"] = round(measured.wall_s, 1)
    result["max_rss_mib"] = round(measured.max_rss_mib)
    result["steady_tokens_per_s"] = steady_rate(result)
    # per CPU second of the steps (all threads): with OMP_NUM_THREADS=1 on a shared machine,
    # this is the rate a quiet core would give, where wall-clock rates follow the load
    # (steps 2-N: a compile warm-up is step 1; TORCHINDUCTOR_COMPILE_THREADS=1 keeps it in-process)
    steady_tokens = sum(sum(batch["lengths"]) for batch in result["batches"][1:])
    result["tokens_per_cpu_s"] = round(steady_tokens / max(sum(result["step_cpu_s"][1:]), 1e-9), 2)
    print(f"[bench] {name:<22} {result['real_tokens_per_s']:8.1f} real tok/s  train {result['train_s']:7.1f} s  "
          f"steady {result['steady_tokens_per_s']:8.1f} tok/s  step 1 done {result['first_step_after_s']:6.1f} s  "
          f"CPU {result['train_cpu_s']:7.1f} s  real {result['real_tokens']} / slots {result['slot_tokens']}  "
          f"peak RSS {result['max_rss_mib']} MiB  "
          f"first loss {result['first_loss']}", flush=True)
    return result


def steady_rate(result: dict) -> float:
    """Real tokens/s over steps 2..N (one micro-batch per step here): a compile warm-up and the
    first step's allocations fall in step 1, which the time-to-first-step figure shows instead."""
    tokens = sum(sum(batch["lengths"]) for batch in result["batches"][1:])
    seconds = sum(result["step_s"][1:])
    return round(tokens / seconds, 2) if seconds > 0 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per side and precision")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--only", choices=SIDES, default=None, help="run one side only (profiling)")
    parser.add_argument("--switches", action="store_true",
                        help="tunepipe only, once per VARIANTS entry, interleaved, plus the floor")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="with --switches: which variants")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="where the converted model is kept")
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    args = parser.parse_args()

    check_prerequisites(need_llamafactory=not args.switches and args.only != "tunepipe")
    machine = machine_summary()
    print_machine(machine)
    base = base_model_dir(args.work_dir)
    if args.switches:
        return run_switches(args, base, machine)
    sides = [args.only] if args.only else list(SIDES)
    runs: dict[str, dict[str, list[dict]]] = {p: {s: [] for s in sides} for p in args.precision}
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        turn = 0
        for precision in args.precision:
            for round_no in range(1, args.rounds + 1):
                order = sides if turn % 2 == 0 else list(reversed(sides))
                turn += 1
                for side in order:
                    runs[precision][side].append(run_side(side, precision, round_no, tmp, base, args.steps))
    report(runs, machine, args)
    return 0


def run_switches(args: argparse.Namespace, base: Path, machine: dict) -> int:
    """Every variant once per round (order rotating), then the floor on the batches trained."""
    runs: dict[str, dict[str, list[dict]]] = {p: {v: [] for v in args.variants} for p in args.precision}
    floors: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-switches-") as tmp_name:
        tmp = Path(tmp_name)
        for precision in args.precision:
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(args.variants)
                for variant in args.variants[shift:] + args.variants[:shift]:
                    runs[precision][variant].append(
                        run_side("tunepipe", precision, round_no, tmp, base, args.steps, variant))
            floors[precision] = measure_floor(tmp, runs[precision][args.variants[0]][0], precision)
    report_switches(runs, floors)
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs, "floors": floors}, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def measure_floor(tmp: Path, trained: dict, precision: str) -> dict:
    """bench/train_floor.py on the batches tunepipe trained on, at the same precision."""
    batches = tmp / f"batches-{precision}.json"
    batches.write_text(json.dumps({"runs": {"fp32": {"tunepipe": [trained]}}}))
    cmd = [str(TUNEPIPE_PYTHON), "-P", str(BENCH / "train_floor.py"), "--batches-from", str(batches),
           "--dtype", "bfloat16" if precision == "bf16" else "float32", "--emit"]
    measured = run_measured(cmd, tmp / "logs" / f"floor-{precision}.log")
    require_ok(f"floor-{precision}", measured)
    print(f"[bench] floor-{precision:<16} {measured.result['tokens_per_s']:8.1f} tok/s at most", flush=True)
    return measured.result


def report_switches(runs: dict, floors: dict) -> None:
    print("\n| precision | variant | real tokens/s (all steps) | steady tokens/s (steps 2-N) | step 1 done after s "
          "| steady / floor | steady tokens per CPU s | per CPU s / floor's | first-batch loss | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for precision, by_variant in runs.items():
        floor, floor_cpu = floors[precision]["tokens_per_s"], floors[precision]["tokens_per_cpu_s"]
        for variant, results in by_variant.items():
            med = {key: statistics.median(r[key] for r in results)
                   for key in ("real_tokens_per_s", "steady_tokens_per_s", "first_step_after_s", "tokens_per_cpu_s")}
            print(f"| {precision} | {variant} | {med['real_tokens_per_s']:.1f} | {med['steady_tokens_per_s']:.1f} "
                  f"| {med['first_step_after_s']:.1f} | {100 * med['steady_tokens_per_s'] / floor:.0f}% "
                  f"| {med['tokens_per_cpu_s']:.1f} | {100 * med['tokens_per_cpu_s'] / floor_cpu:.0f}% "
                  f"| {results[0]['first_loss']} | {results[0]['losses'][-1]} |")
        print(f"| {precision} | floor (bench/train_floor.py, same batches) | {floor:.1f} | | | 100% "
              f"| {floor_cpu:.1f} | 100% | | |")


def report(runs: dict, machine: dict, args: argparse.Namespace) -> None:
    print("\n| precision | side | real tokens/s | train s | train CPU s | real / slot tokens | peak RSS MiB "
          "| first-batch loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for precision, by_side in runs.items():
        for side, results in by_side.items():
            tps = statistics.median(r["real_tokens_per_s"] for r in results)
            train_s = statistics.median(r["train_s"] for r in results)
            cpu_s = statistics.median(r["train_cpu_s"] for r in results)
            first = results[0]
            print(f"| {precision} | {side} | {tps:.1f} | {train_s:.1f} | {cpu_s:.1f} | {first['real_tokens']} / "
                  f"{first['slot_tokens']} | {max(r['max_rss_mib'] for r in results)} | {first['first_loss']} |")
    if len(next(iter(runs.values()))) == 2:
        for precision, by_side in runs.items():
            tp, lf = by_side["tunepipe"], by_side["llamafactory"]
            speedup = (statistics.median(r["real_tokens_per_s"] for r in tp)
                       / statistics.median(r["real_tokens_per_s"] for r in lf))
            mem = max(r["max_rss_mib"] for r in tp) / max(r["max_rss_mib"] for r in lf)
            cpu = (statistics.median(r["train_cpu_s"] / r["real_tokens"] for r in lf)
                   / statistics.median(r["train_cpu_s"] / r["real_tokens"] for r in tp))
            same_rows = tp[0]["first_batch"] == lf[0]["first_batch"]
            loss_diff = abs(tp[0]["first_loss"] - lf[0]["first_loss"]) / lf[0]["first_loss"]
            print(f"{precision}: tunepipe / LLaMA-Factory real tokens/s {speedup:.2f}x (target >= 3x), "
                  f"per CPU second {cpu:.2f}x; "
                  f"peak RSS ratio {mem:.2f} (target <= 1); same first-batch rows: {same_rows}; "
                  f"first-batch loss differs by {100 * loss_diff:.2f}% (target <= 1%)")
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
