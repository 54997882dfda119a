"""tunepipe: LLM fine-tuning as a pipeline of cacheable DVC stages."""

import importlib.metadata as _metadata
import os as _os

__version__ = "0.1.0"


def _name_deepspeed_accelerator() -> None:
    """accelerate imports DeepSpeed whenever it is installed, also in runs that never use it
    (Trainer set-up, save_pretrained), and DeepSpeed's GPU detection then logs "Setting
    accelerator to CPU ..." in every stage. A CPU-only torch build can only give DeepSpeed its
    CPU accelerator, so name that one through DeepSpeed's own `DS_ACCELERATOR` (read from the
    version tag: importing torch here would cost every command a second). A value set is kept."""
    try:
        cpu_only = _metadata.version("torch").endswith("+cpu")
    except _metadata.PackageNotFoundError:
        return
    if cpu_only:
        _os.environ.setdefault("DS_ACCELERATOR", "cpu")


_name_deepspeed_accelerator()
