"""New tokens end to end on the tiny model: add_tokens / new_special_tokens_config through tokenize,
LoRA training, export and the loaders.

One module-scoped run (validate -> tokenize -> train 4 LoRA steps -> export) backs the checks: the
new tokens encode as one id each in the shards and are listed in meta.json; their embedding rows
exist and start as init_special_tokens says; LoRA trains them (modules_to_save); the export's
tokenizer has them and its logits equal base + adapter; eval / chat load the grown tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from tunepipe.config.loader import load_config
from tunepipe.layout import Layout

PLAIN, SPECIAL = "<tool_x>", "<think>"
DESCRIPTION = "quick brown fox"


def write_dataset(folder: Path) -> Path:
    rows = [{"instruction": f"Question {i}: what is the capital of France?",
             "output": f"{SPECIAL} think first {PLAIN} The capital of France is Paris."} for i in range(8)]
    folder.mkdir(parents=True)
    (folder / "think.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"think": {"file_name": "think.json"}}), encoding="utf-8")
    return folder


def vocab_config(root: Path, tiny_model_dir: Path, *extra: str):
    return load_config(None, [
        f"model.model_name_or_path={tiny_model_dir}", "data.dataset=think", f"data.dataset_dir={root / 'data'}",
        "data.val_size=0.25", f"model.add_tokens={PLAIN}", "model.init_special_tokens=desc_init",
        f"model.new_special_tokens_config={{'{SPECIAL}': '{DESCRIPTION}'}}",
        "train.max_steps=4", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-2", "train.lr_scheduler_type=constant", "train.logging_steps=1",
        "train.lora_target=q_proj", "eval.predict_with_generate=false", "tracking.report_to=none", f"export.export_dir={root / 'export'}", *extra])


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory, tiny_model_dir):
    from tunepipe.data.tokenize import run_tokenize
    from tunepipe.data.validate import run_validate
    from tunepipe.evaluate.run import run_evaluate
    from tunepipe.export.merge import run_export
    from tunepipe.models.base import prepare_base_model
    from tunepipe.train import run_train

    root = tmp_path_factory.mktemp("vocab")
    write_dataset(root / "data")
    cfg = vocab_config(root, tiny_model_dir)
    layout = Layout.at(root)
    prepare_base_model(cfg.model, layout.base_model)
    run_validate(cfg, layout)
    run_tokenize(cfg, layout)
    run_train(cfg, layout)
    metrics = run_export(cfg, layout)
    run_evaluate(cfg, layout)
    return cfg, layout, metrics


def base_rows(tiny_model_dir) -> int:
    from tunepipe.models.base import load_tokenizer

    return len(load_tokenizer(tiny_model_dir))


def test_new_tokens_encode_as_one_id_and_are_recorded(vocab_run, tiny_model_dir):
    from tunepipe.models.base import load_tokenizer

    _, layout, _ = vocab_run
    meta = json.loads((layout.tokenized / "meta.json").read_text())
    assert meta["added_tokens"] == [PLAIN, SPECIAL]
    assert meta["token_descriptions"] == {SPECIAL: DESCRIPTION}
    grown = load_tokenizer(layout.tokenized / "tokenizer")
    ids = grown.convert_tokens_to_ids([PLAIN, SPECIAL])
    assert ids == [base_rows(tiny_model_dir), base_rows(tiny_model_dir) + 1]
    assert [grown.added_tokens_decoder[i].special for i in ids] == [False, True]
    for row in load_from_disk(str(layout.tokenized / "train")):
        answer = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert answer.count(ids[0]) == 1 and answer.count(ids[1]) == 1  # one id each, trained on


def test_rows_start_as_init_special_tokens_says(vocab_run, tiny_model_dir):
    from transformers import set_seed

    from tunepipe.models.base import load_causal_lm, load_tokenizer
    from tunepipe.train.model.vocabulary import grow_vocabulary

    cfg, layout, _ = vocab_run
    set_seed(cfg.train.seed)
    model = load_causal_lm(tiny_model_dir, dtype="float32")
    original = model.get_input_embeddings().weight.detach().clone()
    train = grow_vocabulary(model, cfg, layout)
    weight = model.get_input_embeddings().weight.detach()
    plain_id, special_id = load_tokenizer(layout.tokenized / "tokenizer").convert_tokens_to_ids([PLAIN, SPECIAL])
    assert weight.shape[0] == 64 * math.ceil((plain_id + 2) / 64)  # padded to a multiple of 64, as LLaMA-Factory
    assert model.get_output_embeddings().weight.shape == weight.shape
    described = load_tokenizer(tiny_model_dir)(DESCRIPTION, add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[special_id], original[described].mean(dim=0))  # desc_init: exact
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[[plain_id, special_id]] = False
    torch.testing.assert_close(weight[plain_id], weight[others].mean(dim=0))  # no description: the mean row
    assert torch.equal(weight[:plain_id], original)  # the old rows untouched
    assert {"embed_tokens", "lm_head"} <= set(train.additional_target)


@pytest.mark.parametrize("method", ["noise_init", "desc_init_w_noise"])
def test_noise_is_added_to_the_start_row_with_std_one_over_sqrt_hidden(method, tiny_model_dir):
    from tunepipe.models.base import load_tokenizer
    from tunepipe.train.model.vocabulary import initialise_rows

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(len(tokenizer) + 20, 256)
    model = type("M", (), {"get_input_embeddings": lambda self: embedding, "get_output_embeddings": lambda self: None})()
    ids = list(range(len(tokenizer), len(tokenizer) + 20))
    tokenizer.add_tokens([f"<n{i}>" for i in range(20)], special_tokens=True)
    described = tokenizer(DESCRIPTION, add_special_tokens=False)["input_ids"]
    start = (embedding.weight[described] if method == "desc_init_w_noise" else embedding.weight[:ids[0]]).mean(dim=0)
    initialise_rows(model, tokenizer, ids, method, {f"<n{i}>": DESCRIPTION for i in range(20)})
    noise = (embedding.weight[ids] - start).detach()
    assert abs(noise.mean().item()) < 0.01
    assert noise.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)


def test_lora_trains_the_new_rows(vocab_run, tiny_model_dir):
    from transformers import set_seed

    from tunepipe.models.base import load_causal_lm, load_tokenizer
    from tunepipe.train.model.vocabulary import grow_vocabulary

    cfg, layout, _ = vocab_run
    set_seed(cfg.train.seed)
    start = load_causal_lm(tiny_model_dir, dtype="float32")
    grow_vocabulary(start, cfg, layout)
    saved = load_file(str(layout.adapter / "adapter_model.safetensors"))
    trained = next(value for key, value in saved.items() if "embed_tokens" in key)
    ids = load_tokenizer(layout.tokenized / "tokenizer").convert_tokens_to_ids([PLAIN, SPECIAL])
    before = start.get_input_embeddings().weight.detach()
    assert trained.shape == before.shape
    for token_id in ids:
        assert not torch.allclose(trained[token_id], before[token_id])  # the new rows trained
    assert (layout.adapter / "tokenizer_config.json").is_file()


def test_export_has_the_tokens_and_equals_base_plus_adapter(vocab_run, tiny_model_dir):
    from tunepipe.models.base import load_causal_lm, load_tokenizer
    from tunepipe.models.trained import apply_adapters, tokenizer_for, trained_source

    cfg, layout, metrics = vocab_run
    assert metrics["max_abs_logit_diff"] <= metrics["logit_tolerance"] <= 1e-3
    export = Path(cfg.export.export_dir)
    exported = load_tokenizer(export)
    ids = exported.convert_tokens_to_ids([PLAIN, SPECIAL])
    assert ids == [base_rows(tiny_model_dir), base_rows(tiny_model_dir) + 1]
    merged = load_causal_lm(export, dtype="float32").eval()
    unmerged = apply_adapters(load_causal_lm(tiny_model_dir, dtype="float32"), [layout.adapter])
    prompt = torch.tensor([[5, 9, *ids, 12]])  # the new tokens as input, and their logits as output
    with torch.no_grad():
        torch.testing.assert_close(merged(prompt).logits, unmerged(prompt).logits, atol=1e-4, rtol=1e-4)
    # evaluate / chat / serve load the grown tokenizer from the adapter
    assert len(tokenizer_for(cfg, tiny_model_dir, trained_source(cfg, layout))) == len(exported)


def test_special_token_keys_and_their_precedence(tiny_model_dir):
    from tunepipe.config import ModelConfig
    from tunepipe.data.vocabulary import extend_tokenizer
    from tunepipe.models.base import load_tokenizer

    def added(**keys):
        tokenizer = load_tokenizer(tiny_model_dir)
        tokens, _ = extend_tokenizer(tokenizer, ModelConfig(**keys))
        return tokens, [tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids(t)].special for t in tokens]

    assert added(add_tokens="<a>,<b>", add_special_tokens=["<s1>"]) == (["<a>", "<b>", "<s1>"], [False, False, True])
    assert added(new_special_tokens="<old>") == (["<old>"], [True])  # LLaMA-Factory's older name
    # new_special_tokens_config's tokens replace add_special_tokens', as in LLaMA-Factory
    assert added(add_special_tokens="<s1>", new_special_tokens_config={"<d>": "text"}) == (["<d>"], [True])
    assert added(add_tokens="<|im_end|>") == ([], [])  # already in the vocabulary: nothing grows


def test_resize_vocab_alone_trains_the_embedding_modules(tmp_path, tiny_model_dir):
    from tunepipe.models.base import load_causal_lm
    from tunepipe.train.model.vocabulary import grow_vocabulary

    layout = Layout.at(tmp_path)
    layout.tokenized.mkdir(parents=True)
    (layout.tokenized / "meta.json").write_text(json.dumps({"added_tokens": []}))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, dtype="float32")
    before = model.get_input_embeddings().weight.detach().clone()
    assert grow_vocabulary(model, load_config(None, []), layout).additional_target is None
    train = grow_vocabulary(model, load_config(None, ["model.resize_vocab=true"]), layout)
    assert train.additional_target == ["embed_tokens", "lm_head"]
    assert torch.equal(model.get_input_embeddings().weight, before)  # nothing to add: no row changed


def test_eval_scores_the_tuned_and_the_grown_base(vocab_run):
    _, layout, _ = vocab_run
    report = json.loads((layout.metrics / "eval.json").read_text())
    tuned, base = report["tuned"]["eval_loss"], report["base"]["eval_loss"]
    assert math.isfinite(tuned) and math.isfinite(base) and tuned < base  # the new tokens were learnt


def test_create_new_adapter_keeps_the_rows_the_merged_adapter_trained(vocab_run, tiny_model_dir):
    from tunepipe.models.base import load_causal_lm, load_tokenizer
    from tunepipe.train.model.adapters import merge_named_adapters
    from tunepipe.train.model.vocabulary import grow_vocabulary

    _, layout, _ = vocab_run
    on_top = vocab_config(layout.root, tiny_model_dir, "train.create_new_adapter=true",
                          f"model.adapter_name_or_path={layout.adapter}")
    model = merge_named_adapters(load_causal_lm(tiny_model_dir, dtype="float32"), on_top)
    ids = load_tokenizer(layout.tokenized / "tokenizer").convert_tokens_to_ids([PLAIN, SPECIAL])
    trained = model.get_input_embeddings().weight[ids].detach().clone()
    train = grow_vocabulary(model, on_top, layout)  # the same shards' tokens: already trained, not re-initialised
    assert torch.equal(model.get_input_embeddings().weight[ids], trained)
    assert {"embed_tokens", "lm_head"} <= set(train.additional_target)
