"""Parity for videos: tunepipe's qwen2_vl / qwen3_vl rows of LLaMA-Factory's mllm_video_demo against LLaMA-Factory 0.9.5's.

Both sides tokenize the demo's three clips (an .mp4 at 25 fps, an .avi, an .mp4 at 23.976 fps)
with the same tiny model's tokenizer and processor config (qwen2_vl: tests/fixtures/tiny_vlm.py;
qwen3_vl: tests/fixtures/tiny_vlm_families.py, whose rows carry Qwen3-VL's per-patch timestamps)
and the same video keys; each row's input_ids and labels are compared. It also compares the pixels
each side feeds the model: LLaMA-Factory's come from transformers' Qwen2-VL video processor
(torchvision), tunepipe's from the same settings run through the PIL image processor
(docs/architecture.md, "Vision-language models"): the grids must be equal; the values differ
by the resize interpolation (printed: tunepipe's processing of LLaMA-Factory's own frames) and
by the decoder when the two venvs' PyAV (FFmpeg) versions differ (printed: end to end).

    .venv/bin/python bench/video_parity.py [--template qwen3_vl] [--video-maxlen 4] [--video-max-pixels 4096]
                                           [--write-fixture]

`--write-fixture` writes tests/fixtures/video_parity/<template>_mllm_video_demo.json (the keys and
LLaMA-Factory's ids and labels), which tests/test_vlm_video.py (qwen2_vl) and
tests/test_vlm_video_qwen3.py (qwen3_vl) check on every `make test`.
Needs `bash bench/setup_llamafactory.sh` (LF_VENV selects another LLaMA-Factory venv). Runs in
the project's venv (it imports tunepipe); LLaMA-Factory runs in its own (bench/lf_video_driver.py).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
from pathlib import Path

from _common import (
    DEFAULT_WORK,
    LF_DEMO,
    LF_PYTHON,
    REPO,
    machine_summary,
    print_machine,
    require_ok,
    run_measured,
)

FIXTURES = REPO / "tests" / "fixtures" / "video_parity"
DATASET = "mllm_video_demo"


def tiny_model(template: str, path: Path) -> Path:
    """The tests' tiny model of the template's family."""
    from tests.fixtures.tiny_vlm import build_tiny_qwen2vl_dir
    from tests.fixtures.tiny_vlm_families import build_qwen3_vl

    return {"qwen2_vl": build_tiny_qwen2vl_dir, "qwen3_vl": build_qwen3_vl}[template](path)


def tunepipe_rows(model: Path, template: str, keys: dict, work: Path):
    """tunepipe's validate + tokenize on the demo (in this process), and its media tokens."""
    from datasets import load_from_disk
    from tests.test_tokenize import run_stages

    from tunepipe.data.vision import MediaTokens
    from tunepipe.models.base import load_tokenizer

    cfg, layout, _ = run_stages(work / "tunepipe", model, LF_DEMO, DATASET, template=template, **keys)
    shards = load_from_disk(str(layout.tokenized / "train"))
    return shards, MediaTokens.for_data(model, load_tokenizer(model), cfg.data)


def lf_side(model: Path, template: str, keys: dict, work: Path) -> Path:
    out = work / "lf"
    out.mkdir(parents=True, exist_ok=True)
    lf = {"model_name_or_path": str(model), "do_train": True, "finetuning_type": "lora", "stage": "sft",
          "dataset_dir": str(LF_DEMO), "dataset": DATASET, "template": template, "overwrite_cache": True,
          "output_dir": str(out / "lf-out"), "report_to": "none", "use_cpu": True, **keys}
    config = work / "lf-args.json"
    config.write_text(json.dumps({"lf": lf, "out": str(out)}))
    measured = run_measured([str(LF_PYTHON), "-P", str(Path(_HERE) / "lf_video_driver.py"), str(config)],
                            work / "lf.log", env={"HF_DATASETS_CACHE": str(work / "hf-cache")})
    require_ok("LLaMA-Factory", measured)
    print(f"[bench] LLaMA-Factory: {measured.result}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", choices=("qwen2_vl", "qwen3_vl"), default="qwen2_vl")
    parser.add_argument("--video-maxlen", type=int, default=4)
    parser.add_argument("--video-max-pixels", type=int, default=64 * 64)
    parser.add_argument("--cutoff-len", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK / "video_parity")
    parser.add_argument("--write-fixture", action="store_true")
    args = parser.parse_args()
    if not LF_PYTHON.is_file():
        sys.exit(f"{LF_PYTHON} is missing: run `bash bench/setup_llamafactory.sh` first")
    print_machine(machine_summary())
    import shutil

    import numpy as np

    sys.path.insert(0, str(REPO))  # the tiny model and run_stages are the tests' own
    shutil.rmtree(args.work, ignore_errors=True)
    model = tiny_model(args.template, args.work / f"tiny-{args.template}")
    keys = {"video_maxlen": args.video_maxlen, "video_max_pixels": args.video_max_pixels,
            "cutoff_len": args.cutoff_len}
    lf_out = lf_side(model, args.template, keys, args.work)
    lf = json.loads((lf_out / "rows.json").read_text())
    shards, media = tunepipe_rows(model, args.template, keys, args.work)
    equal = [row["input_ids"] == ids and row["labels"] == labels
             for row, ids, labels in zip(shards, lf["input_ids"], lf["labels"])]
    print(f"[bench] {args.template} / {DATASET}: ids and labels equal on {sum(equal)} / {len(lf['input_ids'])} rows "
          f"(tunepipe has {len(shards)})")
    from PIL import Image

    from tunepipe.data.video import Clip

    for k, row in enumerate(shards):
        ours = media.video_inputs(json.loads(row["media"])["videos"])
        theirs, grid = np.load(lf_out / f"pixels{k}.npy"), np.load(lf_out / f"grid{k}.npy")
        diff = np.abs(ours["pixel_values_videos"].numpy() - theirs)
        # the same frames (LLaMA-Factory's decode) through tunepipe's processing: the processor part alone
        frames = [Image.fromarray(frame) for frame in np.load(lf_out / f"frames{k}.npy")]
        alone = np.abs(media.video.pixels([Clip(frames, 0.0)])["pixel_values_videos"].numpy() - theirs)
        print(f"[bench] row {k}: grid {ours['video_grid_thw'].tolist()} vs {grid.tolist()}; pixel values |diff| "
              f"max {diff.max():.4f} mean {diff.mean():.5f}, from LLaMA-Factory's frames max {alone.max():.4f} "
              f"mean {alone.mean():.5f} (LLaMA-Factory's mean |value| {np.abs(theirs).mean():.3f})")
    if args.write_fixture:
        fixture = FIXTURES / f"{args.template}_{DATASET}.json"
        fixture.parent.mkdir(parents=True, exist_ok=True)
        fixture.write_text(json.dumps({"keys": keys, "template": args.template, "dataset": DATASET,
                                       "input_ids": lf["input_ids"], "labels": lf["labels"]}) + "\n")
        print(f"[bench] wrote {fixture}")
    return 0 if all(equal) and len(equal) == len(shards) else 1


if __name__ == "__main__":
    sys.exit(main())
