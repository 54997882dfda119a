"""Benchmark: rows/s and peak memory of tunepipe validate + tokenize vs LLaMA-Factory 0.9.5's
own preprocessing, at several dataset sizes in one run.

Data: ../shared/datasets/llamafactory-demo/alpaca_en_demo.json repeated to N rows (one JSON
array), written to a temporary folder with its dataset_info.json; both sides read that same
folder with the SmolLM2-135M-Instruct tokenizer, `template: chatml`, `cutoff_len: 1024`.
LLaMA-Factory uses 2 preprocessing workers (the machine has 2 cores) and a fresh cache;
tunepipe uses every core (`preprocessing_num_workers` unset). Each side runs in its own
subprocess; the rounds alternate which side goes first, because other work on the machine
makes timings drift. Peak memory is given twice: the largest single process (`wait4`'s
maxrss) and the summed PSS of the whole process tree (workers included), sampled every 0.1 s.

    .venv/bin/python bench/tokenize.py --rows 20000 200000 2000000 [--lf-max-rows 200000] [--floor]
    .venv/bin/python bench/tokenize.py [--rounds 2] [--repeat 20] [--own-template]   # 19,980 rows

Needs `make setup` and `bash bench/setup_llamafactory.sh`. Timed: from the start of the
work to the tokenized dataset (interpreter start-up and imports are not counted on
either side).
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/tokenize.py`, this folder would come first on sys.path and this file
# would shadow the standard library's tokenize module for everything imported later.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import (
    BENCH,
    DEFAULT_WORK,
    LF_DRIVER,
    LF_PYTHON,
    TUNEPIPE_PYTHON,
    alpaca_rows_dir,
    base_model_dir,
    check_prerequisites,
    machine_summary,
    print_machine,
    repeated_alpaca_dir,
    require_ok,
    run_measured,
)

FLOOR = "tokenizer-alone"  # the fast tokenizer encoding the same chats, nothing else


def tunepipe_config(base: Path, data_dir: Path, dataset: str, out: Path, cutoff_len: int,
                    own_template: bool) -> dict:
    cfg = {"model_name_or_path": str(base), "dataset": dataset, "dataset_dir": str(data_dir),
           "cutoff_len": cutoff_len, "output_dir": str(out), "overwrite_output_dir": True,
           "report_to": "none"}
    if not own_template:
        cfg["template"] = "chatml"
    return cfg


def lf_args(base: Path, data_dir: Path, dataset: str, out: Path, cutoff_len: int, workers: int) -> dict:
    return {"model_name_or_path": str(base), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": dataset, "dataset_dir": str(data_dir), "template": "chatml",
            "cutoff_len": cutoff_len, "preprocessing_num_workers": workers, "overwrite_cache": True,
            "cache_dir": str(out / "hf-cache"), "output_dir": str(out), "report_to": "none",
            "use_cpu": True}


def run_side(side: str, round_no: int, tmp: Path, base: Path, data_dir: Path, dataset: str,
             args: argparse.Namespace) -> dict:
    out = tmp / f"{side}-{round_no}"
    out.mkdir(parents=True)
    config = out.parent / f"{side}-{round_no}.json"  # JSON is YAML, so one file serves both sides
    if side == "llamafactory":
        config.write_text(json.dumps(lf_args(base, data_dir, dataset, out, args.cutoff_len, args.workers)))
        cmd = [str(LF_PYTHON), "-P", str(LF_DRIVER), "tokenize", str(config)]
        env = {"HF_DATASETS_CACHE": str(out / "hf-cache")}
    else:
        own = side == "tunepipe-own-template"
        config.write_text(json.dumps(tunepipe_config(base, data_dir, dataset, out, args.cutoff_len, own)))
        command = "floor" if side == FLOOR else "tokenize"
        cmd = [str(TUNEPIPE_PYTHON), "-P", str(BENCH / "tp_driver.py"), command, str(config)]
        env = {"HF_DATASETS_CACHE": str(out / "hf-cache")}
    load_before = os.getloadavg()[0]
    measured = run_measured(cmd, tmp / "logs" / f"{side}-{round_no}.log", env=env)
    require_ok(f"{side} round {round_no}", measured)
    result = dict(measured.result)
    result["rows_per_s"] = round(result["rows_out"] / result["seconds"], 1)
    result["process_wall_s"] = round(measured.wall_s, 2)
    result["max_rss_mib"] = round(measured.max_rss_mib)
    result["tree_rss_mib"] = round(measured.tree_rss_mib)
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"[bench] round {round_no} {side:<22} {result['seconds']:8.2f} s  {result['rows_per_s']:9.1f} rows/s  "
          f"CPU {result['cpu_s']:7.2f} s  rows {result['rows_out']}  tokens {result['tokens']}  "
          f"peak RSS {result['max_rss_mib']} MiB (tree PSS {result['tree_rss_mib']} MiB)  "
          f"load {result['load_avg_1m'][0]}->{result['load_avg_1m'][1]}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds per side (default: 2 with --repeat, 1 with --rows)")
    parser.add_argument("--repeat", type=int, default=20, help="copies of alpaca_en_demo.json (without --rows)")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="dataset sizes, e.g. 20000 200000 2000000")
    parser.add_argument("--lf-max-rows", type=int, default=200000,
                        help="LLaMA-Factory (and the tokenizer floor) only up to this size; above, tunepipe alone")
    parser.add_argument("--floor", action="store_true", help="with --rows: also time the tokenizer alone")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2, help="LLaMA-Factory preprocessing_num_workers")
    parser.add_argument("--own-template", action="store_true",
                        help="also time tunepipe with the tokenizer's own chat template (its default)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="where the converted model is kept")
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    args = parser.parse_args()

    check_prerequisites()
    machine = machine_summary()
    print_machine(machine)
    base = base_model_dir(args.work_dir)
    if args.rows:
        return by_size(args, machine, base)
    args.rounds = args.rounds or 2
    sides = ["tunepipe", "llamafactory", FLOOR] + (["tunepipe-own-template"] if args.own_template else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-tok-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir, dataset, rows = repeated_alpaca_dir(tmp, args.repeat)
        print(f"[bench] {rows} rows in {data_dir}; cutoff_len {args.cutoff_len}", flush=True)
        for round_no in range(1, args.rounds + 1):
            order = sides if round_no % 2 else list(reversed(sides))
            for side in order:
                runs[side].append(run_side(side, round_no, tmp, base, data_dir, dataset, args))
    report(runs, machine, args)
    return 0


def by_size(args: argparse.Namespace, machine: dict, base: Path) -> int:
    """--rows: every size in turn, each in its own temporary folder (removed before the next)."""
    rounds = args.rounds or 1
    table: list[tuple[int, str, dict]] = []
    for size in args.rows:
        sides = ["tunepipe"]
        if size <= args.lf_max_rows:
            sides += ["llamafactory"] + ([FLOOR] if args.floor else [])
        with tempfile.TemporaryDirectory(prefix="tunepipe-bench-tok-") as tmp_name:
            tmp = Path(tmp_name)
            data_dir, dataset, rows = alpaca_rows_dir(tmp, size)
            print(f"[bench] {rows} rows in {data_dir}; cutoff_len {args.cutoff_len}", flush=True)
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for round_no in range(1, rounds + 1):
                for side in sides if round_no % 2 else list(reversed(sides)):
                    runs[side].append(run_side(side, round_no, tmp, base, data_dir, dataset, args))
        table += [(size, side, median_run(results)) for side, results in runs.items()]
    size_report(table, machine, args)
    return 0


def median_run(results: list[dict]) -> dict:
    ordered = sorted(results, key=lambda r: r["rows_per_s"])
    return {**ordered[len(ordered) // 2], "max_rss_mib": max(r["max_rss_mib"] for r in results),
            "tree_rss_mib": max(r["tree_rss_mib"] for r in results)}


def size_report(table: list[tuple[int, str, dict]], machine: dict, args: argparse.Namespace) -> None:
    print(f"\nCPU: {machine['cpu']}, {machine['cores']} cores; load average (1 min) at start "
          f"{machine['load_avg_1m']} (the machine is shared: see the load beside each figure)")
    print("\n| rows | side | seconds | rows/s | CPU s | rows out | tokens | peak RSS MiB (largest process) | "
          "peak RSS MiB (process tree) | load avg 1m before -> after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, side, r in table:
        print(f"| {size} | {side} | {r['seconds']:.1f} | {r['rows_per_s']:.0f} | {r['cpu_s']:.1f} | {r['rows_out']} | "
              f"{r['tokens']} | {r['max_rss_mib']} | {r['tree_rss_mib']} | "
              f"{r['load_avg_1m'][0]} -> {r['load_avg_1m'][1]} |")
    figures = {(size, side): r for size, side, r in table}
    for size in args.rows:
        tp, lf = figures.get((size, "tunepipe")), figures.get((size, "llamafactory"))
        if tp and lf:
            print(f"{size} rows: tunepipe / LLaMA-Factory rows/s {tp['rows_per_s'] / lf['rows_per_s']:.2f}x "
                  f"(target >= 3x at 200k); same token count: {tp['tokens'] == lf['tokens']}")
    sizes = [size for size in args.rows if (size, "tunepipe") in figures]
    if len(sizes) > 1:
        small, large = sizes[-2], sizes[-1]
        growth = figures[(large, "tunepipe")]["tree_rss_mib"] / figures[(small, "tunepipe")]["tree_rss_mib"]
        print(f"tunepipe peak tree PSS at {large} rows / at {small} rows: {growth:.2f}x (target <= 1.10x)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": [{"rows": size, "side": side, **r}
                                                                      for size, side, r in table]}, indent=2) + "\n")
        print(f"figures written to {args.json}")


def report(runs: dict[str, list[dict]], machine: dict, args: argparse.Namespace) -> None:
    median = {side: statistics.median(r["rows_per_s"] for r in results) for side, results in runs.items()}
    cpu = {side: statistics.median(r["cpu_s"] for r in results) for side, results in runs.items()}
    print("\n| side | seconds (median) | rows/s (median) | CPU s (median) | rows out | tokens | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for side, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        print(f"| {side} | {seconds:.2f} | {median[side]:.1f} | {cpu[side]:.2f} | {results[0]['rows_out']} | "
              f"{results[0]['tokens']} | {max(r['max_rss_mib'] for r in results)} |")
    ratio = median["tunepipe"] / median["llamafactory"]
    print(f"\nratio tunepipe / LLaMA-Factory rows/s: {ratio:.2f}x (target >= 5x); "
          f"CPU-time ratio LLaMA-Factory / tunepipe: {cpu['llamafactory'] / cpu['tunepipe']:.2f}x")
    bound = median[FLOOR] / median["llamafactory"]
    print(f"the tokenizer alone, encoding the same chats on every core: {median[FLOOR]:.1f} rows/s, "
          f"{bound:.2f}x LLaMA-Factory: the highest ratio any implementation with this tokenizer can reach here")
    same = runs["tunepipe"][0]["tokens"] == runs["llamafactory"][0]["tokens"]
    print(f"same token count on both sides: {same}")
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs, "ratio": ratio, "bound": bound}, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
