"""LLaMA-Factory's loss variants, each equal to its formula on a fixed batch: the DFT loss
(`use_dft_loss`), EAFT (`use_eaft_loss`), ASFT (`use_asft_loss`), the MoE router loss (`moe_aux_loss_coef`), LD-DPO (`ld_alpha`) and the BCO
term mixed into DPO (`pref_bco_weight`); and LoRA `all` leaving MoE router gates alone."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.families import build_family_dir
from tests.fixtures.pref_rows import preference_dataset
from tests.fixtures.sft_shards import collated_sft_batch
from tunepipe.config import TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train import loss as loss_module
from tunepipe.train.batches.collate import IGNORE_INDEX, SegmentCollator
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model.moe import configure_router_loss
from tunepipe.train.preference.common import build_reference, forward_log_probs
from tunepipe.train.preference.data import PreferenceCollator
from tunepipe.train.preference.dpo import dpo_objective
from tunepipe.train.preference.losses import bco_pair_loss


@pytest.fixture(scope="module")
def sft_batch(tiny_model_dir):
    return collated_sft_batch(tiny_model_dir)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return build_family_dir(tmp_path_factory.mktemp("mixtral") / "model", "mixtral")


def trainable(model_dir):
    model = load_causal_lm(model_dir, attn_implementation="eager")
    return model.requires_grad_(True)


def formula_dft(model, batch) -> torch.Tensor:
    """LLaMA-Factory's DFT on the model's full logits: sum(ce * exp(-ce).detach()) / trained tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:].reshape(-1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="none")
    kept = targets != IGNORE_INDEX
    return (ce[kept] * torch.exp(-ce[kept]).detach()).sum() / kept.sum()


@pytest.mark.parametrize("head", ["chunked", "model_head"])
def test_dft_loss_equals_its_formula_value_and_gradients(tiny_model_dir, sft_batch, monkeypatch, head):
    if head == "model_head":  # LoRA'd / scaled heads: the model projects, the weights apply after
        monkeypatch.setattr(loss_module, "plain_output_head", lambda model: None)
    else:
        monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab: 7)  # several chunks
    reference, ours = trainable(tiny_model_dir), trainable(tiny_model_dir)
    want = formula_dft(reference, sft_batch)
    want.backward()
    got = causal_lm_loss(ours, sft_batch, dft=True)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() < causal_lm_loss(ours, sft_batch).item() - 1e-3  # every weight is < 1: not plain CE
    for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def formula_eaft(model, batch, alpha: float) -> torch.Tensor:
    """LLaMA-Factory's EAFT on the full logits: each token's CE x (H_top20 / 3) ** alpha, the
    entropy H of the softmax over the 20 largest logits, detached; summed / trained tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    kept = targets != IGNORE_INDEX
    ce = F.cross_entropy(flat[kept], targets[kept], reduction="none")
    top = flat[kept].detach().topk(20, dim=-1).values
    log_p = top - torch.logsumexp(top, dim=-1, keepdim=True)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (ce * (entropy / 3.0) ** alpha).sum() / kept.sum()


def use_head(head: str, monkeypatch) -> None:
    if head == "model_head":  # LoRA'd / scaled heads: the model projects, the weights apply after
        monkeypatch.setattr(loss_module, "plain_output_head", lambda model: None)
    else:
        monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab: 7)  # several chunks


def assert_same_grads(reference, ours) -> None:
    pairs = [(name, p, q) for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True)
             if p.requires_grad]
    assert pairs
    for name, p, q in pairs:
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("head", ["chunked", "model_head"])
def test_eaft_loss_equals_its_formula_value_and_gradients(tiny_model_dir, sft_batch, monkeypatch, head):
    use_head(head, monkeypatch)
    reference, ours = trainable(tiny_model_dir), trainable(tiny_model_dir)
    want = formula_eaft(reference, sft_batch, alpha=0.5)
    want.backward()
    got = causal_lm_loss(ours, sft_batch, eaft_alpha=0.5)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    plain, dft = causal_lm_loss(ours, sft_batch).item(), causal_lm_loss(ours, sft_batch, dft=True).item()
    assert abs(got.item() - plain) > 1e-3 and abs(got.item() - dft) > 1e-3
    assert causal_lm_loss(ours, sft_batch, eaft_alpha=0.0).item() == pytest.approx(plain, rel=1e-5)
    assert_same_grads(reference, ours)


def formula_asft(policy, batch, alpha: float) -> torch.Tensor:
    """LLaMA-Factory's ASFT on the full logits: DFT + alpha x mean over trained positions of
    KL(q || p) = sum_v q_v (log q_v - log p_v), q the reference (here: the adapter disabled)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = policy(**inputs).logits.float()[:, :-1]
    with torch.no_grad(), policy.disable_adapter():
        ref_logits = policy(**inputs).logits.float()[:, :-1]
    targets = batch["labels"][:, 1:]
    kept = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[kept], targets[kept], reduction="none")
    kl = F.kl_div(logits[kept].log_softmax(-1), ref_logits[kept].softmax(-1), reduction="none").sum(-1)
    return (ce * torch.exp(-ce).detach()).sum() / kept.sum() + alpha * kl.sum() / kept.sum()


@pytest.mark.parametrize("head", ["chunked", "model_head"])
def test_asft_loss_equals_dft_plus_the_kl_anchor_value_and_gradients(tiny_model_dir, sft_batch, monkeypatch, head):
    """The LoRA policy against its base (the reference ASFT builds for an adapter: adapter off)."""
    from tunepipe.config import Config
    from tunepipe.train.asft import reference_anchor

    use_head(head, monkeypatch)
    reference, ours = lora_policy(tiny_model_dir), lora_policy(tiny_model_dir)
    want = formula_asft(reference, sft_batch, alpha=0.3)
    want.backward()
    anchor = reference_anchor(Config(train=TrainConfig(use_asft_loss=True, asft_alpha=0.3)), ours)
    assert anchor.reference.kind == "adapter_off"
    got = causal_lm_loss(ours, sft_batch, anchor=anchor)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    dft = causal_lm_loss(ours, sft_batch, dft=True).item()
    assert got.item() > dft + 1e-3  # the KL term is there (the adapter moved the policy off its base)
    assert_same_grads(reference, ours)


def one_sample_batch(ids: list[int]) -> dict:
    labels = [IGNORE_INDEX] * 3 + ids[3:]
    return SegmentCollator(0, "eager", flatten=True)([{"input_ids": ids, "labels": labels}])


def test_moe_router_loss_is_added_with_the_coefficient(mixtral_dir):
    """transformers' own MoE loss (labels given: mean CE + router_aux_loss_coef * aux) equals
    tunepipe's loss with `moe_aux_loss_coef`; without the key the loss is plain CE."""
    ids = torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = one_sample_batch(ids)
    model = trainable(mixtral_dir)
    plain = causal_lm_loss(model, batch)
    assert model.config.output_router_logits is False
    configure_router_loss(model, TrainConfig(moe_aux_loss_coef=0.25))
    assert model.config.router_aux_loss_coef == 0.25
    got = causal_lm_loss(model, batch)
    labels = torch.tensor([[IGNORE_INDEX] * 3 + ids[3:]])
    out = model(input_ids=torch.tensor([ids]), labels=labels)
    assert out.aux_loss.item() > 0.5  # the Switch loss is ~1 for a balanced router
    assert got.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert got.item() == pytest.approx(plain.item() + 0.25 * out.aux_loss.item(), rel=1e-5)
    # accumulation: a micro-batch holding a third of the step's tokens adds a third of the router loss
    count = int((batch["shift_labels"] != IGNORE_INDEX).sum())
    third = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(3 * count))
    assert third.item() == pytest.approx(got.item() / 3, rel=1e-5)


def test_router_loss_is_refused_where_it_cannot_apply(mixtral_dir, tiny_model_dir, caplog):
    with pytest.raises(TunepipeError, match="moe_aux_loss_coef"):
        configure_router_loss(trainable(mixtral_dir), TrainConfig(stage="dpo", moe_aux_loss_coef=0.1))
    dense = trainable(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="tunepipe.train.model.moe"):
        configure_router_loss(dense, TrainConfig(moe_aux_loss_coef=0.1))
    assert "has no router; ignored" in caplog.text


def test_lora_all_skips_the_router_gate_unless_named(tmp_path):
    from peft.tuners.lora import LoraLayer

    from tunepipe.config import Config, ModelConfig, TrackingConfig
    from tunepipe.layout import Layout
    from tunepipe.train.model.model_setup import build_trainable_model

    layout = Layout.at(tmp_path)
    build_family_dir(layout.base_model, "qwen2_moe")

    def wrapped(target):
        cfg = Config(model=ModelConfig(model_name_or_path=str(layout.base_model)),
                     train=TrainConfig(lora_target=target, lora_rank=4), tracking=TrackingConfig(report_to="none"))
        model = build_trainable_model(cfg, layout)
        return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    assert "shared_expert_gate" not in wrapped("all")
    assert {"gate_proj", "q_proj"} <= wrapped("all")  # the shared expert's MLP is wrapped
    assert wrapped("q_proj,shared_expert_gate") == {"q_proj", "shared_expert_gate"}


# --- preference losses ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pref_batch(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    dataset = preference_dataset(tokenizer).select(range(3))
    return PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])


def lora_policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same LoRA A init on every call
    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a "trained" adapter, so policy and reference differ
            param.data.normal_(std=0.5)
    return model


def answer_token_logps(model, batch) -> list[list[float]]:
    """Each row's answer-token log-probs in order, from the model's full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = logits.log_softmax(-1)
    rows = []
    for row in range(batch["labels"].shape[0]):
        labels = batch["labels"][row]
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous answer
        rows.append([logps[row, p, labels[p + 1]].item() for p in positions])
    return rows


def test_ld_dpo_log_probs_and_loss_equal_the_formula(tiny_model_dir, pref_batch):
    """LD-DPO: the policy's tokens past the shorter answer of a pair count alpha times; the
    reference's do not; the DPO loss takes the result as it takes plain log-probs."""
    alpha, beta = 0.3, 0.1
    model = lora_policy(tiny_model_dir)
    tokens = answer_token_logps(model, pref_batch)
    pairs = len(tokens) // 2
    want = []
    for row, values in enumerate(tokens):
        other = tokens[row + pairs] if row < pairs else tokens[row - pairs]
        shared = min(len(values), len(other))
        want.append(sum(values[:shared]) + alpha * sum(values[shared:]))
    assert any(len(tokens[i]) != len(tokens[i + pairs]) for i in range(pairs))  # some tail to weigh
    got, _ = forward_log_probs(model, pref_batch, ld_alpha=alpha)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-4)
    plain, _ = forward_log_probs(model, pref_batch)
    assert not torch.allclose(got, plain, atol=1e-2)

    train_cfg = TrainConfig(stage="dpo", pref_beta=beta, ld_alpha=alpha)
    reference = build_reference(model, train_cfg)
    loss, _ = dpo_objective(train_cfg, reference)(model, pref_batch)
    ref = reference.log_probs(model, pref_batch)
    policy = torch.tensor(want)
    margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
    assert loss.item() == pytest.approx((-F.logsigmoid(beta * margin)).mean().item(), rel=1e-5)


def test_bco_pair_loss_matches_formula():
    got = bco_pair_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                        torch.tensor([-2.5]), beta=0.5, delta=0.1)
    chosen, rejected = 0.5 * (-1.0 + 2.0), 0.5 * (-3.0 + 2.5)
    want = -F.logsigmoid(torch.tensor(chosen - 0.1)) - F.logsigmoid(torch.tensor(-(rejected - 0.1)))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_dpo_with_bco_weight_mixes_the_two_around_the_running_mean_reward(tiny_model_dir, pref_batch):
    """(DPO + w * BCO) / (1 + w) per pair; BCO's baseline is the running mean of each batch's
    mean reward, so the second batch sees the mean of both batches' means."""
    weight, beta = 0.5, 0.1
    model = lora_policy(tiny_model_dir)
    train_cfg = TrainConfig(stage="dpo", pref_beta=beta, pref_bco_weight=weight)
    reference = build_reference(model, train_cfg)
    objective = dpo_objective(train_cfg, reference)
    policy, _ = forward_log_probs(model, pref_batch)
    ref = reference.log_probs(model, pref_batch)
    second = {key: value[[0, 3]] for key, value in pref_batch.items()}  # pair 0 alone
    means = []
    for batch, policy_logps, ref_logps in ((pref_batch, policy, ref),
                                           (second, policy[[0, 3]], ref[[0, 3]])):
        loss, _ = objective(model, batch)
        pc, pr = policy_logps.detach().chunk(2)
        rc, rr = ref_logps.chunk(2)
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
        means.append(torch.cat([chosen, rejected]).mean().item())
        delta = sum(means) / len(means)
        dpo = -F.logsigmoid(chosen - rejected)
        bco = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
        assert loss.item() == pytest.approx(((dpo + weight * bco) / (1 + weight)).mean().item(), rel=1e-5)
        assert abs(loss.item() - dpo.mean().item()) > 1e-4  # the BCO term changes the loss
    assert means[0] != pytest.approx(means[1])  # the baseline really moved


# --- what the config hands the SFT trainer, and what it refuses -------------------------------


def built_sft_trainer(tmp_path, tiny_model_dir, monkeypatch, **train):
    """The CausalLMTrainer `sft.train` builds for these train keys (nothing trained)."""
    from tests.fixtures.train_runs import tiny_run
    from tunepipe.train import sft
    from tunepipe.train.trainer_setup import training_arguments

    cfg, layout = tiny_run(tmp_path, tiny_model_dir, rows=2, **train)

    def build_only(cfg, layout, model, tokenizer, has_eval, make_trainer):
        return make_trainer(training_arguments(cfg, layout, has_eval), [])

    monkeypatch.setattr(sft, "run_session", build_only)
    return sft.train(cfg, layout)


def test_the_sft_trainer_gets_the_configured_token_loss(tmp_path, tiny_model_dir, monkeypatch):
    eaft = built_sft_trainer(tmp_path / "eaft", tiny_model_dir, monkeypatch, use_eaft_loss=True, eaft_alpha=0.5)
    assert (eaft.eaft_alpha, eaft.dft, eaft.anchor) == (0.5, False, None)
    asft = built_sft_trainer(tmp_path / "asft", tiny_model_dir, monkeypatch, use_asft_loss=True, asft_alpha=0.2,
                             ref_model=str(tiny_model_dir))
    assert (asft.anchor.reference.kind, asft.anchor.alpha, asft.eaft_alpha) == ("ref_model", 0.2, None)
    assert not any(p.requires_grad for p in asft.anchor.reference.frozen.parameters())


@pytest.mark.parametrize(("keys", "message"), [
    ({"use_dft_loss": True, "use_asft_loss": True}, "each replace the token loss: keep one"),
    ({"use_eaft_loss": True, "label_smoothing_factor": 0.1}, "smoothing the targets too"),
    ({"use_asft_loss": True, "stage": "dpo"}, "applies to the next-token stages"),
    ({"use_eaft_loss": True, "eaft_alpha": -1.0}, "must be >= 0"),
])
def test_sft_loss_keys_that_cannot_combine_are_refused(keys, message):
    with pytest.raises(TunepipeError, match=message):
        TrainConfig(**keys).check()
