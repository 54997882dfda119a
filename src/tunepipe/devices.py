"""What this machine can run: precision and GPU-only kernels, checked before any work.

`check_precision(train)` refuses `fp16` without a CUDA GPU (and `bf16` on a GPU without
it) within a second of starting, before validate, tokenize or a model load spend time;
`liger_kernel(train)` says whether Liger kernels apply here (a warning line without a
GPU, so one YAML moves between a laptop and a GPU box unchanged).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

from tunepipe.config import TrainConfig
from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

LIGER_PACKAGE = "liger_kernel"


def has_cuda() -> bool:
    """A usable CUDA (or ROCm) GPU. A CPU-only torch build is recognised from its version
    tag without importing torch, which alone takes a second or more."""
    try:
        if importlib.metadata.version("torch").endswith("+cpu"):
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    import torch

    return torch.cuda.is_available()


def check_precision(train: TrainConfig) -> None:
    """bf16 / fp16 only where the device runs them; a clear error otherwise."""
    if not (train.fp16 or train.bf16_compute):
        return
    cuda = has_cuda()
    if train.fp16 and not cuda:
        raise TunepipeError("train.fp16=true needs a CUDA GPU and this machine has none "
                            "(CPU autocast has no float16 path)",
                            hint="use bf16: true instead (CPU autocast runs bfloat16), or neither")
    if train.bf16_compute and cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise TunepipeError(f"train.bf16=true: {torch.cuda.get_device_name(0)} has no bfloat16 support",
                                hint="use fp16: true on this GPU")
    if train.bf16_compute and not cuda and not _cpu_has_bf16():
        log.warning("train.bf16 on a CPU without AVX512-BF16 / AMX: bfloat16 matmuls are emulated "
                    "and usually slower than float32 here")


def _cpu_has_bf16() -> bool:
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def liger_kernel(train: TrainConfig) -> bool:
    """Whether to hand `use_liger_kernel` to the Trainer: asked for, and a CUDA GPU is here.

    Without a GPU: one warning line, and training goes on without them (Liger's kernels are
    Triton, GPU-only). With a GPU but without the package: an error naming the extra."""
    if not train.enable_liger_kernel:
        return False
    if train.stage == "rm":
        # transformers adds a `skip_logits` input under Liger that a value-head model rejects
        log.warning("enable_liger_kernel: applies to the causal-LM stages; the reward model trains without it")
        return False
    if not has_cuda():
        log.warning("enable_liger_kernel: Liger kernels run on a CUDA GPU only; training on this "
                    "machine without them")
        return False
    if importlib.util.find_spec(LIGER_PACKAGE) is None:
        raise TunepipeError("enable_liger_kernel=true: the liger-kernel package is not installed",
                            hint="pip install 'tunepipe[liger]' (or liger-kernel), or set enable_liger_kernel: false")
    return True
