"""`infer_backend: vllm` on a machine without CUDA or vLLM: a clear error before anything loads; the
mapping of LLaMA-Factory's vllm_* keys onto vLLM's engine / sampling arguments; and the engine glue
(stop tokens, finish reasons, cancellation -> abort, LoRA per adapter) driven by a recorded vLLM
stand-in that has vLLM's call signatures (the real engine runs in bench/gpu_check.sh's vllm row)."""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tests.fixtures.serving import serve_config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout


@pytest.fixture
def nothing_loads(monkeypatch):
    from tunepipe.models import trained as loading
    from tunepipe.serve import server

    for module in (loading, server):
        for name in ("load_base", "load_trained", "tokenizer_for"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a model or tokenizer was loaded"))


def test_without_cuda_vllm_is_refused_before_loading(tiny_model_dir, tmp_path, nothing_loads):
    from tunepipe.serve.server import build_served

    cfg = serve_config(tiny_model_dir, **{"model.infer_backend": "vllm"})
    with pytest.raises(TunepipeError, match="infer_backend: vllm needs a CUDA GPU, and this machine has none"):
        build_served(cfg, Layout.at(tmp_path))


def test_without_vllm_installed_it_is_refused_before_loading(tiny_model_dir, tmp_path, nothing_loads, monkeypatch):
    import importlib.util

    import torch

    from tunepipe.serve.server import build_served

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    cfg = serve_config(tiny_model_dir, **{"model.infer_backend": "vllm"})
    with pytest.raises(TunepipeError, match="infer_backend: vllm, but vllm is not installed"):
        build_served(cfg, Layout.at(tmp_path))


def test_llamafactory_keys_map_onto_vllm_engine_arguments(tiny_model_dir, tmp_path):
    from tunepipe.serve.vllm_engine import engine_args

    cfg = serve_config(tiny_model_dir, **{"model.infer_backend": "vllm", "model.vllm_maxlen": 1024,
                                          "model.vllm_gpu_util": 0.5, "model.vllm_enforce_eager": "true",
                                          "model.vllm_max_lora_rank": 16, "model.dtype": "bfloat16"})
    assert engine_args(cfg, tiny_model_dir, []) == {
        "model": str(tiny_model_dir), "dtype": "bfloat16", "max_model_len": 1024, "gpu_memory_utilization": 0.5,
        "enforce_eager": True, "trust_remote_code": False, "seed": cfg.train.seed, "disable_log_stats": True}
    with_loras = engine_args(cfg, tiny_model_dir, [tmp_path / "a", tmp_path / "b"])
    assert (with_loras["enable_lora"], with_loras["max_lora_rank"], with_loras["max_loras"]) == (True, 16, 2)


def test_an_adapter_above_vllm_max_lora_rank_is_refused(strong_adapter):
    import json

    from tunepipe.serve.vllm_engine import check_lora_ranks

    rank = json.loads((strong_adapter / "adapter_config.json").read_text())["r"]
    check_lora_ranks([strong_adapter], rank)
    with pytest.raises(TunepipeError, match=f"vllm_max_lora_rank is {rank - 1}, but the adapter .* has rank {rank}"):
        check_lora_ranks([strong_adapter], rank - 1)


# -- the engine glue, against a stand-in with vLLM's signatures ---------------------------------
@dataclass
class Completion:
    token_ids: list
    finish_reason: str | None


@dataclass
class Output:
    outputs: list
    finished: bool


class RecordedEngine:
    """`AsyncLLMEngine.from_engine_args(args)`, `generate(prompt, params, request_id, lora_request=)`
    streaming DELTA outputs, `abort(request_id)`, `shutdown()`; answers with `script` tokens."""

    script: ClassVar[list] = [5, 6, 7, 2, 9]  # 2: the stop token
    built: ClassVar[list] = []
    calls: ClassVar[list] = []
    aborted: ClassVar[list] = []
    gate = None  # a threading.Event the stream waits on after its first token (to test cancelling)

    @classmethod
    def from_engine_args(cls, args):
        cls.built.append(args)
        return cls()

    async def generate(self, prompt, params, request_id, *, lora_request=None):
        RecordedEngine.calls.append((prompt, params, request_id, lora_request))
        for index, token in enumerate(self.script[:params.max_tokens]):
            if index == 1 and RecordedEngine.gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, RecordedEngine.gate.wait)
            stop = token in params.stop_token_ids
            last = stop or index + 1 == params.max_tokens
            reason = ("stop" if stop else "length") if last else None
            yield Output([Completion([token], reason)], last)
            if last:
                return

    async def abort(self, request_id):
        RecordedEngine.aborted.append(request_id)

    def shutdown(self):
        pass


@pytest.fixture
def recorded_vllm(monkeypatch):
    def kwargs_class(name):
        return type(name, (), {"__init__": lambda self, **kw: self.__dict__.update(kw)})

    vllm = types.ModuleType("vllm")
    vllm.AsyncLLMEngine, vllm.AsyncEngineArgs = RecordedEngine, kwargs_class("AsyncEngineArgs")
    vllm.SamplingParams, vllm.TokensPrompt = kwargs_class("SamplingParams"), dict
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    lora = types.ModuleType("vllm.lora")
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = kwargs_class("LoRARequest")
    for name, module in {"vllm": vllm, "vllm.sampling_params": sampling_params, "vllm.lora": lora,
                         "vllm.lora.request": lora_request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    RecordedEngine.built, RecordedEngine.calls, RecordedEngine.aborted, RecordedEngine.gate = [], [], [], None
    return RecordedEngine


def run_request(engine, prompt, sampling, adapter=None):
    from tunepipe.serve.engine import Request

    events, done = [], threading.Event()

    def emit(token, reason):
        events.append((token, reason))
        if reason is not None:
            done.set()

    request = engine.submit(Request(prompt=prompt, sampling=sampling, emit=emit, adapter=adapter))
    return request, events, done


def test_vllm_engine_streams_tokens_until_the_stop_token_and_maps_every_argument(recorded_vllm, tmp_path):
    from tunepipe.serve.engine import Sampling
    from tunepipe.serve.vllm_engine import VllmEngine, lora_requests

    loras = lora_requests(["a0", "a1"], [tmp_path / "first", tmp_path / "second"])
    engine = VllmEngine({"model": "m", "enable_lora": True}, stop_ids=[2], loras=loras)
    try:
        assert recorded_vllm.built[0].__dict__ == {"model": "m", "enable_lora": True}
        _, events, done = run_request(engine, [1, 3], Sampling(max_tokens=10, temperature=0.5, top_p=0.9, seed=4),
                                      adapter="a1")
        assert done.wait(10)
        assert events == [(5, None), (6, None), (7, None), (None, "stop")]  # the stop token is not emitted
        prompt, params, _, lora = recorded_vllm.calls[0]
        assert prompt == {"prompt_token_ids": [1, 3]}
        assert (params.temperature, params.top_p, params.seed, params.max_tokens) == (0.5, 0.9, 4, 10)
        assert (params.stop_token_ids, params.output_kind, params.detokenize) == ([2], "delta", False)
        assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("a1", 2, str(tmp_path / "second"))

        _, events, done = run_request(engine, [1], Sampling(max_tokens=2))
        assert done.wait(10)
        assert events == [(5, None), (6, None), (None, "length")]
        assert recorded_vllm.calls[1][3] is None  # no adapter named: the model as loaded
    finally:
        engine.close()


def test_a_cancelled_request_is_aborted_in_vllm(recorded_vllm):
    from tunepipe.serve.engine import Sampling
    from tunepipe.serve.vllm_engine import VllmEngine

    recorded_vllm.gate = threading.Event()
    engine = VllmEngine({"model": "m"}, stop_ids=[2], loras={})
    try:
        request, events, done = run_request(engine, [1], Sampling(max_tokens=10))
        request.cancel()  # the client went away after the first token
        recorded_vllm.gate.set()
        assert done.wait(10)
        assert events[-1] == (None, "cancelled")
        assert recorded_vllm.aborted == [recorded_vllm.calls[0][2]]
    finally:
        engine.close()
