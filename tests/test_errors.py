"""The CLI's error convention: `error: ...` exit 2, out of space without a traceback, SIGTERM like Ctrl-C."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

from tunepipe.errors import guarded


def test_an_out_of_space_oserror_is_one_error_line(capsys):
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x.arrow")

    assert guarded(full) == 2
    assert capsys.readouterr().err.startswith("error: out of disk space writing /data/x.arrow: No space left")


def test_sigterm_outside_training_stops_like_ctrl_c_and_cleans_up(tmp_path):
    code = ("import os, signal, sys, time\n"
            "from tunepipe.errors import guarded\n"
            "from tunepipe.io_utils import atomic_dir\n"
            "def run():\n"
            "    with atomic_dir(sys.argv[1]) as tmp:\n"
            "        (tmp / 'half').write_text('x')\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(30)\n"
            "sys.exit(guarded(run))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 128 + signal.SIGTERM
    assert done.stderr.startswith("interrupted: SIGTERM: stopped")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


def test_a_command_that_never_uses_deepspeed_never_imports_it():
    """accelerate asks every model it unwraps (Trainer set-up, save_pretrained) whether it is a
    DeepSpeedEngine, importing DeepSpeed to do so; under `guarded` the question is answered
    without the import, the same way (no model is an engine before DeepSpeed is imported)."""
    code = ("import sys, torch\n"
            "from tunepipe.errors import guarded\n"
            "def run():\n"
            "    from accelerate.utils import extract_model_from_parallel\n"
            "    import accelerate.utils.other as other\n"
            "    model = torch.nn.Linear(2, 2)\n"
            "    assert extract_model_from_parallel(model) is model\n"
            "    print('deepspeed' in sys.modules, other.is_deepspeed_available())\n"
            "    sys.modules['deepspeed'] = sys  # stands for DeepSpeed imported by a DeepSpeed run\n"
            "    print(other.is_deepspeed_available())\n"
            "sys.exit(guarded(run))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"], done.stdout
