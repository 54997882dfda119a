"""Runs tunepipe for the benchmarks, inside the project's .venv.

    python -P tp_driver.py tokenize CONFIG.yaml   # run_validate + run_tokenize, timed
    python -P tp_driver.py train CONFIG.yaml      # `tunepipe train CONFIG.yaml`, probed

The last line printed is `BENCH_RESULT {json}` with what was measured in this process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Appended, not prepended: bench/tokenize.py must never shadow the standard library's tokenize.
sys.path.append(str(Path(__file__).resolve().parent))

from _common import cpu_seconds, emit


def tokenize(config_path: str) -> dict:
    import pyarrow.compute as pc
    from datasets import load_from_disk
    from transformers import AutoConfig

    from tunepipe.config.loader import load_config
    from tunepipe.data.tokenize import run_tokenize
    from tunepipe.data.validate import run_validate
    from tunepipe.layout import Layout
    from tunepipe.models.base import ensure_base_model, follow_manifest

    cfg = load_config(config_path)
    layout = Layout.at(cfg.train.output_dir)
    ensure_base_model(cfg.model, layout.base_model)  # a manifest + hash, not part of the timing
    # Imports are not timed on either side. LLaMA-Factory has imported transformers' tokenizer
    # and Llama modules by the time its timer starts; here the first AutoConfig lookup imports
    # them lazily (py-spy: ~20% of this side's time), so resolve it once before the timer.
    AutoConfig.from_pretrained(str(follow_manifest(layout.base_model)))
    import datasets  # noqa: F401  (LLaMA-Factory has imported it before its timer too; ~0.9 s)

    start, cpu_start = time.perf_counter(), cpu_seconds()
    run_validate(cfg, layout)
    validated = time.perf_counter()
    run_tokenize(cfg, layout)
    end, cpu = time.perf_counter(), cpu_seconds() - cpu_start
    train = load_from_disk(str(layout.tokenized / "train"))  # memory-mapped: counts from the Arrow offsets
    tokens = int(pc.sum(pc.list_value_length(train.data.column("input_ids"))).as_py() or 0)
    return {"seconds": round(end - start, 3), "cpu_s": round(cpu, 3), "validate_s": round(validated - start, 3),
            "tokenize_s": round(end - validated, 3), "rows_out": len(train), "tokens": tokens,
            "workers": cfg.data.preprocessing_num_workers or "all cores"}


def floor(config_path: str) -> dict:
    """Only the tokenizer's own work: the fast tokenizer encoding the rendered chats that
    tokenize would encode, in the same chunks, on every core. Validation, rendering and
    reading are done before the timer. No implementation that uses this tokenizer can be
    faster than this, which bounds the ratio against LLaMA-Factory."""
    from tunepipe.config.loader import load_config
    from tunepipe.data.chat.templates import ChatFormat
    from tunepipe.data.checks.validated import read_manifest
    from tunepipe.data.tokenize import select_rows
    from tunepipe.data.tokenizing.batching import CHUNK, BatchEncoder
    from tunepipe.data.tokenizing.chunks import Job, read_plan_rows
    from tunepipe.data.validate import run_validate
    from tunepipe.layout import Layout
    from tunepipe.models.base import ensure_base_model, load_tokenizer

    cfg = load_config(config_path)
    layout = Layout.at(cfg.train.output_dir)
    ensure_base_model(cfg.model, layout.base_model)
    run_validate(cfg, layout)
    plans, sources = select_rows(read_manifest(layout.validated), layout.validated, cfg.data)
    rows = read_plan_rows(Job("sft", [], False, cfg.data, None, None, *sources["train"]), plans["train"])
    fmt = ChatFormat(load_tokenizer(layout.base_model), cfg.data.template)
    texts = [fmt.render(fmt.chat(row)) for row in rows]
    encode = BatchEncoder(fmt.tokenizer)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokens = sum(len(ids) for s in range(0, len(texts), CHUNK) for ids in encode(texts[s:s + CHUNK]))
    end, cpu = time.perf_counter(), cpu_seconds() - cpu_start
    return {"seconds": round(end - start, 3), "cpu_s": round(cpu, 3), "rows_out": len(texts), "tokens": tokens}


def train(config_path: str) -> dict:
    import trainer_probe

    from tunepipe.cli import main as tunepipe_main

    probe = trainer_probe.install()
    start = time.perf_counter()
    code = tunepipe_main(["train", config_path])
    if code:
        raise SystemExit(f"tunepipe train exited {code}")
    result = probe.summary()
    result["run_s"] = round(time.perf_counter() - start, 3)
    result["own_metrics"] = own_train_metrics(config_path)
    return result


def own_train_metrics(config_path: str) -> dict:
    """tunepipe's metrics/train.json, to cross-check the probe's counts."""
    from tunepipe.config.loader import load_config

    path = Path(load_config(config_path).train.output_dir) / "metrics" / "train.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def main() -> int:
    command, config_path = sys.argv[1], sys.argv[2]
    result = {"tokenize": tokenize, "floor": floor, "train": train}[command](config_path)
    import torch
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
