"""LLaMA-Factory's own example YAMLs, read from ../shared/llamafactory-examples/ as it ships them
(never copied), run through `tunepipe train` / `export` / `chat` against the local hub, where a
tiny random Qwen3 answers as `Qwen/Qwen3-4B-Instruct-2507`. Only `max_steps` / `max_samples`
are lowered (as command-line overrides), to keep the runs to seconds. The YAMLs name
LLaMA-Factory's `data/` folder and `saves/...` output dirs relative to where they run: the
run's folder has `data` pointing at LLaMA-Factory's demo data folder (read in place).

One more run trains on a hub model and a hub dataset with MLflow on and a token given both
as `hf_hub_token` and as HF_TOKEN: the MLflow run is tagged with both resolved commits, and
no file the runs wrote (mlflow.db included), nor their output, holds the token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.fixtures.hub import MODEL_ID
from tests.fixtures.hub_cli import run_batch

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "llamafactory-examples"
TRAIN = ["train_lora/qwen3_lora_sft.yaml", "train_lora/qwen3_lora_dpo.yaml", "train_lora/qwen3_lora_pretrain.yaml"]
SMALL = ["max_steps=2", "max_samples=16"]
TOKEN = "hf_e2eSecretTokenThatMustNotLeak0123"


@pytest.fixture
def examples() -> Path:
    if not (EXAMPLES / TRAIN[0]).is_file():
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    return EXAMPLES


def test_llamafactory_qwen3_examples_train_merge_and_chat_against_the_hub(local_hub, lf_demo_dir, examples,
                                                                           tmp_path):
    (tmp_path / "data").symlink_to(lf_demo_dir)
    commands = [["train", str(examples / name), *SMALL] for name in TRAIN]
    commands += [["export", str(examples / "merge_lora/qwen3_lora_sft.yaml")],
                 ["chat", str(examples / "inference/qwen3_lora_sft.yaml")]]
    done = run_batch(local_hub.env(tmp_path / "hf"), commands, cwd=tmp_path, stdin="Who are you?\n/exit\n")
    assert done.returncode == 0, done.stderr[-4000:]

    commit = local_hub.commits[MODEL_ID]
    for name, stage in (("sft", "sft"), ("dpo", "dpo"), ("pretrain", "pt")):
        out = tmp_path / "saves" / "qwen3-4b" / "lora" / name
        assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 2, name
        adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 8 and adapter["base_model_name_or_path"], name
        manifest = json.loads((out / "models" / "base" / "tunepipe_base.json").read_text())
        assert manifest["source"] == {"kind": "hub", "repo_id": MODEL_ID, "revision": "main", "commit": commit}
    sft_meta = json.loads((tmp_path / "saves/qwen3-4b/lora/sft/data/tokenized/meta.json").read_text())
    assert sft_meta["template"] == "qwen3_nothink" and sft_meta["rows"]["train"] == 32  # identity + alpaca, 16 each
    merged = {p.name for p in (tmp_path / "saves" / "qwen3_sft_merged").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json", "Modelfile"} <= merged
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in merged)
    assert sum(line.startswith("Assistant:") for line in done.stdout.splitlines()) == 1


def test_a_token_given_for_the_hub_is_written_nowhere_and_mlflow_tags_the_commits(local_hub, lf_demo_dir,
                                                                                   mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    cfg = tmp_path / "secret.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": MODEL_ID, "hf_hub_token": TOKEN, "dataset": "alpaca_gpt4_en",
        "dataset_dir": str(lf_demo_dir), "output_dir": str(tmp_path / "out"), "stage": "sft",
        "finetuning_type": "lora", "cutoff_len": 64, "max_steps": 1, "report_to": "mlflow",
        "template": "qwen3_nothink"}), encoding="utf-8")
    env = local_hub.env(tmp_path / "hf", HF_TOKEN=TOKEN, MLFLOW_TRACKING_URI=mlflow_uri)
    done = run_batch(env, [["train", str(cfg)], ["export", str(cfg), f"export_dir={tmp_path / 'export'}"]],
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    store = Path(mlflow_uri.removeprefix("sqlite:///"))
    leaked = [str(p) for p in [*tmp_path.rglob("*"), *store.parent.rglob("*")]
              if p.is_file() and p != cfg and TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    assert TOKEN not in done.stdout + done.stderr

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tunepipe").experiment_id])
    assert TOKEN not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert run.data.tags["tunepipe.base_model.repo_id"] == MODEL_ID
    assert run.data.tags["tunepipe.base_model.commit"] == local_hub.commits[MODEL_ID]
    assert run.data.tags["tunepipe.dataset.alpaca_gpt4_en.commit"] == \
        local_hub.commits["datasets/llamafactory/alpaca_gpt4_en"]
    assert run.data.params["model.model_revision"] == "main" and "model.hf_hub_token" not in run.data.params
