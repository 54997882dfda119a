"""GRPO speed on this machine: optimizer steps/s and generated tokens/s of `stage: grpo` on
SmolLM2-135M-Instruct (converted once from the embedded GGUF, as the other benchmarks do), on
the project's arithmetic questions with the recipe's rewards, LoRA, float32, transformers
generation, for each `num_generations` asked for (one prompt's group per optimizer step).

    .venv/bin/python bench/grpo_speed.py --generations 4 8 --steps 4 --completion-tokens 32

Generated tokens are counted from TRL's per-step `completions/mean_length` (x completions per
step); steps/s and tokens/s are over Trainer.train's runtime (generation, reward, loss and
optimizer together; model load and data preparation excluded). Run from the repo root.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]  # bench/tokenize.py

import argparse
import json
import shutil
from pathlib import Path

from _common import DEFAULT_WORK, base_model_dir

REPO = Path(_HERE).parent


def run(generations: int, steps: int, completion_tokens: int, work: Path) -> dict:
    from tunepipe.config.loader import load_config
    from tunepipe.layout import Layout
    from tunepipe.pipeline import run_train_steps

    out = work / f"grpo-g{generations}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"model_name_or_path={base_model_dir(work)}", "stage=grpo", "finetuning_type=lora",
                 "dataset=arithmetic", f"dataset_dir={REPO / 'data'}", "cutoff_len=256", "val_size=0",
                 "reward_funcs=[configs/rewards/arithmetic.py:correct_answer,configs/rewards/arithmetic.py:answer_format]",
                 f"num_generations={generations}", f"max_completion_length={completion_tokens}",
                 f"per_device_train_batch_size={generations}", "gradient_accumulation_steps=1",
                 f"max_steps={steps}", f"save_steps={steps}", "logging_steps=1", "learning_rate=1e-5",
                 "eval_strategy=no", f"output_dir={out}", "report_to=none", "seed=0"]
    cfg = load_config(None, overrides)
    layout = Layout.at(out)
    run_train_steps(cfg, layout)
    summary = json.loads((layout.metrics / "train.json").read_text())
    state = json.loads((layout.checkpoints / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    lengths = [entry["completions/mean_length"] for entry in state["log_history"] if "completions/mean_length" in entry]
    generated = sum(length * generations for length in lengths)
    runtime = summary["runtime_s"]
    return {"num_generations": generations, "steps": summary["steps"], "runtime_s": runtime,
            "steps_per_s": round(summary["steps"] / runtime, 4), "generated_tokens": round(generated),
            "generated_tokens_per_s": round(generated / runtime, 2),
            "mean_completion_tokens": round(sum(lengths) / len(lengths), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = parser.parse_args()
    os.chdir(REPO)  # reward files resolve from the project root
    for generations in args.generations:
        result = run(generations, args.steps, args.completion_tokens, args.work)
        print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
