"""evaluate for `stage: rm`: how often the reward model ranks the chosen answer first.

A reward model is scored on the eval pairs alone: `pairwise_accuracy` (pairs whose
chosen answer gets the higher reward), the mean `score_margin` (chosen - rejected)
and the mean scores. There is no base column: the base has no value head, and one
initialised at random would only measure noise. Nothing is generated, so
`reports/predictions.jsonl` stays empty. The model is loaded the way
`tunepipe score` loads it (`tunepipe.evaluate.scoring.load_reward_model`).
"""

from __future__ import annotations

import logging

from tunepipe.config import Config
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.lm_metrics import batched, model_device, padded
from tunepipe.evaluate.outputs import log_report, write_outputs
from tunepipe.evaluate.pref_metrics import split_kind
from tunepipe.layout import Layout
from tunepipe.models.trained import (
    TrainedSource,
    base_dir_for,
    device_for,
    quantization_config,
    tokenizer_for,
)

log = logging.getLogger(__name__)


def reward_scores(model, rows, pad_id: int, batch_size: int, desc: str) -> list[float]:
    """The value head's output at each row's last token (right padding, as in training)."""
    import torch
    from tqdm.auto import tqdm

    scores: list[float] = []
    with torch.inference_mode():
        for index in tqdm(list(batched(len(rows), batch_size)), desc=desc, unit="batch"):
            ids, mask = padded([rows[i] for i in index], pad_id)
            device = model_device(model)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores.extend(logits.squeeze(-1).float().cpu().tolist())
    return scores


def pairwise_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    count = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"pairwise_accuracy": sum(m > 0 for m in margins) / count, "score_margin": sum(margins) / count,
            "score_chosen": sum(chosen) / count, "score_rejected": sum(rejected) / count, "eval_pairs": count}


def run_reward_evaluate(cfg: Config, layout: Layout, source: TrainedSource, dataset) -> dict:
    from tunepipe.evaluate.scoring import load_reward_model

    if split_kind(dataset) != "pairs":
        raise TunepipeError(f"{layout.tokenized / 'eval'}: stage rm is evaluated on chosen/rejected pairs, "
                            "but the eval split has none", hint="use a preference dataset for data.eval_dataset")
    base_dir = base_dir_for(cfg, layout)
    tokenizer = tokenizer_for(cfg, base_dir, source)
    quantization = quantization_config(cfg) if cfg.model.quantization_bit else None
    model = load_reward_model(source.paths[-1], base_dir, tokenizer.pad_token_id, cfg.model.dtype, quantization)
    if quantization is None:  # a quantized model is placed on its device when loaded
        model.to(device_for())
    batch = cfg.train.per_device_eval_batch_size
    chosen = reward_scores(model, dataset["chosen_input_ids"], tokenizer.pad_token_id, batch, "reward chosen")
    rejected = reward_scores(model, dataset["rejected_input_ids"], tokenizer.pad_token_id, batch, "reward rejected")
    report = {"eval_rows": len(dataset), "predict_samples": 0, "tuned": pairwise_metrics(chosen, rejected)}
    write_outputs(layout, report, [])
    log_report(cfg, source, report)
    return report
