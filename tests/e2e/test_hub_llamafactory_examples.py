"""LLaMA-Factory's own example YAMLs, read from ../shared/llamafactory-examples/ as it ships them
(never copied), run through `tunepipe train` / `eval` / `export` / `chat` against the local hub,
where tiny random stand-ins answer as the repo ids they name (a Qwen3 as
`Qwen/Qwen3-4B-Instruct-2507`; tests/fixtures/hub_standins.py for the others). Only
`max_steps` / `max_samples` are lowered (as command-line overrides), to keep the runs to
seconds, and examples that share an output dir get one each. The YAMLs name LLaMA-Factory's
`data/`, `examples/deepspeed/` and `saves/...` / `models/...` dirs relative to where they run, and
the run's folder holds them as a user's does: `data` is LLaMA-Factory's demo data folder plus the
two datasets the ASFT examples name (`med`, `math`: user_made_data), `examples/deepspeed` its
DeepSpeed JSONs (read in place), `models/llama3-8b-pro` a LLaMA Pro block expansion of the Llama 3
stand-in (LLaMA-Factory's expand.sh), `models/Llama-2-7b` and `models/Qwen2.5-7B` stand-ins
downloaded with `hf download`, and `saves/qwen3-4b/full/sft` the full fine-tune that
train_full/qwen3_full_sft.yaml (DeepSpeed ZeRO-3) writes before the merge and chat examples read it.
The five DeepSpeed examples (ZeRO-3, and ZeRO-0 for ASFT) train in the batch process itself, each a
one-rank process group with no launcher child (tunepipe/train/parallel/one_rank.py). The sweep
(tests/test_llamafactory_examples_sweep.py) counts every example; this module accounts for each
one that loads: run here, refused when the model loads, or not run here with the reason.

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
from tests.fixtures.hub_cli import errors_per_command, run_batch
from tests.fixtures.hub_standins import (
    PREQUANTIZED,
    QWEN3_5_MOE_ID,
    QWEN25_VL_ID,
    STANDINS,
    add_standins,
    expand_blocks,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "llamafactory-examples"
TRAIN = ["train_lora/qwen3_lora_sft.yaml", "train_lora/qwen3_lora_dpo.yaml", "train_lora/qwen3_lora_pretrain.yaml"]
SMALL = ["max_steps=2", "max_samples=16"]
# The other examples that load, one step each (gradient_accumulation_steps 8 of batch 1 as shipped:
# 8 rows, 4 from each of the two datasets most examples name).
ONE_STEP = ["max_steps=1", "max_samples=4"]
# example -> what the run must leave: (finetuning type, so the model dir) for `train`
TRAINED = {
    "extras/adam_mini/qwen2_full_sft.yaml": "full", "extras/apollo/llama3_full_sft.yaml": "full",
    "extras/badam/llama3_full_sft.yaml": "full", "extras/dft/qwen2_full_sft.yaml": "full",
    "extras/galore/llama3_full_sft.yaml": "full", "extras/muon/qwen2_full_sft.yaml": "full",
    "extras/loraplus/llama3_lora_sft.yaml": "lora", "extras/pissa/llama3_lora_sft.yaml": "lora",
    "extras/fsdp_qlora/llama3_lora_sft.yaml": "lora", "extras/oft/llama3_oft_sft.yaml": "oft",
    "extras/oft/qwen2_5vl_oft_sft.yaml": "oft", "extras/qoft/llama3_oft_sft_bnb_npu.yaml": "oft",
    "extras/llama_pro/llama3_freeze_sft.yaml": "freeze",
    "train_lora/qwen3_lora_kto.yaml": "lora", "train_lora/qwen3_lora_reward.yaml": "lora",
    "train_lora/qwen3_preprocess.yaml": "lora", "train_qlora/qwen3_lora_sft_bnb_npu.yaml": "lora",
    "train_qlora/qwen3_lora_sft_otfq.yaml": "lora", "extras/eaft/qwen25_05b_eaft_full.yaml": "full",
    # pre-quantized checkpoints, through gptqmodel's torch kernels (PEFT's GPTQ / AWQ LoRA and OFT layers)
    "train_qlora/llama3_lora_sft_gptq.yaml": "lora", "train_qlora/llama3_lora_sft_awq.yaml": "lora",
    "extras/qoft/llama3_oft_sft_gptq.yaml": "oft", "extras/qoft/llama3_oft_sft_awq.yaml": "oft",
}
# Qwen3.5-MoE (template qwen3_5_nothink, lora_target all) on its stand-in. The YAML asks for
# `flash_attn: fa2`, which needs a CUDA GPU and the flash-attn package: as LLaMA-Factory does, the
# run warns and keeps the default kernel (`auto`).
QWEN3_5_MOE = "ascend/qwen3_5moe_lora_sft_fsdp2.yaml"
QWEN3_5_MOE_OUT = "runs/" + QWEN3_5_MOE.removesuffix(".yaml")
# examples whose shipped output dir a later example reads (the rest get one each: several share one)
SHIPPED_OUTPUT = {"extras/loraplus/llama3_lora_sft.yaml",  # saves/llama3-8b/lora/sft, nlg_eval's adapter
                  "train_full/qwen3_full_sft.yaml"}  # saves/qwen3-4b/full/sft, read by the two examples below
PREDICT = "extras/nlg_eval/llama3_lora_predict.yaml"  # do_predict: `tunepipe eval`
CHATS = ["inference/qwen3_lora_sft.yaml", "inference/qwen3.yaml", "inference/qwen3_full_sft.yaml"]
# Pre-quantized checkpoints refused when the model loads, the reason naming what each needs
# (transformers 5 loads AQLM through aqlm, not installed: see models/base.py's PREQUANTIZED).
REFUSED_AT_LOAD = {
    "train_qlora/llama3_lora_sft_aqlm.yaml": "AQLM-quantized checkpoint: it needs package aqlm",
}
QWEN3_VL = "needs issue 21's Qwen3-VL"
# Issue 21's Qwen3-VL family and its stand-in (Qwen/Qwen3-VL-4B-Instruct in the hub fixture) are
# there: the Qwen3-VL examples run in the batch (False skips them with the reason above).
QWEN3_VL_READY = True
# qwen3vl_lora_sft: one step of 8 rows per dataset (gradient_accumulation_steps: 8), checked in detail below
VLM_SFT = ["train", str(EXAMPLES / "train_lora/qwen3vl_lora_sft.yaml"), "max_steps=1", "max_samples=8"]
QWEN3_VL_RUNS = [("train", "train_lora/qwen3vl_lora_sft.yaml"), ("train", "train_lora/qwen3vl_lora_dpo.yaml"),
                 ("export", "merge_lora/qwen3vl_lora_sft.yaml"), ("chat", "inference/qwen3vl.yaml")]
# `deepspeed: examples/deepspeed/ds_z{3,0}_config.json` (LLaMA-Factory's JSON, read in place through the
# run folder's examples/deepspeed): one process each, so DeepSpeed's engine trains in the batch process
# itself, a one-rank group (tunepipe/train/parallel/one_rank.py), no launcher child. They run before the
# TRAINED examples, which then show that the process trains without DeepSpeed again.
# example -> (the JSON's ZeRO stage, what the run saves)
DEEPSPEED = {
    "train_lora/qwen3_lora_sft_ds3.yaml": (3, "lora"),
    "train_full/qwen3_full_sft.yaml": (3, "full"),  # writes saves/qwen3-4b/full/sft: the merge and chat examples'
    "train_full/qwen3vl_full_sft.yaml": (3, "full"),
    # ASFT: datasets `med` / `math`, which a user adds to their data/dataset_info.json (user_made_data), on
    # models/Llama-2-7b and models/Qwen2.5-7B, downloaded from the hub (user_made_models)
    "extras/asft/llama2_full_asft.yaml": (0, "full"),
    "extras/asft/qwen2_full_asft.yaml": (0, "full"),
}
ASFT_MODELS = {"meta-llama/Llama-2-7b-hf": "models/Llama-2-7b", "Qwen/Qwen2.5-7B": "models/Qwen2.5-7B"}
# the name DeepSpeed gives a checkpoint's model states: per rank under ZeRO-3, one file under ZeRO-0/1/2
ZERO_MODEL_STATES = {3: "zero_pp_rank_0_mp_rank_00_model_states.pt", 0: "mp_rank_00_model_states.pt"}
# Examples that load but do not run in this module, and why.
NOT_RUN_HERE = {
    # MOSS-VL (model_type moss_vl) is not a transformers model: its repo ships the modeling code
    # (trust_remote_code), written for transformers < 5; and tunepipe has no moss_vl template
    "inference/mossvl.yaml": "MOSS-VL: remote code for transformers < 5; no moss_vl template",
    "merge_lora/mossvl_lora_sft.yaml": "MOSS-VL: remote code for transformers < 5; no moss_vl template",
    "train_lora/mossvl_lora_sft.yaml": "MOSS-VL: remote code for transformers < 5; no moss_vl template",
    "train_full/mossvl_full_sft.yaml": "MOSS-VL: remote code for transformers < 5; no moss_vl template",
    # 4 Ray workers: tests/e2e/test_ray.py builds this YAML's TorchTrainer (4 workers, PACK, ./saves) and
    # runs 2 Ray workers equal to 1 process with doubled accumulation
    "train_lora/qwen3_lora_sft_ray.yaml": "Ray Train, 4 workers: built and its run checked in tests/e2e/test_ray.py",
}
TOKEN = "hf_e2eSecretTokenThatMustNotLeak0123"


def write_yaml(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def example_commands() -> list[list[str]]:
    """The examples beyond the five above, in an order where each one's inputs exist when it runs."""
    commands = []
    for name in [*DEEPSPEED, *TRAINED]:
        out = [] if name in SHIPPED_OUTPUT else [f"output_dir={run_dir(name)}"]
        commands.append(["train", str(EXAMPLES / name), *ONE_STEP, *out])
    commands.append(["eval", str(EXAMPLES / PREDICT), "max_samples=2"])
    # both merge examples write saves/qwen3_sft_merged: the second gets a dir of its own
    commands.append(["export", str(EXAMPLES / "merge_lora/qwen3_full_sft.yaml"), "export_dir=saves/qwen3_full_merged"])
    commands += [["chat", str(EXAMPLES / name)] for name in CHATS[1:]]
    commands += [["train", str(EXAMPLES / name), *ONE_STEP] for name in REFUSED_AT_LOAD]
    commands.append(["train", str(EXAMPLES / QWEN3_5_MOE), *ONE_STEP, f"output_dir={QWEN3_5_MOE_OUT}"])
    if QWEN3_VL_READY:  # the sft run first: the merge and chat examples read its adapter
        commands += [VLM_SFT] + [[verb, str(EXAMPLES / name), *(ONE_STEP if verb == "train" else [])]
                                 for verb, name in QWEN3_VL_RUNS[1:]]
    return commands


def run_dir(name: str) -> str:
    """Where the run of example `name` writes (relative to the run folder)."""
    return yaml.safe_load((EXAMPLES / name).read_text())["output_dir"] if name in SHIPPED_OUTPUT \
        else f"runs/{name.removesuffix('.yaml')}"


def user_made_models(local_hub, root: Path) -> None:
    """The local models the examples name, made as a LLaMA-Factory user makes them: the Llama 3
    stand-in expanded by LLaMA Pro's blocks, the two base models of the ASFT examples downloaded
    with `hf download` (saves/qwen3-4b/full/sft is written by train_full/qwen3_full_sft.yaml)."""
    import subprocess
    import sys

    llama3 = local_hub.mirrors / "models" / "meta-llama" / "Meta-Llama-3-8B-Instruct"
    expand_blocks(llama3, root / "models" / "llama3-8b-pro", num_expand=8)
    hf = Path(sys.executable).with_name("hf")
    for repo_id, local in ASFT_MODELS.items():
        subprocess.run([str(hf), "download", repo_id, "--local-dir", str(root / local)], check=True,
                       env=local_hub.env(root / "hf"), capture_output=True, timeout=120)


def user_made_data(lf_demo_dir: Path, root: Path) -> None:
    """The run folder's data/: LLaMA-Factory's demo folder (copied, as a user's checkout holds it)
    with the two datasets its ASFT examples name added to dataset_info.json, as a user adds their
    own: `med` a hub dataset (alpaca rows, from the local hub), `math` a local file of the demo's
    alpaca rows."""
    import shutil

    data = shutil.copytree(lf_demo_dir, root / "data")
    info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    info["med"] = {"hf_hub_url": "llamafactory/alpaca_gpt4_en"}
    info["math"] = {"file_name": "alpaca_en_demo.json"}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def hub_runs(local_hub, lf_demo_dir, tmp_path_factory, mlflow_template_db):
    """Every run of this module, in one child process (the imports paid once): the five examples
    first tried, the token run, then every other example that loads (keep-going: the refused ones
    fail alone). HF_TOKEN and an MLflow store of its own are in the whole process's environment
    (the examples set `report_to: none`, so only the token run tracks)."""
    import shutil

    if not (EXAMPLES / TRAIN[0]).is_file():
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    add_standins(local_hub, [*STANDINS, QWEN25_VL_ID, QWEN3_5_MOE_ID, *PREQUANTIZED])
    root = tmp_path_factory.mktemp("lf-examples")
    user_made_data(lf_demo_dir, root)
    (root / "examples").mkdir()  # the YAMLs' `deepspeed: examples/deepspeed/...`, as in LLaMA-Factory's checkout
    (root / "examples" / "deepspeed").symlink_to(EXAMPLES / "deepspeed")
    user_made_models(local_hub, root)
    store = root / "mlflow" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(mlflow_template_db, store)
    secret = root / "secret.yaml"
    secret.write_text(yaml.safe_dump({
        "model_name_or_path": MODEL_ID, "hf_hub_token": TOKEN, "dataset": "alpaca_gpt4_en",
        "dataset_dir": str(lf_demo_dir), "output_dir": str(root / "secret-run"), "stage": "sft",
        "finetuning_type": "lora", "cutoff_len": 64, "max_steps": 1, "report_to": "mlflow",
        "template": "qwen3_nothink"}), encoding="utf-8")
    commands = [["train", str(EXAMPLES / name), *SMALL] for name in TRAIN]
    commands += [["export", str(EXAMPLES / "merge_lora/qwen3_lora_sft.yaml")],
                 ["chat", str(EXAMPLES / CHATS[0])],
                 ["train", str(secret)], ["export", str(secret), f"export_dir={root / 'secret-export'}"],
                 ["export", str(write_yaml(root / "hub-adapter.yaml", model_name_or_path=MODEL_ID,
                                           adapter_name_or_path=ADAPTER_ID, export_dir=str(root / "hub-adapter"),
                                           output_dir=str(root / "hub-adapter-run")))]]
    commands += example_commands()
    env = local_hub.env(root / "hf", HF_TOKEN=TOKEN, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    done = run_batch(env, commands, cwd=root, stdin="Who are you?\n/exit\n" * (len(CHATS) + QWEN3_VL_READY), keep_going=True)
    codes = errors_per_command(done)
    assert len(codes) == len(commands), done.stderr[-4000:]
    outcome = {" ".join(argv[:2]): code for argv, code in zip(commands, codes)}
    return root, done, f"sqlite:///{store}", secret, outcome


def outcome_of(hub_runs, verb: str, name: str) -> tuple[int, list[str]]:
    return hub_runs[4][f"{verb} {EXAMPLES / name}"]


def test_llamafactory_qwen3_examples_train_merge_and_chat_against_the_hub(local_hub, hub_runs):
    root, done, _, _, outcome = hub_runs
    assert list(outcome.values())[:8] == [(0, [])] * 8, done.stderr[-4000:]
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
    assert sum(line.startswith("Assistant:") for line in done.stdout.splitlines()) == len(CHATS) + QWEN3_VL_READY


def test_a_token_given_for_the_hub_is_written_nowhere_and_mlflow_tags_the_commits(local_hub, hub_runs):
    from mlflow import MlflowClient

    root, done, mlflow_uri, secret, _ = hub_runs
    leaked = [str(p) for p in root.rglob("*") if p.is_file() and p != secret and TOKEN.encode() in p.read_bytes()]
    assert leaked == []  # outputs, checkpoints, reports, the HF cache, mlflow.db
    assert TOKEN not in done.stdout + done.stderr

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("tunepipe").experiment_id])
    # the token run's (train_lora/qwen3_preprocess.yaml sets no report_to, so it tracks too)
    (run,) = [run for run in runs if "tunepipe.dataset.alpaca_gpt4_en.commit" in run.data.tags]
    assert TOKEN not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert run.data.tags["tunepipe.base_model.repo_id"] == MODEL_ID
    assert run.data.tags["tunepipe.base_model.commit"] == local_hub.commits[MODEL_ID]
    assert run.data.tags["tunepipe.dataset.alpaca_gpt4_en.commit"] == \
        local_hub.commits["datasets/llamafactory/alpaca_gpt4_en"]
    assert run.data.params["model.model_revision"] == "main" and "model.hf_hub_token" not in run.data.params


def test_an_adapter_by_repo_id_merges_onto_a_base_by_repo_id(local_hub, hub_runs):
    from tests.e2e.test_llamafactory_migration import assert_export_equals_base_plus_adapter

    root, done, _, _, _ = hub_runs
    assert f"model repo '{ADAPTER_ID}' (revision 'main'): commit" in done.stderr
    # the mirror's git work trees hold main's files: the reference, loaded with plain transformers + PEFT
    assert_export_equals_base_plus_adapter(root / "hub-adapter", local_hub.mirrors / "models" / MODEL_ID,
                                           local_hub.mirrors / "models" / ADAPTER_ID)


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_each_llamafactory_training_example_trains_a_step_on_its_stand_in(local_hub, hub_runs, name):
    root = hub_runs[0]
    code, errors = outcome_of(hub_runs, "train", name)
    assert (code, errors) == (0, []), hub_runs[1].stderr[-3000:]
    shipped = yaml.safe_load((EXAMPLES / name).read_text())
    out = root / (shipped["output_dir"] if name in SHIPPED_OUTPUT else f"runs/{name.removesuffix('.yaml')}")
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 1
    kind = TRAINED[name]
    if kind in ("lora", "oft"):
        adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
        assert adapter["peft_type"] == kind.upper()
    else:  # full and freeze save the whole model
        assert (out / "models" / "full" / "config.json").is_file()
    base = json.loads((out / "models" / "base" / "tunepipe_base.json").read_text())["source"]
    if base["kind"] == "hub":  # the stand-in of the repo id the YAML names, at the mirror's commit
        assert base["repo_id"] == shipped["model_name_or_path"]
        assert base["commit"] == local_hub.commits[base["repo_id"]]


def test_the_predict_merge_and_chat_examples_run_on_what_earlier_examples_made(hub_runs):
    root, done = hub_runs[0], hub_runs[1]
    for verb, name in [("eval", PREDICT), ("export", "merge_lora/qwen3_full_sft.yaml"),
                       *(("chat", chat) for chat in CHATS[1:])]:
        assert outcome_of(hub_runs, verb, name) == (0, []), (name, done.stderr[-3000:])
    predictions = (root / "saves/llama3-8b/lora/predict/reports/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4  # identity + alpaca_en_demo, max_samples 2 each
    scores = json.loads((root / "saves/llama3-8b/lora/predict/metrics/eval.json").read_text())
    assert scores["predict_samples"] == 4 and {"bleu-4", "rouge-l"} <= set(scores["tuned"])  # LoRA adapter vs base
    merged = root / "saves" / "qwen3_full_merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen3"


@pytest.mark.parametrize("name", sorted(DEEPSPEED))
def test_each_llamafactory_deepspeed_example_trains_a_step_under_its_zero_stage(hub_runs, name):
    """One step under the JSON's ZeRO stage, in the batch process (no launcher child), the loss
    finite and the model saved; ZeRO-3 also gathers the full model's weights for saving."""
    import math

    root, done = hub_runs[0], hub_runs[1]
    assert outcome_of(hub_runs, "train", name) == (0, []), done.stderr[-3000:]
    stage, kind = DEEPSPEED[name]
    out = root / run_dir(name)
    metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 1 and math.isfinite(metrics["train_loss"])
    (states,) = (out / "checkpoints" / "checkpoint-1").glob("global_step1/*model_states.pt")
    assert states.name == ZERO_MODEL_STATES[stage]  # DeepSpeed's engine ran this ZeRO stage
    if kind == "lora":
        adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA"
        return
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out / "models" / "full")
    with safe_open(str(next((out / "models" / "full").glob("*.safetensors"))), "pt") as saved:
        embed = next(key for key in saved.keys() if key.endswith("embed_tokens.weight"))  # noqa: SIM118 (not a dict)
        # whole, not ZeRO-3's empty placeholder of a partitioned parameter
        assert saved.get_slice(embed).get_shape()[-1] == config.get_text_config().hidden_size


def test_the_deepspeed_examples_train_in_the_batch_process_without_a_launcher(hub_runs):
    stderr = hub_runs[1].stderr
    assert stderr.count("training in this process (a one-rank group, no launcher)") == len(DEEPSPEED)
    assert "launching 1 training processes" not in stderr


@pytest.mark.parametrize("name", sorted(REFUSED_AT_LOAD))
def test_a_prequantized_checkpoint_is_refused_at_load_naming_what_it_needs(hub_runs, name):
    code, errors = outcome_of(hub_runs, "train", name)
    assert code == 2 and len(errors) == 1, errors
    repo_id = yaml.safe_load((EXAMPLES / name).read_text())["model_name_or_path"]
    assert f"model.model_name_or_path={repo_id!r} is a {REFUSED_AT_LOAD[name]}" in errors[0]
    assert not (hub_runs[0] / "runs").joinpath(name.removesuffix(".yaml")).exists()


def test_every_example_that_loads_is_run_refused_or_accounted_for():
    """With the sweep: each of the 48 examples that load has one place here."""
    from tests.test_llamafactory_examples_sweep import REFUSED, example_yamls

    if not (EXAMPLES / TRAIN[0]).is_file():  # as the batch fixture: a checkout without ../shared
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    loading = {name for name in example_yamls() if name not in REFUSED}
    here = [*TRAIN, "merge_lora/qwen3_lora_sft.yaml", *CHATS, *TRAINED, *DEEPSPEED, PREDICT,
            "merge_lora/qwen3_full_sft.yaml", *REFUSED_AT_LOAD, *NOT_RUN_HERE,
            *(name for _, name in QWEN3_VL_RUNS), QWEN3_5_MOE]
    assert sorted(here) == sorted(loading)


@pytest.mark.skipif(not QWEN3_VL_READY, reason=QWEN3_VL)
@pytest.mark.parametrize(("verb", "name"), QWEN3_VL_RUNS)
def test_each_qwen3_vl_example_runs_on_its_stand_in(hub_runs, verb, name):
    assert outcome_of(hub_runs, verb, name) == (0, []), hub_runs[1].stderr[-3000:]


@pytest.mark.skipif(not QWEN3_VL_READY, reason=QWEN3_VL)
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


def test_llamafactory_qwen3_5_moe_example_trains_the_language_model_experts_not_routers(local_hub, hub_runs):
    """ascend/qwen3_5moe_lora_sft_fsdp2.yaml (template qwen3_5_nothink, lora_target all) on the
    Qwen3.5-MoE stand-in (a vision-language MoE with linear-attention layers): one step; LoRA wraps the
    language model's attention, linear-attention and shared-expert linears and its fused routed experts,
    never a router gate nor the vision tower. Its `flash_attn: fa2` falls back to `auto` with a warning."""
    root, done = hub_runs[0], hub_runs[1]
    assert outcome_of(hub_runs, "train", QWEN3_5_MOE) == (0, []), done.stderr[-3000:]
    out = root / QWEN3_5_MOE_OUT
    assert json.loads((out / "metrics" / "train.json").read_text())["steps"] == 1
    base = json.loads((out / "models" / "base" / "tunepipe_base.json").read_text())["source"]
    assert base["repo_id"] == QWEN3_5_MOE_ID and base["commit"] == local_hub.commits[QWEN3_5_MOE_ID]
    meta = json.loads((out / "data" / "tokenized" / "meta.json").read_text())
    assert meta["template"] == "qwen3_5_nothink" and meta["rows"]["train"] == 4
    adapter = json.loads((out / "models" / "adapter" / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    assert targets and all(".language_model." in name for name in targets)
    assert {name.rsplit(".", 1)[-1] for name in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
                                                             "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",
                                                             "gate_proj", "up_proj", "down_proj"}
    assert sorted(adapter["target_parameters"]) == ["down_proj", "gate_up_proj"]  # the fused routed experts
    assert "flash_attn='fa2' needs a CUDA GPU and the flash-attn package; using flash_attn: auto" in done.stderr
