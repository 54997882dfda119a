"""`tunepipe train` on sliding-window / softcapped families is exact, then eval, export and chat.

The first logged loss of a one-step run whose single batch holds every training row (one
padding-free row, samples longer than the window) must equal the loss of each sample run
alone through the family's eager attention, for every family of tests/fixtures/families.py:
e.g. Gemma 3 mixes windowed and full layers and trains on tunepipe's per-sample SDPA
(`flash_attn: auto` on CPU); Gemma 2 softcaps its attention logits and trains on eager. The Gemma 3 run then goes through
`tunepipe eval`, `tunepipe export` and `tunepipe chat`, whose answers must equal a
cache-free greedy decode.
"""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.fixtures.families import FAMILIES, WINDOW, build_family_dir, greedy_without_cache

from tunepipe.cli import main
from tunepipe.train.batches.collate import IGNORE_INDEX

ROWS = [
    {"instruction": "Give three tips for staying healthy.",
     "output": "Eat well, exercise, and sleep. The quick brown fox jumps over the lazy dog every day."},
    {"instruction": "What is the capital of France?",
     "output": "The capital of France is Paris. Bonjour, je suis un assistant. Hola, soy un asistente."},
    {"instruction": "Who are you?", "input": "Answer in one sentence.",
     "output": "I am a helpful assistant built to answer questions about 0123456789 and more."},
    {"instruction": "Say hello in three languages.",
     "output": "你好，我是一个助手。 Bonjour, je suis un assistant. Hola, soy un asistente."},
    {"instruction": "Name a fast animal.", "output": "The quick brown fox jumps over the lazy dog."},
]


def write_config(tmp_path, model_dir, **extra) -> tuple:
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"fam": {"file_name": "rows.json"}}), encoding="utf-8")
    out = tmp_path / "out"
    config = {"model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "lora_target": "all", "lora_rank": 4, "dataset": "fam", "dataset_dir": str(data),
              "cutoff_len": 256, "output_dir": str(out), "overwrite_output_dir": True,
              "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 1,
              "logging_steps": 1, "learning_rate": 1e-3, "report_to": "none", **extra}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path, out


def first_loss(out) -> float:
    with open(out / "plots" / "train_loss.csv", newline="") as handle:
        return float(next(csv.DictReader(handle))["loss"])


def train_samples(out) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every training sample, packed rows split at their `seq_lens`."""
    from datasets import load_from_disk

    shard = load_from_disk(str(out / "data" / "tokenized" / "train"))
    lens = shard["seq_lens"] if "seq_lens" in shard.column_names else [[len(ids)] for ids in shard["input_ids"]]
    samples = []
    for ids, labels, row_lens in zip(shard["input_ids"], shard["labels"], lens, strict=True):
        start = 0
        for length in row_lens:
            samples.append((ids[start:start + length], labels[start:start + length]))
            start += length
    return samples


def per_sample_eager_loss(model_dir, out, **config_changes) -> float:
    """Mean next-token loss over the tokenized training samples, each run alone on eager attention."""
    from tunepipe.models.base import load_causal_lm

    model = load_causal_lm(model_dir, attn_implementation="eager", **config_changes)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in train_samples(out):
            assert len(ids) > WINDOW
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            targets = torch.tensor(labels[1:])
            total += F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize(("name", "packing"), [(name, False) for name in sorted(FAMILIES)] + [("gemma3", True)])
def test_tunepipe_train_first_loss_equals_each_sample_alone(tmp_path, name, packing):
    model_dir = build_family_dir(tmp_path / "model", name)
    config, out = write_config(tmp_path, model_dir, packing=packing)
    assert main(["train", str(config)]) == 0
    assert len(train_samples(out)) == len(ROWS)  # one step, one padding-free batch of every sample
    if packing:
        from datasets import load_from_disk

        lens = load_from_disk(str(out / "data" / "tokenized" / "train"))["seq_lens"]
        assert max(len(row) for row in lens) > 1  # rows really hold several samples
    want = per_sample_eager_loss(model_dir, out)
    assert first_loss(out) == pytest.approx(want, abs=1e-5)
    if not FAMILIES[name].windowed():
        return
    # the check has teeth: the same model without its window trains on another loss
    unwindowed = per_sample_eager_loss(model_dir, out, sliding_window=10_000)
    assert abs(unwindowed - want) > 1e-4  # ten times the tolerance above


def greedy_text(model, tokenizer, ids: list[int], new_tokens: int) -> str:
    from tunepipe.data.chat.chat_format import stop_token_ids

    stops = stop_token_ids(tokenizer, model.generation_config)
    return tokenizer.decode(greedy_without_cache(model, ids, new_tokens, stops), skip_special_tokens=True).strip()


def test_gemma3_eval_export_and_chat_through_the_cli(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from tunepipe.models.base import load_tokenizer

    model_dir = build_family_dir(tmp_path / "model", "gemma3")
    config, out = write_config(tmp_path, model_dir, max_steps=3, learning_rate=5e-2, val_size=0.4,
                               max_new_tokens=8, export_dir=str(tmp_path / "export"))
    assert main(["train", str(config)]) == 0
    assert main(["eval", str(config)]) == 0
    report = json.loads((out / "metrics" / "eval.json").read_text())
    assert report["tuned"]["eval_loss"] < report["base"]["eval_loss"]
    assert main(["export", str(config)]) == 0
    export = tmp_path / "export"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()  # plain transformers
    tokenizer = load_tokenizer(export)

    from datasets import load_from_disk

    from tunepipe.evaluate.generation import generation_examples

    predictions = [json.loads(line) for line in (out / "reports" / "predictions.jsonl").read_text().splitlines()]
    examples = generation_examples(load_from_disk(str(out / "data" / "tokenized" / "eval")), tokenizer, None)
    assert len(predictions) == len(examples) >= 1
    for prediction, example in zip(predictions, examples, strict=True):
        assert prediction["predict"] == greedy_text(model, tokenizer, example.prompt_ids, 8)

    chat_cfg = tmp_path / "chat.yaml"
    chat_cfg.write_text(f"model_name_or_path: {export}\nmax_new_tokens: 8\nreport_to: none\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France? Give three tips.\n/exit\n"))
    capsys.readouterr()
    assert main(["chat", str(chat_cfg)]) == 0
    printed = capsys.readouterr().out
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? Give three tips."}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(ids) > WINDOW
    want = greedy_text(model, tokenizer, ids, 8)
    assert want and printed.count("Assistant: ") == 1 and f"Assistant: {want}" in printed
