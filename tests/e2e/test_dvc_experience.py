"""The DVC experience a user meets, on the tiny model, in a throw-away copy of the repo.

One repository is set up per module (git init + dvc init + a first `dvc repro`) and the
tests run in file order on it, each leaving the pipeline up to date: a second repro
skips everything; `dvc exp run -S train.learning_rate=...` re-runs train, evaluate and
merge only and shows up in `dvc exp show` and `dvc plots show`; a new cutoff_len re-runs
from tokenize; a raw data file tracked with `dvc add` re-runs from validate and checks
out together with its adapter.
The static test checks every stage's `deps:` against the modules its script imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.e2e.dvc_deps import library_deps
from tests.fixtures.hub import mmlu_subjects

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
COPIED = ["dvc.yaml", "params.yaml", "stages", "src", "data", "schemas", "configs", ".dvcignore", ".gitignore"]
PIPELINE = ["base_model", "validate", "tokenize", "train", "evaluate", "benchmark", "merge"]


def small_params(params: dict, model_dir: Path) -> dict:
    """The repo's params.yaml, pointed at the tiny model and shrunk to seconds per stage."""
    params["model"]["model_name_or_path"] = str(model_dir)
    params["data"].update({"dataset": "big", "eval_dataset": "identity_eval", "cutoff_len": 64,
                           "max_samples": 16, "val_size": 0.0})
    params["train"].update({"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                            "save_steps": 50, "learning_rate": 1.0e-3})
    params["eval"].update({"max_new_tokens": 4, "max_predict_samples": 2})
    params["tracking"]["report_to"] = "none"
    return params


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src"), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], repo)


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], repo)


def stages_run(proc: subprocess.CompletedProcess) -> set[str]:
    """Stages DVC actually executed (it prints "Running stage 'x':" for each)."""
    return set(re.findall(r"Running stage '([\w-]+)'", proc.stdout + proc.stderr))


def repro(repo: Path) -> set[str]:
    return stages_run(dvc(repo, "repro"))


def edit_params(repo: Path, group: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[group][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_hash(repo: Path) -> str:
    return sha(repo / "models" / "adapter" / "adapter_model.safetensors")


def big_rows(tag: str, count: int = 24) -> list[dict]:
    """A stand-in for a large raw dataset kept out of git with `dvc add`. The tag leads
    both turns so that truncation to a short cutoff_len never hides the difference."""
    return [{"instruction": f"{tag}: question {i}?", "input": "",
             "output": f"{tag}: Tuney answers {i}."} for i in range(count)]


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory, tiny_model_dir) -> Path:
    repo = tmp_path_factory.mktemp("dvc-repo")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info",
                                                                             "validated", "tokenized"))
        elif source.is_file():
            shutil.copy2(source, repo / name)
    params = small_params(yaml.safe_load((REPO / "params.yaml").read_text()), tiny_model_dir)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    info = json.loads((repo / "data" / "dataset_info.json").read_text())
    info["big"] = {"file_name": "raw/big.json"}
    (repo / "data" / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (repo / "data" / "raw" / "big.json").write_text(json.dumps(big_rows("apples")))
    git(repo, "init", "-q", "-b", "main")
    dvc(repo, "init", "-q")
    dvc(repo, "add", "-q", "data/raw/big.json")  # the documented large-dataset workflow
    assert repro(repo) == set(PIPELINE)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline on big.json v1")
    return repo


@pytest.mark.slow
def test_second_repro_runs_no_stage(dvc_repo):
    proc = dvc(dvc_repo, "repro")
    assert stages_run(proc) == set()
    assert "up to date" in proc.stdout.lower() or "didn't change" in proc.stdout


@pytest.mark.slow
def test_a_reward_file_change_makes_train_and_evaluate_stale_and_nothing_before(dvc_repo):
    """A grpo run's reward functions live in configs/rewards/ (tunepipe.rewards refuses them
    anywhere else), a dep of train and evaluate: editing one re-runs training under dvc repro.
    Checked with `dvc status` (what `dvc repro` would run), not a GRPO repro, to stay cheap."""
    reward_file = dvc_repo / "configs" / "rewards" / "arithmetic.py"
    original = reward_file.read_bytes()
    reward_file.write_bytes(original + b"\n\ndef stricter(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    try:
        stale = json.loads(dvc(dvc_repo, "status", "--json").stdout)
    finally:
        reward_file.write_bytes(original)  # byte-identical again: later tests see an unchanged pipeline
    assert {"train", "evaluate"} <= set(stale) and not {"validate", "tokenize"} & set(stale), stale
    assert any("configs/rewards" in json.dumps(change) for change in stale["train"])


def test_reward_files_are_where_train_and_evaluate_depend_on_them():
    from tunepipe.rewards import REWARDS_DIR

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate"):
        assert REWARDS_DIR.as_posix() in pipeline[name]["deps"], name
        assert "train.reward_funcs" in pipeline[name]["params"], name


@pytest.mark.slow
def test_learning_rate_experiment_reruns_only_train_evaluate_merge_and_shows_in_exp_show_and_plots(dvc_repo):
    before = adapter_hash(dvc_repo)
    proc = dvc(dvc_repo, "exp", "run", "-S", "train.learning_rate=2e-4")
    assert stages_run(proc) == {"train", "evaluate", "benchmark", "merge"}  # validate and tokenize are cached
    assert adapter_hash(dvc_repo) != before

    shown = json.loads(dvc(dvc_repo, "exp", "show", "--json").stdout)
    runs = [node for node in _walk(shown) if _learning_rate(node) == pytest.approx(2e-4)]
    assert runs, "the experiment with learning_rate 2e-4 is not listed"
    metrics = runs[0]["data"]["metrics"]
    assert metrics["metrics/train.json"]["data"]["train_loss"] > 0
    assert "metrics/eval.json" in metrics and metrics["metrics/eval.json"]["data"]

    out = dvc_repo / "plots-html"
    dvc(dvc_repo, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    rows = (dvc_repo / "plots" / "train_loss.csv").read_text().strip().splitlines()
    assert "train_loss" in html and len(rows) >= 3  # header + one row per logged step (2 steps)
    first_loss = rows[1].split(",")[-1]
    assert first_loss in html  # the plotted data is the training log


@pytest.mark.slow
def test_cutoff_len_change_reruns_from_tokenize(dvc_repo):
    edit_params(dvc_repo, "data", "cutoff_len", 48)
    assert repro(dvc_repo) == {"tokenize", "train", "evaluate", "benchmark", "merge"}
    meta = json.loads((dvc_repo / "data" / "tokenized" / "meta.json").read_text())
    assert meta["cutoff_len"] == 48


@pytest.mark.slow
def test_raw_data_change_reruns_from_validate_and_checkout_restores_data_with_its_adapter(dvc_repo):
    git(dvc_repo, "add", "-A")
    git(dvc_repo, "commit", "-q", "-m", "tuned params")
    old_commit = git(dvc_repo, "rev-parse", "HEAD").stdout.strip()
    old_data, old_adapter = sha(dvc_repo / "data/raw/big.json"), adapter_hash(dvc_repo)

    (dvc_repo / "data/raw/big.json").write_text(json.dumps(big_rows("pears")))
    dvc(dvc_repo, "add", "-q", "data/raw/big.json")
    assert repro(dvc_repo) == {"validate", "tokenize", "train", "evaluate", "benchmark", "merge"}
    git(dvc_repo, "add", "-A")
    git(dvc_repo, "commit", "-q", "-m", "big.json v2")
    new_data, new_adapter = sha(dvc_repo / "data/raw/big.json"), adapter_hash(dvc_repo)
    assert new_data != old_data and new_adapter != old_adapter

    git(dvc_repo, "checkout", "-q", old_commit)
    dvc(dvc_repo, "checkout", "-q")
    assert sha(dvc_repo / "data/raw/big.json") == old_data
    assert adapter_hash(dvc_repo) == old_adapter
    assert "pears" not in (dvc_repo / "data/raw/big.json").read_text()

    git(dvc_repo, "checkout", "-q", "main")
    dvc(dvc_repo, "checkout", "-q")
    assert adapter_hash(dvc_repo) == new_adapter
    assert stages_run(dvc(dvc_repo, "repro")) == set()


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _learning_rate(node: dict):
    try:
        return float(node["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"])
    except (KeyError, TypeError, ValueError):
        return None


def test_root_package_init_holds_only_the_version():
    # dvc_deps leaves src/tunepipe/__init__.py out of every stage's deps on purpose
    # (bumping the version must not re-run the pipeline); that is only safe while it
    # holds nothing else.
    text = (REPO / "src" / "tunepipe" / "__init__.py").read_text()
    code = [line for line in text.splitlines() if line.strip() and not line.startswith(('"""', "#"))]
    assert code == ['__version__ = "0.1.0"'] or all(line.startswith("__version__") for line in code)


def test_every_stage_depends_on_exactly_the_library_modules_it_imports():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in pipeline.items():
        script = REPO / stage["cmd"].split()[-1]
        assert script.is_file(), f"stage {name}: cmd {stage['cmd']!r} does not end with its script"
        deps = stage.get("deps", [])
        imported = library_deps(script, REPO)
        listed = {dep for dep in deps if dep.startswith("src/")}
        if script.relative_to(REPO).as_posix() not in deps:
            problems.append(f"{name}: deps miss its own script {script.relative_to(REPO)}")
        for dep in sorted(imported - listed):
            problems.append(f"{name}: imports from {dep} but deps do not list it")
        for dep in sorted(listed - imported):
            problems.append(f"{name}: deps list {dep} but the stage never imports from it")
    assert not problems, "\n".join(problems)


MMLU_GROUPS = {"mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"}


@pytest.mark.slow
def test_a_benchmark_list_reruns_only_the_benchmark_stage_and_shows_in_metrics_diff(dvc_repo, local_hub,
                                                                                    tmp_path, monkeypatch):
    # mmlu: the harness's whole group (57 subjects), its data served by the local hub as cais/mmlu
    # (two test rows a subject); example_mc: a task YAML in the repo, cut to 2 documents by eval.limit
    for key, value in local_hub.env(tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    edit_params(dvc_repo, "eval", "tasks", ["configs/benchmarks/example_mc.yaml", "mmlu"])
    edit_params(dvc_repo, "eval", "limit", 2)
    proc = dvc(dvc_repo, "repro")
    assert stages_run(proc) == {"benchmark"}
    # the harness's progress bar, once for the tuned model and once for the base
    assert (proc.stdout + proc.stderr).count("Running loglikelihood requests: 100%") >= 2

    report = json.loads((dvc_repo / "metrics" / "benchmarks.json").read_text())
    # a group is reported as its aggregate rows (mmlu and its four categories), not one row per subject
    assert set(report["benchmarks"]) == {"example_mc"} | MMLU_GROUPS
    subjects = len(mmlu_subjects())
    assert report["documents"]["example_mc"] == 2 and report["documents"]["mmlu"] == 2 * subjects
    categories = sorted(MMLU_GROUPS - {"mmlu"})
    assert sum(report["documents"][name] for name in categories) == 2 * subjects
    for cell in (report["benchmarks"][task]["acc"] for task in report["benchmarks"]):
        assert {"tuned", "base", "diff", "stderr", "base_stderr"} <= set(cell)
        assert cell["diff"] == pytest.approx(cell["tuned"] - cell["base"], abs=2e-6)
    for column in ("tuned", "base"):  # mmlu's score is its categories' mean weighted by their documents
        weighted = sum(report["benchmarks"][name]["acc"][column] * report["documents"][name] for name in categories)
        assert report["benchmarks"]["mmlu"]["acc"][column] == pytest.approx(weighted / (2 * subjects), abs=1e-5)

    diff = dvc(dvc_repo, "metrics", "diff").stdout
    for row in ("benchmarks.example_mc.acc.tuned", "benchmarks.mmlu.acc.tuned", "benchmarks.mmlu.acc.base",
                "benchmarks.mmlu.acc.diff", "benchmarks.mmlu_stem.acc.base"):
        assert row in diff, f"{row} missing from dvc metrics diff:\n{diff}"
