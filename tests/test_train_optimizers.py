"""LLaMA-Factory's optimizer switches (GaLore, APOLLO, BAdam, Adam-mini, Muon), each read off the
optimizer the Trainer ends up with: its type, which parameters get the low-rank projection and with
which rank / scale, then a few steps on a fixed batch that lower the loss. One full `run_train`
(layer-wise GaLore, whose steps happen in gradient hooks) goes through the whole train step.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.train_runs import tiny_run
from tunepipe.config import Config, TrainConfig
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train import run_train
from tunepipe.train.trainer_setup import optimizer_for, training_arguments

pytest.importorskip("galore_torch", reason="the optimizer packages come with the dev extra (make setup)")


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config)


def built(tmp_path, **train):
    """(model, the Trainer's optimizer, its scheduler) for full fine-tuning with these train keys."""
    from transformers import Trainer

    model = tiny_qwen3()
    cfg = Config(train=TrainConfig(finetuning_type="full", learning_rate=1e-2, gradient_accumulation_steps=1,
                                   **train))
    cfg.check()
    args = training_arguments(cfg, Layout.at(tmp_path), has_eval=False)
    trainer = Trainer(model=model, args=args, optimizers=(optimizer_for(model, cfg.train), None))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    return model, optimizer, trainer.lr_scheduler


def losses_over_steps(model, optimizer, scheduler, steps: int = 4) -> list[float]:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_learns(losses: list[float]) -> None:
    assert losses[-1] < losses[0] - 0.05, losses


def projected_names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_galore_projects_every_linear_weight_but_the_head(tmp_path):
    from galore_torch import GaLoreAdamW

    model, optimizer, scheduler = built(tmp_path, use_galore=True, galore_rank=4, galore_scale=0.5,
                                        galore_update_interval=3, galore_proj_type="left")
    assert type(optimizer) is GaLoreAdamW
    low_rank = [g for g in optimizer.param_groups if "rank" in g]
    assert len(low_rank) == 1
    group = low_rank[0]
    assert (group["rank"], group["scale"], group["update_proj_gap"], group["proj_type"]) == (4, 0.5, 3, "left")
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert projected_names(model, group) == linear - {"lm_head.weight"}
    assert_learns(losses_over_steps(model, optimizer, scheduler))


def test_galore_target_names_pick_the_projected_modules(tmp_path):
    model, optimizer, _ = built(tmp_path, use_galore=True, galore_target="q_proj,v_proj")
    group = next(g for g in optimizer.param_groups if "rank" in g)
    assert projected_names(model, group) == {f"model.layers.{i}.self_attn.{m}.weight"
                                             for i in range(2) for m in ("q_proj", "v_proj")}
    assert group["rank"] == 16 and group["scale"] == 2.0  # LLaMA-Factory's defaults


def test_apollo_groups_carry_its_projection(tmp_path):
    from apollo_torch import APOLLOAdamW

    model, optimizer, scheduler = built(tmp_path, use_apollo=True, apollo_rank=2, apollo_scale=8.0,
                                        apollo_scale_type="tensor", apollo_proj="svd")
    assert type(optimizer) is APOLLOAdamW
    group = next(g for g in optimizer.param_groups if "rank" in g)
    assert (group["rank"], group["scale"], group["scale_type"], group["proj"]) == (2, 8.0, "tensor", "svd")
    assert "lm_head.weight" not in projected_names(model, group) and len(group["params"]) == 14
    assert_learns(losses_over_steps(model, optimizer, scheduler))


def test_badam_trains_one_layer_at_a_time(tmp_path):
    from badam import BlockOptimizer

    model, optimizer, scheduler = built(tmp_path, use_badam=True, badam_switch_mode="descending",
                                        badam_switch_interval=3)
    assert type(optimizer) is BlockOptimizer
    trainable = {name.split(".")[2] for name, p in model.named_parameters()
                 if p.requires_grad and name.startswith("model.layers.")}
    assert trainable == {"1"}  # descending: the last decoder layer first, every other one frozen
    frozen_before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    # the package switches once (steps + 1) is a multiple of the interval: here after 2 steps
    losses = losses_over_steps(model, optimizer, scheduler, steps=2)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, frozen_before, rtol=0, atol=0)
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad  # now layer 0's turn
    assert not model.model.layers[1].mlp.up_proj.weight.requires_grad
    assert_learns(losses + losses_over_steps(model, optimizer, scheduler, steps=2))


def test_badam_ratio_mode(tmp_path):
    from badam import BlockOptimizerRatio

    model, optimizer, scheduler = built(tmp_path, use_badam=True, badam_mode="ratio", badam_update_ratio=0.5)
    assert type(optimizer) is BlockOptimizerRatio and optimizer.update_ratio == 0.5
    assert_learns(losses_over_steps(model, optimizer, scheduler))


def test_adam_mini_keeps_one_second_moment_per_block(tmp_path):
    from adam_mini import Adam_mini

    model, optimizer, scheduler = built(tmp_path, use_adam_mini=True, adam_beta2=0.99)
    assert type(optimizer) is Adam_mini
    assert {g["beta2"] for g in optimizer.param_groups} == {0.99}
    assert_learns(losses_over_steps(model, optimizer, scheduler))
    up = model.model.layers[0].mlp.up_proj.weight
    assert optimizer.state[up]["vmean"].numel() == up.shape[0]  # one per neuron, where Adam keeps one per entry


def test_muon_on_hidden_matrices_adamw_on_the_rest(tmp_path):
    from tunepipe.train.optimizers import MuonWithAdamW

    model, optimizer, scheduler = built(tmp_path, use_muon=True, weight_decay=0.01)
    assert type(optimizer) is MuonWithAdamW
    muon, adamw = optimizer.parts
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    muon_names = projected_names(model, muon.param_groups[0])
    assert "lm_head.weight" not in muon_names and "model.embed_tokens.weight" not in muon_names
    assert muon_names == {name for name, p in model.named_parameters()
                          if p.ndim == 2 and "embed" not in name and "lm_head" not in name}
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert_learns(losses_over_steps(model, optimizer, scheduler))
    # the scheduler's learning rate reaches both optimizers, and both save their state
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
    state = optimizer.state_dict()
    assert state["muon"]["state"] and state["adamw"]["state"]


def test_layerwise_galore_trains_through_the_train_step(tmp_path, tiny_model_dir):
    cfg, layout = tiny_run(tmp_path, tiny_model_dir, finetuning_type="full", max_steps=3,
                           use_galore=True, galore_layerwise=True, galore_rank=4)
    summary = run_train(cfg, layout)
    assert summary["steps"] == 3
    from safetensors.torch import load_file

    from tunepipe.models.base import load_causal_lm

    trained = load_file(layout.full / "model.safetensors")
    original = load_causal_lm(layout.base_model).state_dict()
    changed = [name for name, value in trained.items() if name in original
               and not torch.equal(value, original[name])]
    assert any("q_proj" in name for name in changed), changed  # each weight stepped in its own hook


def test_optimizer_choices_are_checked():
    with pytest.raises(TunepipeError, match="use_galore and use_badam each pick the optimizer"):
        load_config(None, ["train.use_galore=true", "train.use_badam=true", "train.finetuning_type=full"])
    with pytest.raises(TunepipeError, match="not lora"):
        load_config(None, ["train.use_apollo=true"])
    with pytest.raises(TunepipeError, match="gradient_accumulation_steps: 1"):
        load_config(None, ["train.use_galore=true", "train.galore_layerwise=true", "train.finetuning_type=full"])
    with pytest.raises(TunepipeError, match="finetuning_type full"):
        load_config(None, ["train.use_badam=true", "train.finetuning_type=freeze"])
