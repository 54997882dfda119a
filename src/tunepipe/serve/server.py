"""`tunepipe serve CONFIG.yaml [k=v ...]`: load the model `tunepipe chat` would, serve it over HTTP.

LLaMA-Factory's environment variables: `API_HOST` (default 0.0.0.0), `API_PORT` (8000),
`API_KEY` (set: every /v1 request needs `Authorization: Bearer <key>`), `API_MODEL_NAME`
(the id `/v1/models` lists and requests name; default gpt-3.5-turbo, as there). Several
`adapter_name_or_path` entries are served side by side, one model id each (`serve/models.py`
says how ids are named); a reward model (`stage: rm`) answers `/v1/score/evaluation`. Decoding
defaults come from the `eval` group (`max_new_tokens`, `do_sample`, `temperature`, `top_p`),
so an unset field in a request decodes as `tunepipe chat` does. uvicorn stops on SIGTERM /
Ctrl-C: it stops accepting, lets in-flight answers finish for up to `GRACE_SECONDS`, cancels
the rest and the command exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from tunepipe.config import Config
from tunepipe.data.chat_format import stop_token_ids
from tunepipe.data.named_templates import stop_words
from tunepipe.data.templates import ChatFormat, apply_template
from tunepipe.errors import TunepipeError
from tunepipe.loading import (
    base_dir_for,
    cli_config,
    device_for,
    load_base,
    load_trained,
    tokenizer_for,
    trained_source,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gpt-3.5-turbo"  # LLaMA-Factory's API_MODEL_NAME default
GRACE_SECONDS = 10
MAX_BATCH = 16  # rows one forward pass carries; more requests wait in the engine's queue


def check_backend(cfg: Config) -> None:
    """`infer_backend: vllm` runs nowhere but a CUDA machine with vLLM installed: say so before loading."""
    backend = cfg.model.infer_backend
    if backend == "huggingface":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise TunepipeError(f"infer_backend: {backend} needs a CUDA GPU, and this machine has none",
                            hint="drop infer_backend (tunepipe serves on transformers, batching requests)")
    if importlib.util.find_spec(backend) is None:
        raise TunepipeError(f"infer_backend: {backend}, but {backend} is not installed",
                            hint=f"pip install {backend}, or drop infer_backend")
    raise TunepipeError(f"infer_backend: {backend} is not wired into tunepipe serve yet",
                        hint="drop infer_backend (tunepipe serves on transformers, batching requests)")


def build_served(cfg: Config, layout, api_key: str | None = None, model_name: str | None = None):
    """The engine (model loaded, thread started) and everything the routes need."""
    from tunepipe.serve.app import Served
    from tunepipe.serve.engine import Engine
    from tunepipe.serve.models import adapter_ids, is_reward_model, load_multi_adapter

    check_backend(cfg)
    model_name = model_name or DEFAULT_MODEL_NAME
    base_dir = base_dir_for(cfg, layout)
    source = trained_source(cfg, layout)
    if cfg.train.stage == "rm" or is_reward_model(source.paths):
        return build_reward(cfg, base_dir, source, api_key, model_name)
    tokenizer = apply_template(tokenizer_for(cfg, base_dir, source), cfg.data.template)
    chat_format = ChatFormat(tokenizer, cfg.data.template, cfg.data.tool_format, today=cfg.data.today(),
                             default_system=cfg.data.default_system)
    model_ids, adapters = [model_name], {}
    if source.kind == "adapters" and len(source.paths) > 1:
        names = adapter_ids(cfg.model.adapters(), model_name)
        model = load_multi_adapter(load_base(cfg, base_dir, device_for(), quantized=True), source.paths, names)
        model_ids += names
        adapters = {model_name: "a0", **{name: f"a{i}" for i, name in enumerate(names)}}
    else:
        model = load_trained(cfg, base_dir, source, device_for())
    stops = stop_token_ids(tokenizer, model.generation_config, stop_words(cfg.data.template))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    engine = Engine(model, stops, pad, max_batch=MAX_BATCH)
    defaults = {"max_tokens": cfg.eval.max_new_tokens, "top_p": cfg.eval.top_p if cfg.eval.do_sample else 1.0,
                "temperature": cfg.eval.temperature if cfg.eval.do_sample else 0.0}
    tool_format = chat_format.tool_format if chat_format.named is not None else None
    return Served(engine=engine, chat_format=chat_format, model_ids=model_ids, adapters=adapters,
                  context=context_length(model.config), defaults=defaults, api_key=api_key or None,
                  tool_format=tool_format, seed=cfg.train.seed)


def build_reward(cfg: Config, base_dir, source, api_key: str | None, model_name: str):
    """A reward model (`stage: rm`): `/v1/score/evaluation` only, as LLaMA-Factory serves one."""
    from tunepipe.evaluate.scoring import load_reward_model
    from tunepipe.loading import quantization_config
    from tunepipe.serve.app import Served
    from tunepipe.serve.models import RewardModel

    if source.kind == "none":
        raise TunepipeError("stage: rm, but there is no trained reward model to serve",
                            hint="set model.adapter_name_or_path to a `stage: rm` adapter, or train one")
    tokenizer = tokenizer_for(cfg, base_dir, source)
    quantization = quantization_config(cfg) if cfg.model.quantization_bit else None
    model = load_reward_model(source.paths[-1], base_dir, tokenizer.pad_token_id, cfg.model.dtype, quantization)
    return Served(engine=None, chat_format=None, model_ids=[model_name], context=context_length(model.config),
                  defaults={}, api_key=api_key or None, reward=RewardModel(model, tokenizer))


def context_length(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", 0) or 2048)


def serve_command(args) -> int:
    import uvicorn

    cfg, layout = cli_config(args)
    host = os.environ.get("API_HOST", "0.0.0.0")
    port = int(os.environ.get("API_PORT", "8000"))
    served = build_served(cfg, layout, os.environ.get("API_KEY"), os.environ.get("API_MODEL_NAME"))
    from tunepipe.serve.app import create_app

    app = create_app(served)
    if getattr(args, "webchat", False):
        from tunepipe.serve.webchat import add_webchat

        add_webchat(app, served)
    where = f"http://{host}:{port}"
    print(f"serving {served.model_ids[0]} at {where}/v1" + (f" (web chat: {where}/)" if
          getattr(args, "webchat", False) else "") + (" (API key required)" if served.api_key else ""),
          file=sys.stderr)
    stopped = keep_signals_graceful()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS)
    finally:
        served.close()
    if stopped:
        print(f"stopped by {signal.Signals(stopped[0]).name}: in-flight answers finished or cancelled",
              file=sys.stderr)
    return 0


def keep_signals_graceful() -> list[int]:
    """Handlers that just record SIGTERM / SIGINT, installed before uvicorn runs.

    Why: uvicorn catches the signal, shuts down gracefully (stops accepting, waits up to
    `timeout_graceful_shutdown` for in-flight responses, cancels the rest), then restores the
    handlers it found and raises the signal again. With the default handlers that second
    raise would kill the process (exit 143) or raise KeyboardInterrupt; the contract here is
    a graceful stop that exits 0, so the restored handlers only note which signal came."""
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    return stopped


def webchat_command(args) -> int:
    args.webchat = True
    return serve_command(args)
