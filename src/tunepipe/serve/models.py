"""What `tunepipe serve` loads: one causal LM with every adapter as a named PEFT adapter, or a reward model.

Several `adapter_name_or_path` entries: `tunepipe chat` and the merge stack them (merge in
order, LLaMA-Factory's rule), but a server can do better than one stacked model: each entry
becomes its own model id, all loaded once on one base with PEFT's multi-adapter API
(`PeftModel.from_pretrained(..., adapter_name=)`, `load_adapter`), and a request's `model`
picks the adapter the engine sets for its forwards. Ids: `API_MODEL_NAME` (default
gpt-3.5-turbo) always names the first adapter (so a client written for a one-model server
keeps working), and with several adapters each is also served under its entry's last path
component (`saves/identity` -> `identity`, `org/repo@v2` -> `repo`).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)


def adapter_ids(entries: list[str], model_name: str) -> list[str]:
    """The model id of each `adapter_name_or_path` entry (several entries only)."""
    ids = [Path(entry.split("@", 1)[0].rstrip("/")).name for entry in entries]
    for entry, name in zip(entries, ids):
        if not name or ids.count(name) > 1 or name == model_name:
            raise TunepipeError(
                f"model.adapter_name_or_path: the served id of {entry!r} would be {name!r}, which is "
                f"{'empty' if not name else 'not unique'} among {ids + [model_name]}",
                hint="put each adapter in a directory of its own name (the id is that name), or set "
                     "API_MODEL_NAME to a name no adapter has")
    return ids


def load_multi_adapter(base, paths: list[Path], names: list[str]):
    """`base` with every adapter loaded under its name, the first one active."""
    from peft import PeftModel

    from tunepipe.models.base import load_tokenizer, peft_wrapping, resize_embeddings
    from tunepipe.models.trained import grown_tokenizer_dir

    for path in paths:  # adapters trained with new tokens carry rows past the base's vocabulary
        if (grown := grown_tokenizer_dir(path)) is not None:
            resize_embeddings(base, len(load_tokenizer(grown)))
    # PEFT adapter names become module keys (no dots allowed), so the engine uses a0, a1, ...
    # and the served ids map onto them.
    with peft_wrapping():
        model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0", is_trainable=False)
        for index, path in enumerate(paths[1:], start=1):
            model.load_adapter(str(path), adapter_name=f"a{index}", is_trainable=False)
    model.set_adapter("a0")
    log.info("serving %d adapters on one base: %s", len(paths), ", ".join(names))
    return model.eval()


def is_reward_model(paths: list[Path]) -> bool:
    """A SEQ_CLS adapter or a *ForSequenceClassification checkpoint (what `stage: rm` writes)."""
    if not paths:
        return False
    last = Path(paths[-1])
    adapter = last / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS"
    config = last / "config.json"
    return config.is_file() and any(name.endswith("ForSequenceClassification")
                                    for name in json.loads(config.read_text()).get("architectures") or [])


@dataclass
class RewardModel:
    """A reward model behind `/v1/score/evaluation`: one scoring call at a time (one model, one thread)."""

    model: object
    tokenizer: object
    lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, texts: list[str], max_length: int | None) -> list[float]:
        from tunepipe.evaluate.scoring import score_texts

        with self.lock:
            return score_texts(self.model, self.tokenizer, texts, max_length=max_length)
