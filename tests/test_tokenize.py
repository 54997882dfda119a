"""tokenize: golden equality with apply_chat_template, label masks, truncation, pt, preference,
KTO, packing, eval split, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from tests.test_registry import write_info
from tunepipe.config.loader import load_config
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.checks.validated import read_manifest, read_validated
from tunepipe.data.tokenize import run_tokenize
from tunepipe.data.tokenizing.encoding import IGNORE, infer_seqlen
from tunepipe.data.tokenizing.packing import unpack
from tunepipe.data.validate import run_validate
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_tokenizer

SFT_DEMO = "identity,alpaca_en_demo,glaive_toolcall_en_demo"


def run_stages(root: Path, base_dir: Path, dataset_dir, dataset: str, stage: str = "sft", **data):
    (root / "models").mkdir(parents=True, exist_ok=True)
    if not (root / "models" / "base").exists():
        (root / "models" / "base").symlink_to(base_dir)
    overrides = [f"data.dataset={dataset}", f"data.dataset_dir={dataset_dir}", f"train.stage={stage}",
                 "data.val_size=0", *[f"data.{key}={value}" for key, value in data.items()]]
    cfg = load_config(None, overrides)
    layout = Layout.at(root)
    run_validate(cfg, layout)
    metrics = run_tokenize(cfg, layout)
    return cfg, layout, metrics


def validated_rows(layout: Layout, split: str = "train") -> list[dict]:
    return [row for item in read_manifest(layout.validated)[split]
            for row in read_validated(layout.validated, item)]


def hf_ids(tokenizer, messages, tools=None, template=None, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


def expected_sft(tokenizer, fmt: ChatFormat, row: dict) -> tuple[list[int], list[int]]:
    """input_ids and labels straight from apply_chat_template: each answer's span is trained."""
    chat = fmt.chat(row)
    template = fmt.tool_template if chat.tools else fmt.template
    ids = hf_ids(tokenizer, chat.messages, chat.tools, template)
    labels = [IGNORE] * len(ids)
    for j in chat.answers:
        start = len(hf_ids(tokenizer, chat.messages[:j], chat.tools, template, add_generation_prompt=True))
        end = len(hf_ids(tokenizer, chat.messages[:j + 1], chat.tools, template))
        assert ids[:start] == hf_ids(tokenizer, chat.messages[:j], chat.tools, template, add_generation_prompt=True)
        labels[start:end] = ids[start:end]
    labels[0] = IGNORE
    return ids, labels


def check_golden(tmp_path, base_dir, lf_demo_dir, max_samples):
    _, layout, metrics = run_stages(tmp_path, base_dir, lf_demo_dir, SFT_DEMO, cutoff_len=100000,
                                    max_samples=max_samples)
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    rows = [r for item in read_manifest(layout.validated)["train"]
            for r in read_validated(layout.validated, item)[:max_samples]]
    shard = load_from_disk(str(layout.tokenized / "train"))
    assert len(shard) == len(rows) == metrics["train"]["rows_out"] and metrics["train"]["truncated"] == 0
    assert any(row["tools"] for row in rows) and any(len(row["messages"]) > 2 for row in rows)
    for row, sample in zip(rows, shard):
        ids, labels = expected_sft(tokenizer, fmt, row)
        assert sample["input_ids"] == ids, row["_source"]
        assert sample["labels"] == labels, row["_source"]


def test_golden_sft_ids_equal_apply_chat_template_tiny(tmp_path, tiny_model_dir, lf_demo_dir):
    check_golden(tmp_path, tiny_model_dir, lf_demo_dir, max_samples=150)


@pytest.mark.slow
def test_golden_sft_ids_equal_apply_chat_template_smollm2(tmp_path, smollm2_base_dir, lf_demo_dir):
    # SmolLM2's template injects its default system prompt when the first message is not system
    check_golden(tmp_path, smollm2_base_dir, lf_demo_dir, max_samples=60)


def test_train_on_prompt_and_mask_history(tmp_path, tiny_model_dir, lf_demo_dir):
    _, layout, _ = run_stages(tmp_path / "a", tiny_model_dir, lf_demo_dir, "glaive_toolcall_en_demo",
                              cutoff_len=100000, max_samples=40, train_on_prompt=True)
    for sample in load_from_disk(str(layout.tokenized / "train")):
        assert sample["labels"] == [IGNORE] + sample["input_ids"][1:]
    _, layout, _ = run_stages(tmp_path / "b", tiny_model_dir, lf_demo_dir, "glaive_toolcall_en_demo",
                              cutoff_len=100000, max_samples=40, mask_history=True)
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    for row, sample in zip(validated_rows(layout), load_from_disk(str(layout.tokenized / "train"))):
        chat = fmt.chat(row)
        start = len(hf_ids(tokenizer, chat.messages[:chat.answers[-1]], add_generation_prompt=True))
        assert all(label == IGNORE for label in sample["labels"][:start])
        assert sample["labels"][start:] == sample["input_ids"][start:]


def test_infer_seqlen_is_llamafactorys_policy():
    assert infer_seqlen(10, 100, 64) == (10, 54)  # short prompt: the answer is cut
    assert infer_seqlen(100, 10, 64) == (54, 10)  # short answer: the prompt is cut
    assert infer_seqlen(100, 100, 64) == (32, 32)  # both long: cut in proportion
    assert infer_seqlen(5, 5, 64) == (5, 5)


def long_rows(folder: Path) -> Path:
    rows = [{"instruction": "word " * 80, "output": "answer " * 80}, {"instruction": "short", "output": "ok"}]
    return write_info(folder, {"long": {"file_name": "long.json"}}, {"long.json": json.dumps(rows)})


def test_truncation_keeps_heads_and_overlong_drop_counts(tmp_path, tiny_model_dir):
    folder = long_rows(tmp_path / "d")
    _, layout, metrics = run_stages(tmp_path / "t", tiny_model_dir, folder, "long", cutoff_len=64)
    assert (metrics["train"]["truncated"], metrics["train"]["rows_out"]) == (1, 2)
    truncated = load_from_disk(str(layout.tokenized / "train"))[0]
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    full, labels = expected_sft(tokenizer, fmt, validated_rows(layout)[0])
    prompt_len = labels.index(next(label for label in labels if label != IGNORE))
    source, target = infer_seqlen(prompt_len, len(full) - prompt_len, 64)
    assert len(truncated["input_ids"]) == 64 == source + target
    assert truncated["input_ids"] == full[:source] + full[prompt_len:prompt_len + target]
    assert truncated["labels"] == [IGNORE] * source + full[prompt_len:prompt_len + target]
    _, _, metrics = run_stages(tmp_path / "drop", tiny_model_dir, folder, "long", cutoff_len=64, overlong="drop")
    assert (metrics["train"]["dropped_overlong"], metrics["train"]["rows_out"]) == (1, 1)


def test_pretraining_blocks(tmp_path, tiny_model_dir, lf_demo_dir):
    _, layout, metrics = run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "c4_demo", "pt", cutoff_len=256,
                                    max_samples=20)
    tokenizer = load_tokenizer(layout.base_model)
    docs = [tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in validated_rows(layout)[:20]]
    shard = load_from_disk(str(layout.tokenized / "train"))
    stream = [t for doc in docs for t in doc]
    assert [t for block in shard["input_ids"] for t in block] == stream
    assert all(len(b) == 256 for b in shard["input_ids"][:-1]) and 0 < len(shard["input_ids"][-1]) <= 256
    assert all(s["labels"] == [IGNORE] + s["input_ids"][1:] for s in shard)
    assert metrics["train"]["rows_in"] == 20 and metrics["train"]["tokens"] == len(stream)


def test_preference_rows(tmp_path, tiny_model_dir, lf_demo_dir):
    _, layout, metrics = run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "dpo_en_demo", "dpo",
                                    cutoff_len=100000, max_samples=30)
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    shard = load_from_disk(str(layout.tokenized / "train"))
    assert shard.column_names == ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    for row, sample in zip(validated_rows(layout), shard):
        chosen, rejected = fmt.chat(row, row["chosen"]), fmt.chat(row, row["rejected"])
        prompt = hf_ids(tokenizer, chosen.messages[:-1], add_generation_prompt=True)
        for chat, side in ((chosen, "chosen"), (rejected, "rejected")):
            ids = hf_ids(tokenizer, chat.messages)
            assert sample[f"{side}_input_ids"] == ids
            assert sample[f"{side}_labels"] == [IGNORE] * len(prompt) + ids[len(prompt):]
    assert metrics["train"]["rows_out"] == 30


def test_kto_rows(tmp_path, tiny_model_dir, lf_demo_dir):
    _, layout, _ = run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "kto_en_demo", "kto",
                              cutoff_len=100000, max_samples=30)
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    shard = load_from_disk(str(layout.tokenized / "train"))
    rows = validated_rows(layout)[:30]
    assert list(shard["kto_tag"]) == [r["kto_tag"] for r in rows] and len(set(shard["kto_tag"])) == 2
    for row, sample in zip(rows, shard):
        chat = fmt.chat(row)
        prompt = hf_ids(tokenizer, chat.messages[:-1], add_generation_prompt=True)
        assert sample["input_ids"] == hf_ids(tokenizer, chat.messages)
        assert sample["labels"] == [IGNORE] * len(prompt) + sample["input_ids"][len(prompt):]


def test_packing_boundaries_reproduce_the_unpacked_samples(tmp_path, tiny_model_dir, lf_demo_dir):
    common = {"cutoff_len": 512, "max_samples": 60}
    _, plain, _ = run_stages(tmp_path / "plain", tiny_model_dir, lf_demo_dir, SFT_DEMO, **common)
    _, packed, metrics = run_stages(tmp_path / "packed", tiny_model_dir, lf_demo_dir, SFT_DEMO, packing=True,
                                    **common)
    samples = load_from_disk(str(plain.tokenized / "train"))
    rows = load_from_disk(str(packed.tokenized / "train"))
    assert rows.column_names == ["input_ids", "labels", "seq_lens"] and len(rows) < len(samples)
    unpacked = [pair for row in rows for pair in unpack(row)]
    assert all(sum(r["seq_lens"]) == len(r["input_ids"]) <= 512 for r in rows)
    assert sorted(unpacked) == sorted(zip(samples["input_ids"], samples["labels"]))
    tokens = sum(len(ids) for ids in samples["input_ids"])
    assert metrics["train"]["packing_efficiency"] == round(tokens / (len(rows) * 512), 4) > 0.8
    assert json.loads((packed.tokenized / "meta.json").read_text())["packing"] is True


def test_eval_split_rows_carry_prompt_ids_and_label_text(tmp_path, tiny_model_dir, lf_demo_dir):
    _, layout, metrics = run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "identity", cutoff_len=100000,
                                    val_size=0.2)
    train = load_from_disk(str(layout.tokenized / "train"))
    evals = load_from_disk(str(layout.tokenized / "eval"))
    assert len(train) + len(evals) == 91 and len(evals) == 19
    assert evals.column_names == ["input_ids", "labels", "prompt_ids", "label_text"]
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    by_answer = {row["messages"][-1]["content"]: row for row in validated_rows(layout)}
    for sample in evals:
        chat = fmt.chat(by_answer[sample["label_text"]])
        prompt = hf_ids(tokenizer, chat.messages[:-1], add_generation_prompt=True)
        assert sample["prompt_ids"] == prompt == sample["input_ids"][:len(prompt)]
    meta = json.loads((layout.tokenized / "meta.json").read_text())
    assert meta["rows"] == {"train": 72, "eval": 19} and meta["chat_template"] == tokenizer.chat_template
    assert metrics["eval"]["rows_out"] == 19


def test_empty_eval_split_still_exists(tmp_path, tiny_model_dir, lf_demo_dir):
    _, layout, _ = run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "identity", max_samples=5)
    evals = load_from_disk(str(layout.tokenized / "eval"))
    assert len(evals) == 0 and evals.column_names == ["input_ids", "labels", "prompt_ids", "label_text"]


def model_with_template(folder: Path, tiny_model_dir: Path, template: str) -> Path:
    """The tiny model with another chat template (files linked, tokenizer re-saved)."""
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name not in ("tokenizer_config.json", "chat_template.jinja", "tokenizer.json"):
            (folder / item.name).symlink_to(item)
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def test_a_template_that_rewrites_earlier_turns_names_the_row(tmp_path, tiny_model_dir, lf_demo_dir):
    # renders the final message in brackets: a prompt is then never a prefix of the whole chat
    odd = model_with_template(tmp_path / "odd", tiny_model_dir, "{% for m in messages %}{% if loop.last %}"
                              "[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}")
    with pytest.raises(TunepipeError, match=r"identity.json:0: the tokenizer's chat template renders earlier "
                                            r"turns differently .*answer 1") as err:
        run_stages(tmp_path / "run", odd, lf_demo_dir, "identity")
    assert "data.template" in err.value.hint


def test_a_boundary_merge_never_aborts_and_the_answer_continues_the_prompt(tmp_path, tiny_model_dir):
    """A template with no special token between prompt and answer (LLaMA-Factory's `empty`, or a
    base model's plain-text one): the tokenizer would merge the prompt's last characters with the
    answer's first. Each turn is tokenized alone, as at inference, and nothing aborts."""
    plain = model_with_template(tmp_path / "plain", tiny_model_dir,
                                "{% for m in messages %}{{ m.content }}{% endfor %}")
    rows = [{"instruction": "Say", "output": "ing"}, {"instruction": "a b", "output": "  c"}]
    folder = write_info(tmp_path / "d", {"merge": {"file_name": "merge.json"}}, {"merge.json": json.dumps(rows)})
    _, layout, metrics = run_stages(tmp_path / "run", plain, folder, "merge")
    tokenizer = load_tokenizer(layout.base_model)
    assert metrics["train"]["rows_out"] == 2
    for row, sample in zip(rows, load_from_disk(str(layout.tokenized / "train"))):
        prompt = tokenizer(row["instruction"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        assert sample["input_ids"] == prompt + answer
        assert sample["labels"] == [IGNORE] * len(prompt) + answer
    whole = tokenizer("Saying", add_special_tokens=False)["input_ids"]
    assert whole != sample_ids(layout, 0)  # the merge the rule avoids really happens with this tokenizer


def sample_ids(layout: Layout, index: int) -> list[int]:
    return load_from_disk(str(layout.tokenized / "train"))[index]["input_ids"]


def test_golden_with_a_template_that_renders_tools_itself(tmp_path, tiny_model_dir, lf_demo_dir):
    from tests.test_templates import TOOL_TEMPLATE

    model = model_with_template(tmp_path / "tools", tiny_model_dir, TOOL_TEMPLATE)
    _, layout, _ = run_stages(tmp_path / "run", model, lf_demo_dir, "glaive_toolcall_en_demo",
                              cutoff_len=100000, max_samples=40)
    tokenizer = load_tokenizer(layout.base_model)
    fmt = ChatFormat(tokenizer)
    assert fmt.native_tools
    rows = validated_rows(layout)[:40]
    assert any(row["tools"] for row in rows)
    for row, sample in zip(rows, load_from_disk(str(layout.tokenized / "train"))):
        ids, labels = expected_sft(tokenizer, fmt, row)
        assert (sample["input_ids"], sample["labels"]) == (ids, labels), row["_source"]


def test_stage_and_packing_mismatches(tmp_path, tiny_model_dir, lf_demo_dir):
    _cfg, layout, _ = run_stages(tmp_path, tiny_model_dir, lf_demo_dir, "identity", max_samples=5)
    with pytest.raises(TunepipeError, match="validated for train.stage=sft, not kto"):
        run_tokenize(load_config(None, ["train.stage=kto"]), layout)
    with pytest.raises(TunepipeError, match="packing applies to stage sft and pt"):
        run_stages(tmp_path / "dpo", tiny_model_dir, lf_demo_dir, "dpo_en_demo", "dpo", packing=True)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_are_byte_identical_on_rerun(tmp_path, tiny_model_dir, lf_demo_dir):
    params = {"cutoff_len": 256, "max_samples": 40, "val_size": 0.1, "packing": True}
    hashes = []
    for run in ("a", "b"):
        _, layout, _ = run_stages(tmp_path / run, tiny_model_dir, lf_demo_dir, SFT_DEMO, **params)
        hashes.append((tree_hashes(layout.tokenized), tree_hashes(layout.metrics)))
    files = hashes[0][0]
    assert {"train/state.json", "train/dataset_info.json", "eval/state.json", "meta.json"} <= set(files)
    assert any(name.endswith(".arrow") for name in files)
    assert hashes[0] == hashes[1]


# -- row selection: sampling, mixing, eval split --------------------------------------


def data_config(**data):
    return load_config(None, [f"data.{key}={value}" for key, value in data.items()]).data


def test_num_samples_max_samples_and_mixing():
    from tunepipe.data.tokenizing.mixing import mix, sample_rows

    rows = [{"i": i} for i in range(4)]
    assert sample_rows(rows, None, 2, seed=1) == rows[:2]
    more = sample_rows(rows, 10, None, seed=1)  # more than there are: every row twice, then 2 sampled
    assert len(more) == 10 and more[:8] == rows * 2 and len({r["i"] for r in more[8:]}) == 2
    a, b = [{"d": "a", "i": i} for i in range(3)], [{"d": "b", "i": i} for i in range(10)]
    assert mix([a, b], data_config()) == a + b
    under = mix([a, b], data_config(mix_strategy="interleave_under", interleave_probs="0.5,0.5"))
    over = mix([a, b], data_config(mix_strategy="interleave_over", interleave_probs=[0.5, 0.5]))
    assert sum(r["d"] == "a" for r in under) == 3 and sum(r["d"] == "b" for r in over) >= 10
    assert {r["i"] for r in over if r["d"] == "a"} == {0, 1, 2}
    assert under == mix([a, b], data_config(mix_strategy="interleave_under", interleave_probs="0.5,0.5"))
    with pytest.raises(TunepipeError, match="3 probabilities for 2 datasets"):
        mix([a, b], data_config(mix_strategy="interleave_under", interleave_probs="0.5,0.25,0.25"))


def test_val_size_fraction_or_count_is_seeded():
    from tunepipe.data.tokenizing.mixing import split_eval

    rows = [{"i": i} for i in range(50)]
    train, evals = split_eval(rows, 0.2, seed=3)
    assert len(evals) == 10 and sorted(r["i"] for r in train + evals) == list(range(50))
    assert (train, evals) == split_eval(rows, 0.2, seed=3) != split_eval(rows, 0.2, seed=4)
    assert len(split_eval(rows, 7.0, seed=3)[1]) == 7
    assert split_eval(rows, 0.0, seed=3) == (rows, [])
    with pytest.raises(TunepipeError, match="would take all 50 rows"):
        split_eval(rows, 50.0, seed=3)


def test_num_samples_from_dataset_info_reaches_the_shards(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
    folder = write_info(tmp_path / "d", {"few": {"file_name": "few.json", "num_samples": 15},
                                         "other": {"file_name": "few.json"}},
                        {"few.json": json.dumps(rows)})
    _, layout, metrics = run_stages(tmp_path / "r", tiny_model_dir, folder, "few,other")
    assert [i["num_samples"] for i in read_manifest(layout.validated)["train"]] == [15, None]
    assert metrics["train"]["rows_in"] == 15 + 6


def test_named_template_runs_end_to_end_and_keeps_tokens_the_model_lacks(tmp_path, tiny_model_dir, lf_demo_dir):
    from tunepipe.train.batches.tokenized import load_tokenized

    _, layout, metrics = run_stages(tmp_path / "qwen", tiny_model_dir, lf_demo_dir, "identity", template="qwen",
                                    max_samples=3)
    meta = json.loads((layout.tokenized / "meta.json").read_text())
    assert (metrics["template"], meta["template"], meta["added_tokens"]) == ("qwen", "qwen", [])
    tokenizer = load_tokenizer(layout.base_model)
    first = tokenizer.decode(load_from_disk(str(layout.tokenized / "train"))[0]["input_ids"])
    assert first.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert load_tokenized(layout, "sft", ("input_ids", "labels")).meta["template"] == "qwen"
    # llama3's <|eot_id|> is not in this tokenizer: added as LLaMA-Factory does, and the grown tokenizer is
    # kept beside the shards for training to resize the embeddings (tests/test_vocabulary.py trains on it)
    _, layout, _ = run_stages(tmp_path / "llama3", tiny_model_dir, lf_demo_dir, "identity", template="llama3",
                              max_samples=3)
    assert json.loads((layout.tokenized / "meta.json").read_text())["added_tokens"] == ["<|eot_id|>", "<|eom_id|>"]
    grown = load_tokenizer(layout.tokenized / "tokenizer")
    assert grown.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"]) == [len(tokenizer), len(tokenizer) + 1]
    assert load_tokenized(layout, "sft", ("input_ids", "labels")).meta["template"] == "llama3"
