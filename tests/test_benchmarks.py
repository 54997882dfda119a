"""The benchmark stage on a local multiple-choice task whose right answers are known.

The tuned model is the tiny base plus a LoRA adapter on lm_head built to prefer the answer "B"
at the scoring position, so its accuracy is exactly the share of questions whose answer is B;
the base's accuracy is computed here from its own logits. The adapter is scored as a PEFT model,
never merged; the same adapter merged into models/full is scored as a full fine-tune. A real
seeded LoRA training (`tunepipe train`) on the answers the base does not prefer takes the task
from 0 to 1, with the base weights unchanged on disk and the figures in the train run's MLflow
run. Bad task names and unreachable data fail before any model is loaded, also through
`tunepipe eval`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.evaluate import benchmarks
from tunepipe.layout import Layout

ANSWERS = [1, 1, 1, 0, 1, 0, 1, 1]  # B B B A B A B B: a model that always says B scores 6/8
TASK = {"task": "known_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "known_mc.json"}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question {{n}}\nAnswer:",
        # no delimiter: each choice is one token scored at the context's last position
        "doc_to_choice": ["A", "B"], "doc_to_target": "answer", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def contexts() -> list[str]:
    return [f"Question {n}\nAnswer:" for n in range(len(ANSWERS))]


def last_position_inputs(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_head's input and the logits at each context's last token."""
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1].detach()))
    logits = []
    with torch.no_grad():
        for text in contexts():
            ids = tokenizer(text, return_tensors="pt").input_ids
            logits.append(model(ids).logits[0, -1])
    hook.remove()
    return torch.stack(seen), torch.stack(logits)


def choice_ids(tokenizer) -> list[int]:
    ids = []
    for choice in ("A", "B"):
        whole, ctx = tokenizer(contexts()[0] + choice).input_ids, tokenizer(contexts()[0]).input_ids
        assert whole[: len(ctx)] == ctx and len(whole) == len(ctx) + 1, "a choice must be one token after the context"
        ids.append(whole[-1])
    return ids


def prefer_b_adapter(base_dir: Path, out: Path) -> float:
    """Save a rank-1 LoRA on lm_head adding a large logit to "B" at every scoring position; return
    the base model's own accuracy on the task."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    a_id, b_id = choice_ids(tokenizer)
    hidden, logits = last_position_inputs(model, tokenizer)
    base_picks = (logits[:, b_id] > logits[:, a_id]).long().tolist()
    base_acc = sum(p == a for p, a in zip(base_picks, ANSWERS)) / len(ANSWERS)
    direction = hidden.mean(0) / hidden.mean(0).norm()
    reach = (hidden @ direction).min().item()
    assert reach > 0, "the scoring positions' hidden states share no direction"
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"]))
    with torch.no_grad():
        layer = peft_model.base_model.model.lm_head
        layer.lora_A["default"].weight.copy_(direction[None, :])
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[b_id, 0] = 100.0 / reach
    peft_model.save_pretrained(str(out))
    return base_acc


def untied_copy(base_dir: Path, out: Path) -> Path:
    """The tiny model with its own lm_head (a LoRA on a tied lm_head breaks HFLM's tie_weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    return out


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def known_task(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # task YAML paths and their data files are relative to the run's directory
    (tmp_path / "known_mc.json").write_text(json.dumps([{"n": n, "answer": a} for n, a in enumerate(ANSWERS)]))
    (tmp_path / "known_mc.yaml").write_text(yaml.safe_dump(TASK))
    return tmp_path


def record_scored_models(monkeypatch) -> list[tuple[str, str]]:
    """(which model, its class) for every model the benchmark code scores, filled as it runs."""
    scored = []
    real_run = benchmarks.run_tasks

    def spy(model, tokenizer, loaded, eval_cfg, name):
        scored.append((name, type(model).__name__))
        return real_run(model, tokenizer, loaded, eval_cfg, name)

    monkeypatch.setattr(benchmarks, "run_tasks", spy)
    return scored


def test_known_answers_give_the_expected_accuracy_for_the_unmerged_adapter_and_the_base(
        known_task, tiny_model_dir, monkeypatch):
    adapter, base_dir = known_task / "adapter", untied_copy(tiny_model_dir, known_task / "base")
    base_acc = prefer_b_adapter(base_dir, adapter)
    before = tree_hash(adapter)
    scored = record_scored_models(monkeypatch)
    cfg = load_config(None, [f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter}",
                             "tasks=[known_mc.yaml]", "report_to=none", "batch_size=4"])
    report = benchmarks.run_benchmarks(cfg, Layout.at(known_task / "out"))

    cell = report["benchmarks"]["known_mc"]["acc"]
    assert cell["tuned"] == pytest.approx(ANSWERS.count(1) / len(ANSWERS))
    assert cell["base"] == pytest.approx(base_acc)
    assert cell["diff"] == pytest.approx(cell["tuned"] - cell["base"], abs=1e-6)
    assert cell["stderr"] > 0 and report["documents"] == {"known_mc": len(ANSWERS)}
    assert scored == [("tuned", "PeftModel"), ("base", "LlamaForCausalLM")]
    assert tree_hash(adapter) == before  # read, never merged or rewritten
    on_disk = json.loads((known_task / "out" / "metrics" / "benchmarks.json").read_text())
    assert on_disk == report
    # the same inputs give the same bytes (harness seeds fixed, no clock in the report)
    again = benchmarks.run_benchmarks(cfg, Layout.at(known_task / "out2"))
    assert again == report


def test_a_full_fine_tune_is_scored_as_itself(known_task, tiny_model_dir, monkeypatch):
    """finetuning_type full: models/full is the tuned model (no adapter), here the prefer-B LoRA merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = untied_copy(tiny_model_dir, known_task / "base")
    prefer_b_adapter(base_dir, known_task / "adapter")
    layout = Layout.at(known_task / "out")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(known_task / "adapter"))
    merged.merge_and_unload().save_pretrained(str(layout.full))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(layout.full))  # a full run keeps its own
    scored = []
    real_run = benchmarks.run_tasks
    monkeypatch.setattr(benchmarks, "run_tasks", lambda model, *args: scored.append(type(model).__name__)
                        or real_run(model, *args))
    cfg = load_config(None, [f"model_name_or_path={base_dir}", "finetuning_type=full", "compare_base=false",
                             "tasks=[known_mc.yaml]", "report_to=none"])
    report = benchmarks.run_benchmarks(cfg, layout)
    assert report["benchmarks"]["known_mc"]["acc"]["tuned"] == pytest.approx(ANSWERS.count(1) / len(ANSWERS))
    assert "base" not in report["benchmarks"]["known_mc"]["acc"] and scored == ["LlamaForCausalLM"]


def test_no_tasks_writes_an_empty_report_and_loads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "load_base", _no_model)
    cfg = load_config(None, ["report_to=none"])
    assert benchmarks.run_benchmarks(cfg, Layout.at(tmp_path)) == {"benchmarks": {}}
    assert json.loads((tmp_path / "metrics" / "benchmarks.json").read_text()) == {"benchmarks": {}}


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_a_missing_task_yaml_fails_before_any_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmarks, "load_base", _no_model)
    monkeypatch.setattr(benchmarks, "load_trained", _no_model)
    cfg = load_config(None, ["tasks=[configs/benchmarks/nope.yaml]", "report_to=none"])
    with pytest.raises(TunepipeError, match=r"eval.tasks: configs/benchmarks/nope.yaml: no such task YAML"):
        benchmarks.run_benchmarks(cfg, Layout.at(tmp_path))
    assert not (tmp_path / "metrics").exists()


@pytest.fixture(scope="module")
def harness_index():
    """The harness's task index, built once for the module (indexing its YAMLs takes seconds)."""
    return benchmarks.task_manager(load_config(None, ["tasks=[mmlu]"]).eval)


def test_unknown_names_and_unreachable_data_are_named(harness_index):
    # the hub is offline here: arc_easy's data (allenai/ai2_arc) cannot be reached
    with pytest.raises(TunepipeError, match=r"'mmlu_tset' is not an lm-evaluation-harness task") as info:
        benchmarks.load_tasks(["mmlu_tset"], harness_index)
    assert "did you mean mmlu" in info.value.hint
    with pytest.raises(TunepipeError, match=r"eval.tasks: arc_easy: its data could not be loaded"):
        benchmarks.load_tasks(["arc_easy"], harness_index)


@pytest.mark.parametrize("task, error", [
    ("mmlu_tset", "error: eval.tasks: 'mmlu_tset' is not an lm-evaluation-harness task"),
    ("arc_easy", "error: eval.tasks: arc_easy: its data could not be loaded"),
])
def test_tunepipe_eval_stops_on_a_bad_task_before_loading_any_model(task, error, harness_index, tmp_path,
                                                                    monkeypatch, capsys):
    """`tunepipe eval` of an LLaMA-Factory eval YAML plus one bad harness task: the error, and not
    one model (base, adapter or tokenizer) read."""
    import transformers

    from tunepipe.cli import main as tunepipe

    for loader in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(loader, "from_pretrained", _no_model)
    monkeypatch.setattr(benchmarks, "task_manager", lambda eval_cfg: harness_index)
    config = tmp_path / "lf_eval.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "Qwen/Qwen3-0.6B", "task": "mmlu_test", "n_shot": 5,
                                      "tasks": [task], "output_dir": str(tmp_path / "out"), "report_to": "none"}))
    assert tunepipe(["eval", str(config)]) != 0
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics").exists()


def test_llamafactory_task_keys_map_to_harness_tasks(caplog):
    cfg = load_config(None, ["task=ceval_validation", "lang=zh", "n_shot=3", "tasks=[arc_easy]"])
    with caplog.at_level("INFO"):
        assert benchmarks.task_specs(cfg.eval) == ["arc_easy", "ceval-valid"]
    assert "eval.task ceval_validation (LLaMA-Factory) runs the lm-evaluation-harness task ceval-valid, 3-shot" \
        in caplog.text
    assert benchmarks.fewshot(cfg.eval) == 3
    assert benchmarks.fewshot(load_config(None, ["task=mmlu_test", "num_fewshot=0"]).eval) == 0
    assert benchmarks.fewshot(load_config(None, ["tasks=[mmlu]"]).eval) is None  # the task's own default
    with pytest.raises(TunepipeError, match=r"eval.task='mmlu_validation'.*mmlu_test, cmmlu_test, ceval_validation"):
        load_config(None, ["task=mmlu_validation"])


def test_benchmark_rows_pair_tuned_and_base():
    tuned = {"mmlu": {"acc": (0.5, 0.1)}}
    base = {"mmlu": {"acc": (0.25, None)}}
    assert benchmarks.benchmark_rows(tuned, base) == {
        "mmlu": {"acc": {"tuned": 0.5, "stderr": 0.1, "base": 0.25, "base_stderr": None, "diff": 0.25}}}
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": "N/A"}}
    assert benchmarks.scores(results, ["gsm8k"]) == {"gsm8k": {"exact_match_strict-match": (0.5, None)}}


def test_a_short_lora_training_on_the_answers_flips_the_tuned_accuracy_unmerged_and_logs_it(
        tmp_path, tiny_model_dir, mlflow_uri, monkeypatch):
    """A real training (the CLI's `tunepipe train`, seeded, 30 steps) on rows that teach the answers
    of a local task, the answers being the ones the base does not prefer: the base scores 0, the
    tuned model (the trained adapter over the base, scored as a PEFT model) scores 1, the base
    weights on disk are byte-for-byte what they were, and the figures reach the train run in MLflow."""
    from mlflow import MlflowClient

    from tunepipe.cli import main as tunepipe
    from tunepipe.models.trained import base_dir_for
    from tunepipe.tracking.tracker import read_run_record

    monkeypatch.chdir(tmp_path)
    answers = unpreferred_answers(tiny_model_dir)
    write_task(tmp_path, answers)
    config = write_teaching_run(tmp_path, tiny_model_dir, answers, mlflow_uri)
    assert tunepipe(["train", str(config)]) == 0

    cfg, layout = load_config(str(config)), Layout.at(tmp_path / "out")
    base_dir = base_dir_for(cfg, layout)
    assert base_dir == tiny_model_dir  # a local base is read in place: nothing may write into it
    before = tree_hash(base_dir), tree_hash(layout.adapter)
    scored = record_scored_models(monkeypatch)
    report = benchmarks.run_benchmarks(cfg, layout)

    cell = report["benchmarks"]["known_mc"]["acc"]
    assert (cell["base"], cell["tuned"], cell["diff"]) == (0.0, 1.0, 1.0)
    assert scored == [("tuned", "PeftModelForCausalLM"), ("base", "LlamaForCausalLM")]
    assert (tree_hash(base_dir), tree_hash(layout.adapter)) == before  # never merged, nothing rewritten
    run_id = read_run_record(layout.adapter)["mlflow_run_id"]
    logged = MlflowClient(tracking_uri=mlflow_uri).get_run(run_id).data.metrics
    assert {key: value for key, value in logged.items() if key.startswith("bench/")} == {
        "bench/known_mc/acc/tuned": 1.0, "bench/known_mc/acc/base": 0.0, "bench/known_mc/acc/diff": 1.0}


def unpreferred_answers(base_dir: Path) -> list[int]:
    """For each question, the choice (0: A, 1: B) the base model finds less likely at the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    a_id, b_id = choice_ids(tokenizer)
    _, logits = last_position_inputs(model, tokenizer)
    return [0 if prefers_b else 1 for prefers_b in (logits[:, b_id] > logits[:, a_id]).tolist()]


def write_task(folder: Path, answers: list[int]) -> None:
    (folder / "known_mc.json").write_text(json.dumps([{"n": n, "answer": a} for n, a in enumerate(answers)]))
    (folder / "known_mc.yaml").write_text(yaml.safe_dump(TASK))


def write_teaching_run(folder: Path, base_dir: Path, answers: list[int], mlflow_uri: str) -> Path:
    """A LLaMA-Factory-style YAML training a LoRA on "Question n / Answer:" -> the answer's letter.

    Template `empty`: the prompt's tokens are exactly the task's context and the answer's token
    the scored choice, so the training teaches what the benchmark asks."""
    data = folder / "data"
    data.mkdir()
    rows = [{"instruction": text, "input": "", "output": "AB"[a]} for text, a in zip(contexts(), answers)]
    (data / "teach.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"teach": {"file_name": "teach.json"}}))
    keys = {"model_name_or_path": str(base_dir), "dataset": "teach", "dataset_dir": str(data), "template": "empty",
            "cutoff_len": 32, "val_size": 0.0, "output_dir": str(folder / "out"), "finetuning_type": "lora",
            "lora_rank": 8, "max_steps": 30, "per_device_train_batch_size": len(rows),
            "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
            "logging_steps": 30, "save_steps": 1000, "seed": 0, "report_to": "mlflow", "tracking_uri": mlflow_uri,
            "tasks": ["known_mc.yaml"], "batch_size": 8}
    config = folder / "teach.yaml"
    config.write_text(yaml.safe_dump(keys))
    return config
