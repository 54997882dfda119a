"""evaluate stage: did the fine-tune help? The tuned model and its base, scored side by side.

For each of the two models, one at a time (so only one is ever in memory):
teacher-forced `eval_loss`, `perplexity` and `token_accuracy` on the eval split, then
answers generated for the eval prompts scored with ROUGE-1/2/L and BLEU-4 (and
`identity_accuracy` when `eval.identity_keywords` is set). `metrics/eval.json` holds
`tuned`, `base` and `diff` (tuned - base) for every metric, plus `preference` (reward
margins) for preference-tuned models and `reward` (pairwise accuracy) for reward models.
A `stage: grpo` run is scored on its prompts by the mean of each reward it trained on
(`reward/<name>`, `reward`), beside the generation metrics (`rl_metrics.py`).
`reports/predictions.jsonl` holds one `{prompt, predict, label, base_predict}` per prompt.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.config import Config
from tunepipe.data.chat.named_templates import stop_words
from tunepipe.data.chat.templates import apply_template
from tunepipe.errors import TunepipeError
from tunepipe.evaluate.gen_metrics import corpus_scores, identity_accuracy
from tunepipe.evaluate.generation import Example, generate, generation_examples
from tunepipe.evaluate.images import EvalImages
from tunepipe.evaluate.lm_metrics import token_metrics
from tunepipe.evaluate.outputs import EVAL_METRICS, PREDICTIONS, log_report, write_outputs
from tunepipe.evaluate.pref_metrics import needs_reference, preference_logps, preference_metrics, split_kind
from tunepipe.evaluate.rl_metrics import reward_means
from tunepipe.io_utils import read_json
from tunepipe.layout import Layout
from tunepipe.models.base import fit_vocabulary
from tunepipe.models.trained import (
    base_dir_for,
    device_for,
    load_base,
    load_trained,
    require_trained,
    tokenizer_for,
    trained_source,
)

log = logging.getLogger(__name__)

@dataclass
class ModelScores:
    """What one model (tuned or base) scored on the eval split."""

    metrics: dict[str, float] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    logps: dict | None = None


def run_evaluate(cfg: Config, layout: Layout) -> dict:
    """Score tuned and base; write metrics/eval.json and reports/predictions.jsonl; return the report."""
    source = require_trained(trained_source(cfg, layout), cfg, layout)
    dataset = load_eval_split(layout)
    if cfg.train.stage == "rm":
        from tunepipe.evaluate.reward import run_reward_evaluate

        return run_reward_evaluate(cfg, layout, source, dataset)
    base_dir = base_dir_for(cfg, layout)
    tokenizer = apply_template(tokenizer_for(cfg, base_dir, source), cfg.data.template)  # its stop words
    vision = "media" in dataset.column_names  # a vision-language model's rows: forwards get their images
    # grpo is judged by its rewards on generated answers, so it always generates
    examples = (generation_examples(dataset, tokenizer, cfg.eval.max_predict_samples)
                if cfg.eval.predict_with_generate or cfg.train.stage == "grpo" else [])
    device = device_for()
    images = EvalImages.load(cfg, dataset, tokenizer, base_dir, layout.tokenized) if vision else None
    tuned = score_model(cfg, dataset, tokenizer, examples, "tuned",
                        lambda: load_trained(cfg, base_dir, source, device), base_dir, images)
    base = None
    if cfg.eval.compare_base or _wants_reference(cfg, dataset):
        base = score_model(cfg, dataset, tokenizer, examples if cfg.eval.compare_base else [], "base",
                           lambda: fit_vocabulary(load_base(cfg, base_dir, device, quantized=True), len(tokenizer)),
                           base_dir, images)
    report = build_report(cfg, dataset, tuned, base if cfg.eval.compare_base else None)
    if tuned.logps is not None:
        report["preference"] = preference_metrics(cfg.train, tuned.logps, base.logps if base else None)
    write_outputs(layout, report, predictions(tokenizer, examples, tuned, base))
    log_report(cfg, source, report)
    return report


def load_eval_split(layout: Layout):
    from datasets import load_from_disk

    path = layout.tokenized / "eval"
    if not path.is_dir():
        raise TunepipeError(f"{path}: no tokenized eval split", hint="run the tokenize stage first")
    # datasets 5 saves a zero-row split without data files and then cannot load it back,
    # so an empty split is recognised from its state file before loading.
    state = path / "state.json"
    empty = state.is_file() and not read_json(state).get("_data_files")
    if empty or len(dataset := load_from_disk(str(path))) == 0:
        raise TunepipeError(f"{path}: the eval split is empty",
                            hint="set data.val_size (e.g. 0.1) or data.eval_dataset")
    return dataset


def _wants_reference(cfg: Config, dataset) -> bool:
    return split_kind(dataset) in ("pairs", "kto") and needs_reference(cfg.train)


def score_model(cfg: Config, dataset, tokenizer, examples: list[Example], name: str,
                load: Callable[[], object], base_dir: Path, images: EvalImages | None = None) -> ModelScores:
    """Load one model, compute every figure on it, free it (`images`: the rows' images, a VLM's)."""
    log.info("evaluating the %s model", name)
    model = load()
    batch = cfg.train.per_device_eval_batch_size
    pad_id = tokenizer.pad_token_id
    scores = ModelScores()
    pairs = split_kind(dataset) == "pairs"
    if "prompt_ids" not in dataset.column_names or "input_ids" in dataset.column_names:  # not prompt-only rows
        inputs, labels = loss_columns(dataset)
        scores.metrics = token_metrics(model, inputs, labels, pad_id, batch, desc=f"{name} loss",
                                       extra_inputs=images("chosen_input_ids" if pairs else "input_ids")
                                       if images else None)
    if split_kind(dataset) in ("pairs", "kto") and cfg.train.stage in ("dpo", "kto"):
        scores.logps = preference_logps(model, dataset, pad_id, batch, desc=f"{name} log-probs",
                                        images=images)
    if examples:
        scores.answers = generate(model, tokenizer, [e.prompt_ids for e in examples], cfg.eval, batch,
                                  cfg.train.seed, desc=f"{name} generate", stop_words=stop_words(cfg.data.template),
                                  image_inputs=images.prompts(examples) if images else None)
        scores.metrics.update(corpus_scores(scores.answers, [e.label for e in examples]))
        if cfg.eval.identity_keywords:
            scores.metrics["identity_accuracy"] = identity_accuracy(scores.answers, cfg.eval.identity_keywords)
        if cfg.train.stage == "grpo":
            del model  # a reward model may be loaded next
            gc.collect()
            scores.metrics.update(reward_means(cfg, base_dir, tokenizer, examples, scores.answers))
            return scores
    del model
    gc.collect()
    return scores


def loss_columns(dataset) -> tuple[list, list]:
    """The sequences the loss is measured on: the answer of SFT / pretraining rows, the
    chosen answer of pairs, the desirable rows of KTO (pushing undesirable ones down is
    the point of KTO, so their likelihood is not a quality)."""
    kind = split_kind(dataset)
    if kind == "pairs":
        return dataset["chosen_input_ids"], dataset["chosen_labels"]
    if kind == "kto":
        keep = [i for i, tag in enumerate(dataset["kto_tag"]) if tag]
        subset = dataset.select(keep)
        return subset["input_ids"], subset["labels"]
    return dataset["input_ids"], dataset["labels"]


def build_report(cfg: Config, dataset, tuned: ModelScores, base: ModelScores | None) -> dict:
    report: dict = {"eval_rows": len(dataset), "predict_samples": len(tuned.answers),
                    "tuned": _rounded(tuned.metrics)}
    if base is not None:
        report["base"] = _rounded(base.metrics)
        report["diff"] = {key: round(tuned.metrics[key] - base.metrics[key], 6)
                          for key in tuned.metrics if key in base.metrics and key != "eval_tokens"}
    return report


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value if isinstance(value, int) else round(value, 6) for key, value in metrics.items()}


def predictions(tokenizer, examples: list[Example], tuned: ModelScores,
                base: ModelScores | None) -> list[dict]:
    rows = []
    for index, example in enumerate(examples):
        row = {"prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=False),
               "predict": tuned.answers[index], "label": example.label}
        if base is not None and base.answers:
            row["base_predict"] = base.answers[index]
        rows.append(row)
    return rows


def print_table(report: dict) -> None:
    """tuned / base / diff, one metric a line: what `tunepipe eval` and `make demo` show."""
    tuned, base, diff = report.get("tuned", {}), report.get("base", {}), report.get("diff", {})
    print(f"{'metric':<20} {'tuned':>12} {'base':>12} {'diff':>12}")
    for key, value in tuned.items():
        cells = [f"{value:>12.4f}"] + [f"{col[key]:>12.4f}" if key in col else f"{'':>12}" for col in (base, diff)]
        print(f"{key:<20} {' '.join(cells)}")
    for key, value in report.get("preference", {}).items():
        print(f"{key:<20} {value:>12.4f}")


def print_report(report: dict, layout: Layout) -> None:
    """What `tunepipe eval` prints (it runs through `tunepipe.pipeline`, which makes the data first)."""
    print_table(report)
    print(f"wrote {Path(layout.metrics) / EVAL_METRICS} and {Path(layout.reports) / PREDICTIONS}")

