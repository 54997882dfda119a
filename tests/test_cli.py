"""CLI conventions: help, env, `error: ...` with exit 2, tracebacks only with --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunepipe.cli import main
from tunepipe.errors import TunepipeError


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "export", "chat", "eval", "validate", "tokenize", "env"):
        assert name in out


def test_env_reports_versions_and_model(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out and "embedded model" in out


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_rnk: 8\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean lora_rank" in err and "Traceback" not in err


def test_debug_shows_the_exception(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_rnk: 8\n")
    with pytest.raises(TunepipeError):
        main(["--debug", "train", str(cfg)])


def test_missing_config_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "tunepipe.cli", "--version"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "tunepipe" in out.stdout
