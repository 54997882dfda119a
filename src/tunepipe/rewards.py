"""The rewards of `stage: grpo`: what `train.reward_funcs` names, resolved to callables TRL calls.

Three kinds of reference, each a string in `reward_funcs`:

- a built-in: `exact_match`, `numeric_match` (the last number of the completion equals the
  last number of the reference), `format_regex=PATTERN` (1 when the completion matches
  PATTERN, `re.fullmatch` with DOTALL), `length_penalty` / `length_penalty=N` (minus the
  completion tokens beyond N, over max_completion_length);
- `configs/rewards/FILE.py:function`: your own function in the repo's `configs/rewards/`
  folder, which the DVC train stage depends on, so editing it re-runs training; the
  file's sha256 goes to MLflow with the run;
- a directory a `stage: rm` run wrote (models/adapter or models/full): the reward model's
  score of prompt + completion.

Every reward is called as TRL calls it: `f(prompts=[...], completions=[...],
completion_ids=[...], reference=[...], **kwargs) -> list[float | None]` (None: the reward
does not apply to that completion). Our wrapper turns a wrong signature, an exception, a
wrong length, a non-number or a NaN into a TunepipeError naming the function; `probe`
runs each one on real rows before the first generation, so most mistakes surface in
seconds rather than after a model load and a rollout.

In core, not train/rl/: the evaluate stage scores tuned and base answers with the same rewards,
and evaluate never imports the training stack (a training change must not re-run it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from tunepipe.errors import TunepipeError

REWARDS_DIR = Path("configs/rewards")  # a dvc.yaml dep of the train stage
REWARD_MODEL_NAME = "reward_model"  # how a `stage: rm` dir's reward is named in metrics
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


# -- built-ins -----------------------------------------------------------------------


def exact_match(completions: list[str], reference: list[str], **_) -> list[float]:
    """1.0 when the completion equals the reference (surrounding whitespace ignored)."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, reference)]


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(completions: list[str], reference: list[str], **_) -> list[float]:
    """1.0 when the completion's final number equals the reference's (within 1e-6 relative);
    the usual verifiable reward of math-style data."""
    scores = []
    for completion, ref in zip(completions, reference):
        got, want = last_number(completion), last_number(ref)
        scores.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6,
                                                                                  abs_tol=1e-9)))
    return scores


def format_regex(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise TunepipeError(f"train.reward_funcs: format_regex={pattern!r} is not a regular expression: {exc}") from None

    def format_reward(completions: list[str], **_) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]
    return format_reward


def length_penalty(free_tokens: int, max_completion_length: int) -> Callable:
    def length_reward(completion_ids: list[list[int]], **_) -> list[float]:
        return [-max(0, len(ids) - free_tokens) / max_completion_length for ids in completion_ids]
    return length_reward


def builtin(name: str, arg: str | None, max_completion_length: int) -> Callable | None:
    if name == "exact_match" and arg is None:
        return exact_match
    if name == "numeric_match" and arg is None:
        return numeric_match
    if name == "format_regex" and arg:
        return format_regex(arg)
    if name == "length_penalty":
        try:
            free = int(arg) if arg is not None else 0
        except ValueError:
            raise TunepipeError(f"train.reward_funcs: length_penalty={arg!r}: N must be a whole number of tokens") from None
        return length_penalty(free, max_completion_length)
    return None


BUILTINS = ("exact_match", "numeric_match", "format_regex=PATTERN", "length_penalty[=N]")


# -- resolving reward_funcs ------------------------------------------------------------


def resolve(spec: str, root: Path, max_completion_length: int) -> tuple[str, Callable | Path]:
    """(display name, the callable or a reward-model dir) for one `reward_funcs` entry."""
    name, _, arg = spec.partition("=")
    found = builtin(name.strip(), arg if "=" in spec else None, max_completion_length)
    if found is not None:
        return name.strip(), found
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        return user_function(spec, root)
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    if path.is_dir():
        return REWARD_MODEL_NAME, path
    raise TunepipeError(f"train.reward_funcs: {spec!r} is not a built-in reward, a configs/rewards/FILE.py:function "
                        "reference or a reward-model directory",
                        hint=f"built-ins: {', '.join(BUILTINS)}")


def user_function(spec: str, root: Path) -> tuple[str, Callable]:
    """Import `FILE.py:function` from configs/rewards/ (and only there: the DVC train stage depends
    on that folder, so a reward change re-runs training)."""
    file_part, function_name = spec.split(":", 1)
    path = (root / file_part).resolve()
    rewards = (root / REWARDS_DIR).resolve()
    if rewards not in path.parents:
        raise TunepipeError(f"train.reward_funcs: {spec!r}: reward files live in {REWARDS_DIR}/ of the project",
                            hint=f"move {file_part} to {REWARDS_DIR}/ (the DVC train stage depends on that folder, "
                                 "so editing a reward re-runs training)")
    if not path.is_file():
        raise TunepipeError(f"train.reward_funcs: {spec!r}: no such file {path}")
    module_name = f"tunepipe_rewards.{path.stem}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # a reward module may use dataclasses or pickling
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        raise TunepipeError(f"train.reward_funcs: {spec!r}: importing {file_part} failed: "
                            f"{type(exc).__name__}: {exc}", hint="run `python " + file_part + "` to see the error") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TunepipeError(f"train.reward_funcs: {spec!r}: {file_part} defines no function {function_name!r}")
    check_signature(function, f"{file_part}:{function_name}")
    return function_name, function


def check_signature(function: Callable, where: str) -> None:
    """TRL calls every reward with these keywords (and the dataset's other columns): a function
    that cannot take them fails here, not after the first rollout."""
    try:
        inspect.signature(function).bind(prompts=[], completions=[], completion_ids=[], reference=[],
                                         prompt_ids=[], trainer_state=None, log_extra=None, log_metric=None)
    except TypeError as exc:
        raise TunepipeError(f"reward function {where} has the wrong signature: {exc}",
                            hint="define it as `def f(completions, reference, **kwargs) -> list[float]`") from None
    except ValueError:
        return  # a builtin without an introspectable signature: the probe will tell


def file_hashes(specs: list[str], root: Path) -> dict[str, str]:
    """sha256 of every reward file named in `specs` (for MLflow: which reward code trained this run)."""
    hashes = {}
    for spec in specs:
        if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
            file_part = spec.split(":", 1)[0]
            path = root / file_part
            if path.is_file():
                hashes[file_part] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


# -- checking what a reward returns ------------------------------------------------------


def checked(name: str, function: Callable, where: str | None = None) -> Callable:
    """`function` with its errors and outputs turned into TunepipeErrors naming it (`where`:
    the reward_funcs entry, e.g. configs/rewards/math.py:correct)."""
    where = where or name

    @functools.wraps(function)
    def reward(*args, **kwargs):
        expected = len(kwargs["completions"])
        try:
            values = function(*args, **kwargs)
        except TunepipeError:
            raise
        except Exception as exc:
            raise TunepipeError(f"reward function {where} raised {type(exc).__name__}: {exc}",
                                hint="the traceback (tunepipe --debug) shows where") from exc
        return validated(where, values, expected)
    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def validated(name: str, values, expected: int) -> list[float | None]:
    try:
        values = list(values)
    except TypeError:
        raise TunepipeError(f"reward function {name} returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != expected:
        raise TunepipeError(f"reward function {name} returned {len(values)} rewards for {expected} completions",
                            hint="return one reward per completion (None where it does not apply)")
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, str) or not hasattr(value, "__float__"):  # ints, floats, bools, numpy / torch scalars
            raise TunepipeError(f"reward function {name} returned {value!r} for completion {i}: not a number")
        number = float(value)
        if not math.isfinite(number):
            raise TunepipeError(f"reward function {name} returned {number} for completion {i}",
                                hint="return a finite number, or None where the reward does not apply")
        out.append(number)
    return out


def probe(rewards: list[tuple[str, Callable]], prompts: list[str], references: list[str], tokenizer) -> None:
    """Call every function reward once on real rows, each reference standing in for a completion,
    before any model time is spent: import-time is not the only place a reward can be wrong."""
    completion_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in references]
    for _, function in rewards:
        function(prompts=prompts, completions=references, completion_ids=completion_ids, reference=references,
                 prompt_ids=[[] for _ in prompts], trainer_state=None, log_extra=lambda *a: None,
                 log_metric=lambda *a: None)
