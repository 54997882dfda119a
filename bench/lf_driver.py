"""Runs LLaMA-Factory 0.9.5 for the benchmarks, inside bench/.lf-venv (never the project's venv).

    python lf_driver.py tokenize ARGS.json   # its own data loading + preprocessing, timed
    python lf_driver.py train ARGS.json      # its own `run_exp` (what llamafactory-cli train runs)
    python lf_driver.py rows ARGS.json       # every row's token ids per template (template_parity.py)

ARGS.json holds the LLaMA-Factory YAML keys as a JSON object. The last line printed is
`BENCH_RESULT {json}` with what was measured in this process. Imports nothing from tunepipe.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Appended, not prepended: bench/tokenize.py must never shadow the standard library's tokenize.
# (The parent starts this file with `python -P`, so its folder is not put first either.)
sys.path.append(str(Path(__file__).resolve().parent))

from _common import cpu_seconds, emit


def tokenize(args: dict) -> dict:
    """The same calls LLaMA-Factory's run_sft makes before it loads the model."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(dict(args))
    # Imports are not timed on either side: the first AutoConfig lookup imports the model's
    # modules lazily, so resolve it once before the timer (tp_driver.py does the same).
    from transformers import AutoConfig

    AutoConfig.from_pretrained(model_args.model_name_or_path)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    train = dataset_module["train_dataset"]
    tokens = arrow_tokens(train)
    return {"seconds": round(seconds, 3), "cpu_s": round(cpu, 3), "rows_out": len(train), "tokens": tokens}


def arrow_tokens(dataset) -> int:
    """Total input_ids length from the Arrow offsets (no Python lists: this must not add to peak RSS)."""
    import pyarrow.compute as pc

    column = dataset.data.column("input_ids")
    if dataset._indices is not None:  # a selected / shuffled view: count through the indices
        column = column.take(dataset._indices.column(0))
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0)


def rows(args: dict) -> dict:
    """For each template in `templates` and each (dataset, stage) in `datasets`: LLaMA-Factory's
    tokenized train rows, written as JSON lines to `rows_out`. The tokenizer is loaded afresh
    per template because LLaMA-Factory's template setup changes it (EOS, stop words)."""
    import time_machine
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    # LLaMA-Factory writes the clock's date into llama3 tool prompts; tunepipe writes
    # data.template_date. Both sides compare on the same day with LLaMA-Factory's clock held there.
    with time_machine.travel(args.pop("today"), tick=False):
        return _rows_on_this_day(args, get_dataset, get_template_and_fix_tokenizer, get_train_args, load_tokenizer)


def _rows_on_this_day(args: dict, get_dataset, get_template_and_fix_tokenizer, get_train_args, load_tokenizer):
    counts = {}
    models = args.pop("models", {})  # multimodal mode: each template's own (tiny) model dir
    with open(args.pop("rows_out"), "w", encoding="utf-8") as out:
        for template in args.pop("templates"):
            for dataset, stage in args["datasets"]:
                lf = {k: v for k, v in args.items() if k != "datasets"}
                lf.update(template=template, dataset=dataset, stage=stage)
                lf["model_name_or_path"] = models.get(template, lf["model_name_or_path"])
                model_args, data_args, training_args, _, _ = get_train_args(lf)
                tokenizer_module = load_tokenizer(model_args)
                fixed = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
                try:
                    module = get_dataset(fixed, model_args, data_args, training_args, stage=stage,
                                         **tokenizer_module)
                except ValueError as exc:  # e.g. a multimodal template without the model's processor
                    out.write(json.dumps({"template": template, "dataset": dataset, "stage": stage,
                                          "error": str(exc)}) + "\n")
                    continue
                train = module["train_dataset"]
                keep = [c for c in train.column_names if c.endswith(("input_ids", "labels")) or c == "kto_tags"]
                table = {c: list(train[c]) for c in keep}
                out.write(json.dumps({"template": template, "dataset": dataset, "stage": stage,
                                      "columns": table}) + "\n")
                counts[f"{template}/{dataset}"] = len(train)
    return {"rows": counts}


def train(args: dict) -> dict:
    import trainer_probe
    from llamafactory.train.tuner import run_exp

    probe = trainer_probe.install()
    start = time.perf_counter()
    run_exp(dict(args))
    result = probe.summary()
    result["run_exp_s"] = round(time.perf_counter() - start, 3)
    return result


def main() -> int:
    command, args_path = sys.argv[1], sys.argv[2]
    args = json.loads(Path(args_path).read_text(encoding="utf-8"))
    result = {"tokenize": tokenize, "train": train, "rows": rows}[command](args)
    import llamafactory
    import torch
    import transformers

    result["versions"] = {"llamafactory": llamafactory.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__}
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
