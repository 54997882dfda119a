"""A pre-quantized GPTQ checkpoint (tests/fixtures/hub_standins.py's packed tiny Llama 3) on CPU:
loaded through gptqmodel's torch kernel with its dequantize uncompiled, it computes what a plain
model with the dequantized weights computes, and `lora_target: all` wraps every quantized linear
in PEFT's GPTQ LoRA layer, which trains."""

from __future__ import annotations

import pytest

pytest.importorskip("gptqmodel", reason="make setup installs gptqmodel (--no-deps)")
pytest.importorskip("optimum")

GPTQ_ID = "TechxGenus/Meta-Llama-3-8B-Instruct-GPTQ"


@pytest.fixture(scope="module")
def gptq_model(tmp_path_factory):
    from tests.fixtures.hub_standins import PREQUANTIZED, save_prequantized
    from tunepipe.models.base import load_causal_lm

    path = tmp_path_factory.mktemp("gptq")
    save_prequantized(path, PREQUANTIZED[GPTQ_ID], seed=3)
    return path, load_causal_lm(path, dtype="float32")


def test_gptq_checkpoint_loads_with_the_torch_kernel_and_equals_its_dequantized_weights(gptq_model):
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from transformers import AutoConfig, AutoModelForCausalLM

    path, model = gptq_model
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, TorchLinear)}
    assert len(quantized) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert not any("dequantize_weight" in vars(m) for m in quantized.values())  # no torch.compile wrapper

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config).eval()
    state = {k: v for k, v in model.state_dict().items() if k in dense.state_dict()}
    with torch.no_grad():
        for name, module in quantized.items():
            state[f"{name}.weight"] = module.dequantize_weight().T.float()  # stored (in, out)
    dense.load_state_dict(state, strict=True)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got, want = model.eval()(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_target_all_wraps_every_quantized_linear_and_trains(gptq_model):
    import torch
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from tunepipe.config import TrainConfig
    from tunepipe.train.model.adapters import attach_lora, quantized_linear_names

    _, model = gptq_model
    names = quantized_linear_names(model)
    peft_model = attach_lora(model, TrainConfig(finetuning_type="lora", lora_target="all", lora_rank=4))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if isinstance(m, GPTQLoraLinear))
    assert wrapped == names and len(names) == 14
    peft_model.train()
    ids = torch.arange(3, 40).unsqueeze(0)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # lora_A's are 0 while B is 0
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
