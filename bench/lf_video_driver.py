"""LLaMA-Factory 0.9.5's side of bench/video_parity.py, run inside its venv (bench/.lf-venv).

    python -P lf_video_driver.py ARGS.json

ARGS.json: `lf` (LLaMA-Factory's YAML keys), `out` (a folder). Writes `rows.json` (the train
rows' input_ids and labels, as LLaMA-Factory's get_dataset makes them) and, per row of the
dataset, `pixels<k>.npy` / `grid<k>.npy`: the pixel_values_videos and video_grid_thw its
Qwen-VL plugin feeds the model (transformers' video processor, with torchvision), and
`frames<k>.npy`: the regularized frames they came from (decoded by its PyAV). Prints
`BENCH_RESULT {json}` last. Imports nothing from tunepipe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

from _common import emit


def main() -> int:
    import numpy as np
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(args["out"])
    model_args, data_args, training_args, _, _ = get_train_args(args["lf"])
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    train = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
    (out / "rows.json").write_text(json.dumps({"input_ids": list(train["input_ids"]),
                                               "labels": list(train["labels"])}), encoding="utf-8")
    dataset_dir = Path(args["lf"]["dataset_dir"])
    raw = json.loads((dataset_dir / f"{args['lf']['dataset']}.json").read_text(encoding="utf-8"))
    processor = module["processor"]
    for k, row in enumerate(raw):
        inputs = template.mm_plugin._get_mm_inputs([], [str(dataset_dir / v) for v in row["videos"]], [], processor)
        np.save(out / f"pixels{k}.npy", inputs["pixel_values_videos"].numpy())
        np.save(out / f"grid{k}.npy", inputs["video_grid_thw"].numpy())
        frames = template.mm_plugin._regularize_videos(  # the frames those pixels came from (its decoder)
            [str(dataset_dir / v) for v in row["videos"]], image_max_pixels=processor.video_max_pixels,
            image_min_pixels=processor.video_min_pixels, video_fps=processor.video_fps,
            video_maxlen=processor.video_maxlen)["videos"][0]
        np.save(out / f"frames{k}.npy", np.stack([np.asarray(frame) for frame in frames]))
    import llamafactory
    import transformers

    emit({"rows": len(train), "video_processor": type(processor.video_processor).__name__,
          "versions": {"llamafactory": llamafactory.__version__, "transformers": transformers.__version__}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
