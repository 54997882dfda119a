"""Training batches are exact on the model families people fine-tune (tests/fixtures/families.py).

The reference for every family is each sample run alone through the family's own eager
attention (no mask, no neighbour). Padding-free rows (samples end to end, what `tunepipe
train` feeds), packed rows padded to the longest row, and preference pairs must give the
same logits, loss and LoRA gradients on every attention path tunepipe picks on this
machine (`flash_attn: auto | sdpa | disabled`), sliding windows shorter than the samples
and Gemma 2's attention-logit softcap included. Then the per-family setup: which linear
layers `lora_target: all` wraps, `additional_target`, freeze, QLoRA, merge + export +
reload + generation as the evaluate stage and `tunepipe chat` run it.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.families import (
    ATTENTION,
    DELTANET,
    FAMILIES,
    WINDOW,
    build_family_dir,
    family_config,
    greedy_without_cache,
    model_class,
    recurrent,
)
from tests.fixtures.tiny_model import build_tokenizer
from tunepipe.config import Config, ModelConfig, TrackingConfig, TrainConfig
from tunepipe.layout import Layout
from tunepipe.train.batches.collate import IGNORE_INDEX, SegmentCollator, model_inputs
from tunepipe.train.loss import causal_lm_loss

NAMES = sorted(FAMILIES)
CHOICES = ["auto", "sdpa", "disabled"]  # fa2 needs a CUDA GPU and flash-attn (untested here)
LENGTHS = [40, 23, 37, 18, 29]  # every sample but one is longer than WINDOW
PROMPT = 3  # leading tokens of each sample that carry no label
# (family, flash_attn) pairs. A family with recurrent layers gets padded rows without sample boundaries,
# where `auto` is plain SDPA (no varlen kwargs) and `disabled` is the eager reference itself: auto only
KERNELS = [(name, choice) for name in NAMES for choice in CHOICES if not recurrent(name) or choice == "auto"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """name -> a run root whose models/base/ holds that family's tiny model (built on first use)."""
    built = {}

    def get(name: str) -> Layout:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            build_family_dir(Layout.at(root).base_model, name)
            built[name] = Layout.at(root)
        return built[name]

    return get


def samples() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=generator).tolist() for n in LENGTHS]


def labelled(ids: list[int]) -> dict:
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * PROMPT + ids[PROMPT:]}


def config_for(layout: Layout, flash_attn: str = "auto", **train) -> Config:
    train = {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 4, **train}
    return Config(model=ModelConfig(model_name_or_path=str(layout.base_model), flash_attn=flash_attn),
                  train=TrainConfig(**train), tracking=TrackingConfig(report_to="none"))


def randomise_lora_b(model, seed: int = 1) -> None:
    """PEFT starts B at zero (the adapter changes nothing and A gets no gradient): give it weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def trainable_pair(layout: Layout, flash_attn: str):
    """(model under test as `tunepipe train` builds it, the same weights on eager attention)."""
    from tunepipe.train.model.model_setup import build_trainable_model

    cfg = config_for(layout, flash_attn)
    model = build_trainable_model(cfg, layout)
    reference = build_trainable_model(config_for(layout, "disabled"), layout)
    randomise_lora_b(reference)
    model.load_state_dict(reference.state_dict())
    assert reference.config._attn_implementation == "eager"
    return model, reference


def alone(reference, rows: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each sample's logits run alone, and the summed-then-averaged next-token loss."""
    logits, total, count = [], 0.0, 0
    for row in rows:
        out = reference(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
        targets = torch.tensor(row["labels"][1:])
        total = total + F.cross_entropy(out[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
        logits.append(out)
    return logits, total / count


def batch_logits(model, batch: dict, groups: list[list[int]], rows: list[dict]) -> list[torch.Tensor]:
    """The logits of each sample of `batch`, in sample order (`groups`: the samples of each row)."""
    out = model(**model_inputs(batch)).logits
    pieces = {}
    for row, group in enumerate(groups):
        start = 0
        for index in group:
            length = len(rows[index]["input_ids"])
            pieces[index] = out[row, start:start + length]
            start += length
    return [pieces[index] for index in range(len(rows))]


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if "lora_" in name}


def layouts(rows: list[dict], attn: str, name: str) -> dict[str, tuple]:
    """padding-free (all samples in one row) and packed (two packed rows + one, right-padded):
    name -> (collated batch, the sample indices of each row). A family with recurrent layers
    trains on right-padded rows, one sample each (what `sft.batch_layout` gives it)."""
    if recurrent(name):
        return {"padded": (SegmentCollator(0, attn, sample_boundaries=False)(rows), [[i] for i in range(len(rows))])}
    groups = [[0, 1], [2, 3], [4]]
    packed = [{"input_ids": [t for i in group for t in rows[i]["input_ids"]],
               "labels": [t for i in group for t in rows[i]["labels"]],
               "seq_lens": [LENGTHS[i] for i in group]} for group in groups]
    return {"padding_free": (SegmentCollator(0, attn, flatten=True)(rows), [list(range(len(rows)))]),
            "packed": (SegmentCollator(0, attn, flatten=False)(packed), groups)}


def expected_kernel(name: str, flash_attn: str) -> str:
    from tunepipe.train.batches.collate import VARLEN

    if FAMILIES[name].softcapped():
        return "eager"  # SDPA cannot softcap: tunepipe says so in one log line and uses eager
    return {"auto": VARLEN, "sdpa": "sdpa", "disabled": "eager"}[flash_attn]


@pytest.mark.parametrize(("name", "flash_attn"), KERNELS)
def test_batches_equal_each_sample_alone_on_eager(family_dirs, name, flash_attn, caplog):
    with caplog.at_level("INFO", logger="tunepipe.train.model.model_setup"):
        model, reference = trainable_pair(family_dirs(name), flash_attn)
    assert model.config._attn_implementation == expected_kernel(name, flash_attn)
    fell_back = [r for r in caplog.records if "softcaps attention logits" in r.getMessage()]
    assert len(fell_back) == (FAMILIES[name].softcapped() and flash_attn != "disabled")
    rows = [labelled(ids) for ids in samples()]
    want_logits, want_loss = alone(reference, rows)
    want_loss.backward()
    want_grads = lora_grads(reference)
    attn = model.config._attn_implementation
    for layout_name, (batch, groups) in layouts(rows, attn, name).items():
        for got, want in zip(batch_logits(model, batch, groups, rows), want_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{layout_name} logits ({attn})")
        model.zero_grad()
        loss = causal_lm_loss(model, batch)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-5, msg=f"{layout_name} loss ({attn})")
        loss.backward()
        for key, grad in lora_grads(model).items():
            torch.testing.assert_close(grad, want_grads[key], rtol=0, atol=1e-5, msg=f"{layout_name} {key}")


@pytest.mark.parametrize("name", [n for n in NAMES if recurrent(n)])
def test_a_recurrent_family_trains_padded_rows_and_refuses_packed_ones(family_dirs, name):
    """Qwen3.5's linear-attention layers carry a state along the row: `tunepipe train` gives them
    right-padded rows without sample boundaries, and refuses packed shards. The guard: laid end to end
    (padding-free) on eager attention, the second sample's logits move away from its lone logits."""
    from tunepipe.errors import TunepipeError
    from tunepipe.train.batches.recurrent import refuse_packed_rows
    from tunepipe.train.model.model_setup import build_trainable_model
    from tunepipe.train.sft import batch_layout

    model = build_trainable_model(config_for(family_dirs(name), "disabled"), family_dirs(name))
    collator = batch_layout(model, 0)
    assert (collator.flatten, collator.sample_boundaries) == (False, False)
    with pytest.raises(TunepipeError, match="linear_attention layers, whose recurrent state runs across a packed row"):
        refuse_packed_rows(model.config, packed=True)
    refuse_packed_rows(model.config, packed=False)
    rows = [labelled(ids) for ids in samples()[:2]]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([rows[1]["input_ids"]]), use_cache=False).logits[0]
        flat = SegmentCollator(0, "eager", flatten=True)(rows)
        got = model(**model_inputs(flat)).logits[0, LENGTHS[0]:]
    assert (got - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].windowed()])
def test_the_window_and_the_softcap_change_the_reference(name):
    """Guards the test above: without its window (or softcap) the family's logits differ."""
    tokenizer = build_tokenizer()
    ids = torch.tensor([samples()[0]])
    torch.manual_seed(0)
    model = model_class(name)._from_config(family_config(name, tokenizer), attn_implementation="eager")
    plain = {"sliding_window": 10_000}
    if FAMILIES[name].softcapped():
        plain["attn_logit_softcapping"] = None
    other = model_class(name)._from_config(family_config(name, tokenizer, **plain), attn_implementation="eager")
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        gap = (model(ids).logits - other(ids).logits).abs().max().item()
    assert gap > 1e-2, f"{name}: window {WINDOW} does not matter for a {ids.shape[1]}-token sample"


@pytest.mark.parametrize(("name", "flash_attn"), KERNELS)
def test_preference_pairs_equal_each_answer_alone(family_dirs, name, flash_attn):
    """DPO / KTO batches (chosen rows then rejected rows, right-padded) on the same kernels."""
    from tunepipe.train.preference.common import forward_log_probs
    from tunepipe.train.preference.data import PreferenceCollator

    model, reference = trainable_pair(family_dirs(name), flash_attn)
    rows = [labelled(ids) for ids in samples()]
    pairs = [{"chosen_input_ids": a["input_ids"], "chosen_labels": a["labels"],
              "rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"]}
             for a, b in ((rows[0], rows[1]), (rows[2], rows[3]))]
    batch = PreferenceCollator(0)(pairs)
    got, _ = forward_log_probs(model, batch)
    want = torch.stack([forward_log_probs(reference, PreferenceCollator(0)([pair]))[0]
                        for pair in pairs]).T.reshape(-1)  # per pair (chosen, rejected) -> chosen..., rejected...
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def lora_owner(module_name: str) -> str:
    """The wrapped layer's name: LoRA on fused MoE experts nests one wrapper per parameter."""
    while module_name.endswith(".base_layer"):
        module_name = module_name.removesuffix(".base_layer")
    return module_name


@pytest.mark.parametrize("name", NAMES)
def test_lora_all_wraps_exactly_the_family_linear_layers(family_dirs, name):
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from tunepipe.train.model.model_setup import build_trainable_model

    model = build_trainable_model(config_for(family_dirs(name), additional_target="embed_tokens"),
                                  family_dirs(name))
    wrapped = {lora_owner(full).rsplit(".", 1)[-1] for full, module in model.named_modules()
               if isinstance(module, LoraLayer)}
    assert wrapped == FAMILIES[name].linear_layers
    for index, layer in enumerate(model.base_model.model.model.layers):  # Qwen3.5: linear attention, then full
        kind = FAMILIES[name].config.get("layer_types", [None] * 2)[index]
        unused = {"full_attention": DELTANET, "linear_attention": ATTENTION}.get(kind, set())
        per_layer = {lora_owner(full) for full, m in layer.named_modules() if isinstance(m, LoraLayer)}
        assert len(per_layer) == len(FAMILIES[name].linear_layers - unused)
    saved = [full for full, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    # the families tie lm_head to embed_tokens: the head stays tied to the trained copy
    assert sorted(full.rsplit(".", 1)[-1] for full in saved) == ["embed_tokens", "lm_head"]
    trainable = {full for full, param in model.named_parameters() if param.requires_grad}
    assert any("embed_tokens.modules_to_save" in full for full in trainable)
    assert all("lora_" in full or "modules_to_save" in full for full in trainable)


@pytest.mark.parametrize("name", NAMES)
def test_freeze_trains_the_last_layer_only(family_dirs, name):
    from tunepipe.train.model.model_setup import build_trainable_model

    model = build_trainable_model(config_for(family_dirs(name), finetuning_type="freeze",
                                             freeze_trainable_layers=1), family_dirs(name))
    trainable = {full for full, param in model.named_parameters() if param.requires_grad}
    last = {f"model.layers.1.{full}" for full, _ in model.model.layers[1].named_parameters()}
    assert trainable == last


@pytest.mark.parametrize("name", NAMES)
def test_qlora_4bit_trains(family_dirs, name):
    import bitsandbytes as bnb

    from tunepipe.train.model.model_setup import build_trainable_model
    from tunepipe.train.sft import batch_layout

    layout = family_dirs(name)
    cfg = config_for(layout)
    cfg.model.quantization_bit = 4
    model = build_trainable_model(cfg, layout)
    quantized = {lora_owner(full).rsplit(".", 1)[-1] for full, m in model.named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == FAMILIES[name].quantized_layers()
    rows = [labelled(ids) for ids in samples()[:2]]
    batch = batch_layout(model, 0)(rows)  # what `tunepipe train` feeds the family
    before = {full: p.detach().clone() for full, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[full]) for full, p in model.named_parameters() if "lora_A" in full)


@pytest.mark.parametrize("name", NAMES)
def test_merge_export_reloads_and_generates(family_dirs, name, tmp_path):
    """The export stage's merge equals base + adapter; the export loads with plain transformers;
    the evaluate stage's and `tunepipe chat`'s generation (KV cache, windows) equal a cache-free
    greedy decode of the export."""
    from transformers import AutoModelForCausalLM

    from tunepipe.chat import stream_answer
    from tunepipe.data.chat.templates import ChatFormat
    from tunepipe.evaluate.generation import generate, stop_token_ids
    from tunepipe.export.merge import run_export
    from tunepipe.models.base import load_tokenizer
    from tunepipe.train.model.adapters import save_adapter
    from tunepipe.train.model.model_setup import build_trainable_model

    base = family_dirs(name)
    layout = Layout.at(tmp_path)
    cfg = config_for(base)
    cfg.export.export_dir = str(tmp_path / "export")
    adapted = build_trainable_model(cfg, base)
    randomise_lora_b(adapted, seed=2)
    save_adapter(adapted, layout.adapter)
    cfg.model.adapter_name_or_path = str(layout.adapter)
    metrics = run_export(cfg, layout)
    assert metrics["max_abs_logit_diff"] <= 1e-4

    exported = AutoModelForCausalLM.from_pretrained(cfg.export.export_dir, dtype=torch.float32).eval()
    adapted.eval()
    long_sample = torch.tensor([samples()[0]])
    with torch.no_grad():
        torch.testing.assert_close(exported(long_sample).logits, adapted(long_sample).logits, rtol=0, atol=1e-4)

    tokenizer = load_tokenizer(cfg.export.export_dir)
    cfg.eval.max_new_tokens = 12
    stops = stop_token_ids(tokenizer, exported.generation_config)
    prompt = samples()[2][:30]  # longer than the window: decoding reads a rolled KV cache
    [answer] = generate(exported, tokenizer, [prompt], cfg.eval, batch_size=1, seed=0)
    want = greedy_without_cache(exported, prompt, 12, stops)
    assert answer == tokenizer.decode(want, skip_special_tokens=True).strip()

    messages = [{"role": "user", "content": "What is the capital of France? Give three tips."}]
    ids = ChatFormat(tokenizer, cfg.data.template).prompt_ids(None, messages)  # what `tunepipe chat` sends
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    said = stream_answer(exported, tokenizer, ids, cfg, io.StringIO())
    assert len(ids) > WINDOW
    assert said == tokenizer.decode(greedy_without_cache(exported, ids, 12, stops), skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", NAMES)
def test_reward_model_scores_a_padded_batch_like_each_row_alone(family_dirs, name):
    """`stage: rm` (TRL's right-padded batches, reward at the last real token) on the kernel
    tunepipe picks equals each row alone on eager; a family without a value head is a clear error."""
    from tunepipe.errors import TunepipeError
    from tunepipe.train.preference.data import pad_rows
    from tunepipe.train.preference.rm import build_reward_model

    layout = family_dirs(name)
    if name in ("granite", "qwen3_5_moe"):  # transformers ships no sequence-classification class for them
        with pytest.raises(TunepipeError, match="no sequence-classification"):
            build_reward_model(config_for(layout), layout, pad_token_id=0)
        return
    model = build_reward_model(config_for(layout), layout, pad_token_id=0)
    reference = build_reward_model(config_for(layout, "disabled"), layout, pad_token_id=0)
    randomise_lora_b(reference)
    model.load_state_dict(reference.state_dict())
    rows = samples()[:3]
    batch = pad_rows(rows, rows, pad_token_id=0)
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        want = torch.cat([reference(input_ids=torch.tensor([ids])).logits[:, 0] for ids in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
