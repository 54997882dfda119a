"""`tunepipe train cfg.yaml` on a tiny Qwen2-VL and LLaMA-Factory's own mllm_demo and mllm_video_demo
(sharegpt rows with <image> / <video> placeholders and images / videos lists), as a user runs it; then the evaluate stage (in this process:
one child process is enough) loads the trained adapter and scores the eval rows with their images."""

from __future__ import annotations

import json
import math

from tests.e2e.cli_runs import run_cli, write_config

from tunepipe.config.loader import load_config
from tunepipe.evaluate.run import run_evaluate
from tunepipe.layout import Layout


def test_train_then_eval_a_vision_language_lora(tmp_path, tiny_qwen2vl_dir, lf_demo_dir):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "vlm.yaml", tiny_qwen2vl_dir, out, dataset="mllm_demo,mllm_video_demo",
                       dataset_dir=str(lf_demo_dir), template="qwen2_vl", cutoff_len=1024, val_size=2,
                       image_max_pixels=112 * 112, video_max_pixels=64 * 64, video_maxlen=4, max_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=1, freeze_vision_tower=True, lora_target="all")
    trained = run_cli("train", str(cfg))
    assert trained.returncode == 0, trained.stderr[-3000:]
    adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    assert targets and all("language_model" in name for name in targets)  # never the vision tower
    validation = json.loads((out / "reports" / "validation.json").read_text())
    raw = json.loads((lf_demo_dir / "mllm_demo.json").read_text())
    assert validation["datasets"]["mllm_demo"]["media"]["images"] == sum(len(row["images"]) for row in raw)
    assert validation["datasets"]["mllm_video_demo"]["media"]["videos"] == 3
    train_metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert math.isfinite(train_metrics["train_loss"])

    run_evaluate(load_config(cfg, []), Layout.at(out))
    metrics = json.loads((out / "metrics" / "eval.json").read_text())
    tuned = metrics.get("tuned", metrics)
    assert math.isfinite(tuned["eval_loss"]) and tuned["eval_tokens"] > 0
