"""LLaMA-Factory's own example YAMLs, read from ../shared/llamafactory-examples/ as it ships them
(never copied), run through `tunepipe train` / `export` / `chat` against the local hub, where a
tiny random Qwen3 answers as `Qwen/Qwen3-4B-Instruct-2507`. Only `max_steps` / `max_samples`
are lowered (as command-line overrides), to keep the runs to seconds. The YAMLs name
LLaMA-Factory's `data/` folder and `saves/...` output dirs relative to where they run: the
run's folder has `data` pointing at LLaMA-Factory's demo data folder (read in place).

One more run trains on a hub model and a hub dataset with MLflow on and a token given both
as `hf_hub_token` and as HF_TOKEN: the MLflow run is tagged with both resolved commits, and
no file the runs wrote (mlflow.db included), nor their output, holds the token. And an
adapter by repo id is merged onto the base by repo id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.fixtures.hub import ADAPTER_ID, MODEL_ID, VLM_ID
from tests.fixtures.hub_cli import run_batch

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "llamafactory-examples"
TRAIN = ["train_lora/qwen3_lora_sft.yaml", "train_lora/qwen3_lora_dpo.yaml", "train_lora/qwen3_lora_pretrain.yaml"]
SMALL = ["max_steps=2", "max_samples=16"]
# a tiny random Qwen3-VL answers as Qwen/Qwen3-VL-4B-Instruct; one step of 8 rows (gradient_accumulation_steps: 8)
VLM_SFT = ["train", str(EXAMPLES / "train_lora/qwen3vl_lora_sft.yaml"), "max_steps=1", "max_samples=8"]
TOKEN = "hf_e2eSecretTokenThatMustNotLeak0123"


def write_yaml(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hub_runs(local_hub, lf_demo_dir, tmp_path_factory, mlflow_template_db):
    """Every run of this module, in one child process (the imports paid once): the five examples
    as shipped, then the token run. HF_TOKEN and an MLflow store of its own are in the whole
    process's environment (the examples set `report_to: none`, so only the token run tracks)."""
    import shutil

    if not (EXAMPLES / TRAIN[0]).is_file():
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    root = tmp_path_factory.mktemp("lf-examples")
    (root / "data").symlink_to(lf_demo_dir)
    store = root / "mlflow" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(mlflow_template_db, store)
    secret = root / "secret.yaml"
    secret.write_text(yaml.safe_dump({
        "model_name_or_path": MODEL_ID, "hf_hub_token": TOKEN, "dataset": "alpaca_gpt4_en",
        "dataset_dir": str(lf_demo_dir), "output_dir": str(root / "secret-run"), "stage": "sft",
        "finetuning_type": "lora", "cutoff_len": 64, "max_steps": 1, "report_to": "mlflow",
        "template": "qwen3_nothink"}), encoding="utf-8")
    commands = [["train", str(EXAMPLES / name), *SMALL] for name in TRAIN] + [VLM_SFT]
    commands += [["export", str(EXAMPLES / "merge_lora/qwen3_lora_sft.yaml")],
                 ["chat", str(EXAMPLES / "inference/qwen3_lora_sft.yaml")],
                 ["train", str(secret)], ["export", str(secret), f"export_dir={root / 'secret-export'}"],
                 ["export", str(write_yaml(root / "hub-adapter.yaml", model_name_or_path=MODEL_ID,
                                           adapter_name_or_path=ADAPTER_ID, export_dir=str(root / "hub-adapter"),
                                           output_dir=str(root / "hub-adapter-run")))]]
    env = local_hub.env(root / "hf", HF_TOKEN=TOKEN, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    done = run_batch(env, commands, cwd=root, stdin="Who are you?\n/exit\n")
    assert done.returncode == 0, done.stderr[-4000:]
    return root, done, f"sqlite:///{store}", secret


def test_llamafactory_qwen3_examples_train_merge_and_chat_against_the_hub(local_hub, hub_runs):
    root, done, _, _ = hub_runs
    commit = local_hub.commits[MODEL_ID]
    for name in ("sft", "dpo", "pretrain"):
        out = root / "saves" / "qwen3-4b" / "lora" / name
        assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 2, name
        adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 8, name
        manifest = json.loads((out / "models" / "base" / "tunepipe_base.json").read_text())
        assert manifest["source"] == {"kind": "hub", "repo_id": MODEL_ID, "revision": "main", "commit": commit}
    sft_meta = json.loads((root / "saves/qwen3-4b/lora/sft/data/tokenized/meta.json").read_text())
    assert sft_meta["template"] == "qwen3_nothink" and sft_meta["rows"]["train"] == 32  # identity + alpaca, 16 each
    merged = {p.name for p in (root / "saves" / "qwen3_sft_merged").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json", "Modelfile"} <= merged
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in merged)
    assert sum(line.startswith("Assistant:") for line in done.stdout.splitlines()) == 1


def test_llamafactory_qwen3vl_example_trains_on_images_against_the_hub(local_hub, hub_runs):
    """qwen3vl_lora_sft.yaml as shipped (mllm_demo + identity + alpaca_en_demo, template qwen3_vl_nothink,
    image_max_pixels 262144, lora_target all) on the stand-in: the image rows keep their images and
    LoRA wraps only the language model."""
    root = hub_runs[0]
    out = root / "saves" / "qwen3-vl-4b" / "lora" / "sft"
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 1
    manifest = json.loads((out / "models" / "base" / "tunepipe_base.json").read_text())
    assert manifest["source"]["repo_id"] == VLM_ID and manifest["source"]["commit"] == local_hub.commits[VLM_ID]
    meta = json.loads((out / "data" / "tokenized" / "meta.json").read_text())
    assert meta["template"] == "qwen3_vl_nothink" and meta["rows"]["train"] == 6 + 8 + 8  # mllm_demo has 6 rows
    from datasets import load_from_disk

    shard = load_from_disk(str(out / "data" / "tokenized" / "train"))
    with_images = [json.loads(m)["images"] for m in shard["media"] if m and json.loads(m)["images"]]
    assert len(with_images) == 6
    adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    assert targets and all("language_model" in name for name in targets)


def test_a_token_given_for_the_hub_is_written_nowhere_and_mlflow_tags_the_commits(local_hub, hub_runs):
    from mlflow import MlflowClient

    root, done, mlflow_uri, secret = hub_runs
    leaked = [str(p) for p in root.rglob("*") if p.is_file() and p != secret and TOKEN.encode() in p.read_bytes()]
    assert leaked == []  # outputs, checkpoints, reports, the HF cache, mlflow.db
    assert TOKEN not in done.stdout + done.stderr

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tunepipe").experiment_id])
    assert TOKEN not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert run.data.tags["tunepipe.base_model.repo_id"] == MODEL_ID
    assert run.data.tags["tunepipe.base_model.commit"] == local_hub.commits[MODEL_ID]
    assert run.data.tags["tunepipe.dataset.alpaca_gpt4_en.commit"] == \
        local_hub.commits["datasets/llamafactory/alpaca_gpt4_en"]
    assert run.data.params["model.model_revision"] == "main" and "model.hf_hub_token" not in run.data.params


def test_an_adapter_by_repo_id_merges_onto_a_base_by_repo_id(local_hub, hub_runs):
    from tests.e2e.test_llamafactory_migration import assert_export_equals_base_plus_adapter

    root, done, _, _ = hub_runs
    assert f"model repo '{ADAPTER_ID}' (revision 'main'): commit" in done.stderr
    # the mirror's git work trees hold main's files: the reference, loaded with plain transformers + PEFT
    assert_export_equals_base_plus_adapter(root / "hub-adapter", local_hub.mirrors / "models" / MODEL_ID,
                                           local_hub.mirrors / "models" / ADAPTER_ID)
