"""Which checkpoint a run resumes from: same run key, newest intact (manifest), finished runs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tunepipe.config import Config, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.checkpoints import (
    MANIFEST,
    damage,
    finished_summary,
    is_last_step,
    record_finished,
    resume_checkpoint,
    write_manifest,
)


def cfg_with(**train) -> Config:
    return Config(train=TrainConfig(**train))


def fake_checkpoint(layout: Layout, step: int, complete: bool = True, max_steps: int = 10):
    path = layout.checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights" * step)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    if complete:
        write_manifest(path)
    return path


def test_resume_from_the_last_complete_checkpoint_of_the_same_run(tmp_path):
    layout, cfg = Layout.at(tmp_path), cfg_with(learning_rate=1e-3)
    assert resume_checkpoint(cfg, layout, "data-a") is None  # fresh: records the run key
    fake_checkpoint(layout, 3)
    half = fake_checkpoint(layout, 6, complete=False)  # killed while saving: no manifest yet
    # logging / saving knobs do not change what is trained: still the same run
    same = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logging_steps=99, save_steps=7))
    assert resume_checkpoint(same, layout, "data-a") == str(layout.checkpoints / "checkpoint-3")
    assert not half.exists()


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one_with_one_warning(tmp_path, caplog):
    layout, cfg = Layout.at(tmp_path), cfg_with()
    resume_checkpoint(cfg, layout, "data-a")
    fake_checkpoint(layout, 2)
    cut = fake_checkpoint(layout, 4)
    (cut / "adapter_model.safetensors").write_bytes(b"w")
    changed = fake_checkpoint(layout, 6)
    (changed / "adapter_model.safetensors").write_bytes(b"X" * len(b"weights" * 6))  # same size, other bytes
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(cfg, layout, "data-a") == str(layout.checkpoints / "checkpoint-2")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [("removed damaged checkpoint-6 (adapter_model.safetensors changed since it was saved "
                        "(sha256 differs)); checkpoint-4 (adapter_model.safetensors is 1 bytes, 28 when saved); "
                        "resuming from checkpoint-2")]
    assert not cut.exists() and not changed.exists()


def test_no_intact_checkpoint_starts_over(tmp_path, caplog):
    layout, cfg = Layout.at(tmp_path), cfg_with()
    resume_checkpoint(cfg, layout, "data-a")
    (fake_checkpoint(layout, 2) / "adapter_model.safetensors").unlink()
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(cfg, layout, "data-a") is None
    assert "no intact checkpoint left: starting over" in caplog.text
    assert damage(layout.checkpoints) is not None  # the folder itself is no checkpoint


@pytest.mark.parametrize("change", ["learning_rate", "data", "overwrite", "false"])
def test_checkpoints_of_another_run_are_not_resumed(tmp_path, change):
    layout, cfg = Layout.at(tmp_path), cfg_with(learning_rate=1e-3)
    resume_checkpoint(cfg, layout, "data-a")
    old = fake_checkpoint(layout, 3)
    data = "data-b" if change == "data" else "data-a"
    train = {"learning_rate": {"learning_rate": 2e-3}, "data": {}, "overwrite": {"overwrite_output_dir": True},
             "false": {"resume_from_checkpoint": False}}[change]
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    assert resume_checkpoint(other, layout, data) is None
    assert not old.exists()


def test_explicit_resume_path_must_be_an_intact_checkpoint(tmp_path):
    layout = Layout.at(tmp_path)
    with pytest.raises(TunepipeError, match="not a checkpoint"):
        resume_checkpoint(cfg_with(resume_from_checkpoint=str(tmp_path)), layout, None)
    with pytest.raises(TunepipeError, match="no checkpoint of this run"):
        resume_checkpoint(cfg_with(resume_from_checkpoint=True), layout, None)
    damaged = fake_checkpoint(layout, 5)
    (damaged / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(TunepipeError, match="is damaged: adapter_model.safetensors is 0 bytes"):
        resume_checkpoint(cfg_with(resume_from_checkpoint=str(damaged)), layout, None)
    (damaged / MANIFEST).unlink()  # another tool's checkpoint: nothing to check it against
    assert resume_checkpoint(cfg_with(resume_from_checkpoint=str(damaged)), layout, None) == str(damaged)


def test_last_step_and_finished_outputs(tmp_path):
    layout, cfg = Layout.at(tmp_path), cfg_with(max_steps=4)
    assert not is_last_step(fake_checkpoint(layout, 2, max_steps=4))
    assert is_last_step(fake_checkpoint(layout, 4, max_steps=4))
    resume_checkpoint(cfg, layout, "data-a")
    assert finished_summary(cfg, layout, "data-a") is None  # nothing written yet
    trained = layout.trained("lora")
    trained.mkdir(parents=True)
    (trained / "adapter_model.safetensors").write_bytes(b"final")
    layout.metrics.mkdir()
    (layout.metrics / "train.json").write_text('{"steps": 4}')
    record_finished(cfg, layout, trained)
    assert finished_summary(cfg, layout, "data-a") == {"steps": 4}
    assert finished_summary(cfg, layout, "data-b") is None  # other data: train again
    overwrite = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overwrite_output_dir=True))
    assert finished_summary(overwrite, layout, "data-a") is None
    (trained / "adapter_model.safetensors").write_bytes(b"edited")
    assert finished_summary(cfg, layout, "data-a") is None  # outputs changed: rewrite them
