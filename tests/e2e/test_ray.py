"""LLaMA-Factory's Ray keys: the train step under Ray Train's TorchTrainer on a local Ray cluster
(one `ray start --head` for the whole module, CPU workers over gloo; tests/fixtures/ray_cluster.py
says why it is started that way).

- 2 Ray workers with accumulation 4 train like 1 process with accumulation 8 (the rows and seed
  of tests/e2e/test_ddp.py), through what `tunepipe train` runs (validate -> tokenize -> train):
  same loss per step, same adapter where a plain run puts it, same token count, one MLflow run;
  and Ray Train's own record of the run, under ray_storage_path/ray_run_name, holds the
  checkpoint its report callback copied there.
- ray_init_kwargs reach ray.init (the address joins the test's cluster, the namespace is the
  driver's); unset resources_per_worker follow the cluster (CPU here); LLaMA-Factory's
  qwen3_lora_sft_ray.yaml, read verbatim from ../shared/llamafactory-examples/, asks for 4 workers.
- resources_per_worker, placement_strategy, ray_storage_path, ray_run_name read back from the
  TorchTrainer's ScalingConfig / RunConfig.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from tests.e2e.test_ddp import settings
from tests.fixtures.ray_cluster import ENV, start_head
from tests.fixtures.same_training import adapter_tensors, assert_same_training, loss_points

from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import read_json
from tunepipe.layout import Layout
from tunepipe.pipeline import run_train_pipeline
from tunepipe.train import run_ray_rank
from tunepipe.train.parallel.ray_launch import connect, ray_trainer

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "llamafactory-examples"
RAY_EXAMPLE = "train_lora/qwen3_lora_sft_ray.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        cluster = start_head()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.stop()


def write_settings(tmp_path, tiny_model_dir, lf_demo_dir, mlflow_uri):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(settings(tiny_model_dir, lf_demo_dir, mlflow_uri)))
    return config


def test_ray_init_kwargs_reach_ray_init_and_unset_resources_follow_the_cluster(ray_cluster, tmp_path,
                                                                              tiny_model_dir, lf_demo_dir):
    import ray

    config = write_settings(tmp_path, tiny_model_dir, lf_demo_dir, "sqlite:///unused.db")
    init = f'{{"address": "{ray_cluster.address}", "namespace": "tunepipe-ray-test"}}'
    cfg = load_config(config, ["train.ray_num_workers=2", f"train.ray_init_kwargs={init}"])
    try:
        assert connect(cfg) is True
        context = ray.get_runtime_context()
        assert context.gcs_address.rsplit(":", 1)[1] == ray_cluster.address.rsplit(":", 1)[1]  # its head
        assert context.namespace == "tunepipe-ray-test"
        assert connect(cfg) is False  # already connected: joined, not started again
        scaling = ray_trainer(cfg, Layout.at(tmp_path / "run"), run_ray_rank).scaling_config
        assert (scaling.resources_per_worker, scaling.use_gpu) == ({"CPU": 1}, False)  # a CPU-only cluster
        # LLaMA-Factory's own Ray example, read as it ships: 4 workers, its defaults for the rest
        if (EXAMPLES / RAY_EXAMPLE).is_file():
            trainer = ray_trainer(load_config(EXAMPLES / RAY_EXAMPLE), Layout.at(tmp_path / "run"), run_ray_rank)
            scaling, run = trainer.scaling_config, trainer.run_config
            assert (scaling.num_workers, scaling.resources_per_worker, scaling.placement_strategy) == \
                (4, {"CPU": 1}, "PACK")
            assert run.storage_path == str(Path.cwd() / "saves")  # LLaMA-Factory's default, ./saves
            assert run.name.startswith("ray_train_run-")  # no ray_run_name: Ray names the run
    finally:
        ray.shutdown()


def test_two_ray_workers_match_one_process_with_doubled_accumulation(ray_cluster, tmp_path, tiny_model_dir,
                                                                     lf_demo_dir, mlflow_uri, caplog):
    config = write_settings(tmp_path, tiny_model_dir, lf_demo_dir, mlflow_uri)
    under_ray, single = Layout.at(tmp_path / "ray"), Layout.at(tmp_path / "single")
    storage = tmp_path / "ray_storage"
    with caplog.at_level(logging.INFO, logger="tunepipe.train.parallel.ray_launch"):
        run_train_pipeline(load_config(config, [
            "train.ray_num_workers=2", "train.gradient_accumulation_steps=4", "train.ray_run_name=equal",
            f"train.ray_storage_path={storage}", f'train.ray_init_kwargs={{"address": "{ray_cluster.address}"}}',
        ]), under_ray)
    assert any("training in 2 Ray workers" in r.getMessage() for r in caplog.records)
    run_train_pipeline(load_config(config, ["train.gradient_accumulation_steps=8"]), single)

    assert_same_training(under_ray, single, weight_tolerance=1e-6)
    assert read_json(under_ray.metrics / "train.json")["tokens_seen"] == \
        read_json(single.metrics / "train.json")["tokens_seen"]
    # Ray Train's record of the run: the final checkpoint (step 3), as its report callback copied it
    reported = sorted((storage / "equal").glob("checkpoint_*/checkpoint"))
    assert reported, sorted(p.name for p in (storage / "equal").iterdir())
    assert read_json(reported[-1] / "trainer_state.json")["global_step"] == 3
    from safetensors.torch import load_file

    final = adapter_tensors(under_ray)
    copied = load_file(str(reported[-1] / "adapter_model.safetensors"))
    assert copied.keys() == final.keys() and all((copied[k] == final[k]).all() for k in final)

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("tunepipe").experiment_id])
    assert sorted(run.data.params["train.ray_num_workers"] for run in runs) == ["1", "2"]  # rank 1 logged nothing
    (ray_run,) = [run for run in runs if run.data.params["train.ray_num_workers"] == "2"]
    assert read_json(under_ray.adapter / "tunepipe_run.json")["mlflow_run_id"] == ray_run.info.run_id
    history = sorted((m.step, m.value) for m in mlflow.get_metric_history(ray_run.info.run_id, "loss"))
    assert history == loss_points(under_ray)


def test_scaling_and_run_config_read_back(tmp_path, tiny_model_dir, lf_demo_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ray_storage_path is relative to where tunepipe runs, as in LLaMA-Factory
    config = write_settings(tmp_path, tiny_model_dir, lf_demo_dir, "sqlite:///unused.db")
    cfg = load_config(config, ["train.ray_num_workers=3", 'train.resources_per_worker={"CPU": 2}',
                               "train.placement_strategy=SPREAD", "train.ray_storage_path=ray_runs",
                               "train.ray_run_name=sweep-1"])
    trainer = ray_trainer(cfg, Layout.at(tmp_path / "run"), run_ray_rank)
    scaling, run = trainer.scaling_config, trainer.run_config
    assert (scaling.num_workers, scaling.resources_per_worker, scaling.placement_strategy, scaling.use_gpu) == \
        (3, {"CPU": 2}, "SPREAD", False)
    assert (run.storage_path, run.name) == (str(tmp_path / "ray_runs"), "sweep-1")
    # LLaMA-Factory also takes the mapping keys as JSON text; a GPU in them asks Ray for GPU workers
    cfg = load_config(config, ["train.ray_num_workers=2", 'train.resources_per_worker={"GPU": 1, "CPU": 4}'])
    scaling = ray_trainer(cfg, Layout.at(tmp_path / "run"), run_ray_rank).scaling_config
    assert (scaling.resources_per_worker, scaling.use_gpu) == ({"GPU": 1, "CPU": 4}, True)


@pytest.mark.parametrize("override, pattern", [
    ("train.ray_init_kwargs='{address: auto'", r"train\.ray_init_kwargs='\{address: auto': must be a mapping or its JSON text"),
    ("train.resources_per_worker='[1, 2]'", r"train\.resources_per_worker='\[1, 2\]': must be a mapping"),
    ("train.placement_strategy=SCATTER", r"train\.placement_strategy='SCATTER': must be one of"),
])
def test_ray_keys_are_checked_at_load(tmp_path, tiny_model_dir, lf_demo_dir, override, pattern):
    config = write_settings(tmp_path, tiny_model_dir, lf_demo_dir, "sqlite:///unused.db")
    with pytest.raises(TunepipeError, match=pattern):
        load_config(config, ["train.ray_num_workers=2", override])


def test_ray_and_another_launcher_are_exclusive(tmp_path, tiny_model_dir, lf_demo_dir):
    config = write_settings(tmp_path, tiny_model_dir, lf_demo_dir, "sqlite:///unused.db")
    with pytest.raises(TunepipeError, match=r"train\.ray_num_workers=2: Ray starts and places the workers"):
        load_config(config, ["train.ray_num_workers=2", "train.num_processes=2"])
