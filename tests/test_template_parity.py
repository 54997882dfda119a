"""Named templates give LLaMA-Factory 0.9.5's token ids and labels (golden rows, no LLaMA-Factory needed).

tests/fixtures/template_parity/<template>.json is written by `bench/template_parity.py
--write-fixtures`: for each demo set a few canonical rows (as tunepipe's validate stage
wrote them) and the ids / labels LLaMA-Factory produced for them with the real SmolLM2
tokenizer. Every supported template has a file, so a template added without a parity
run, or a change that moves one id, fails here.

The fixtures were captured with LLaMA-Factory's clock held on `template_date` (llama3's tool
prompt writes the day); tunepipe renders that date from `data.template_date`, and the comparison
runs with this process's clock moved elsewhere, so a template that read the clock would fail.
"""

from __future__ import annotations

import copy
import json
from datetime import date
from pathlib import Path

import pytest
import time_machine

from tunepipe.config import DEFAULT_TEMPLATE_DATE
from tunepipe.config.loader import load_config
from tunepipe.data.chat.named_templates import TEMPLATES
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.tokenizing.encoding import Stats, encode_conversations, encode_preference
from tunepipe.models.base import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "template_parity"
MOVED_CLOCK = "2031-02-28 23:59:30"  # neither the capture day nor the default template_date
# vision-only templates: LLaMA-Factory runs them only with the model's multimodal processor, so their
# golden rows come from bench/template_parity.py --multimodal (mllm_demo on a tiny model of the family)
MULTIMODAL = FIXTURES / "multimodal"
VISION_ONLY = {"qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "qwen3_5", "qwen3_5_nothink", "llava", "llava_next", "paligemma"}
CAPTURED = sorted(set(TEMPLATES) - VISION_ONLY)


def test_every_supported_template_has_golden_rows():
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == CAPTURED
    assert sorted(p.stem for p in MULTIMODAL.glob("*.json")) == sorted(n for n, t in TEMPLATES.items() if t.vision)
    for path in FIXTURES.glob("*.json"):
        datasets = json.loads(path.read_text(encoding="utf-8"))["datasets"]
        assert {"alpaca_en_demo", "glaive_toolcall_en_demo", "dpo_en_demo", "kto_en_demo"} <= set(datasets)
        assert all(item["rows"] for item in datasets.values()), path.name


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_base_dir):
    return load_tokenizer(smollm2_base_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", CAPTURED)
def test_named_template_ids_and_labels_equal_llamafactory(name, smollm2_tokenizer):
    fixture = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    day = fixture.get("template_date", DEFAULT_TEMPLATE_DATE)  # captured before the key: no date rendered
    data = load_config(None, [f"data.cutoff_len={fixture['cutoff_len']}", f"data.template={name}",
                              f"data.template_date={day}"]).data
    with time_machine.travel(MOVED_CLOCK, tick=False):
        fmt = ChatFormat(copy.deepcopy(smollm2_tokenizer), name, today=data.today())  # a copy: templates add tokens
        check_fixture(name, fixture, fmt, data)


def check_fixture(name: str, fixture: dict, fmt: ChatFormat, data) -> None:
    for dataset, item in fixture["datasets"].items():
        rows = [golden["row"] for golden in item["rows"]]
        if item["stage"] == "rm":
            columns = encode_preference(rows, fmt, data, Stats())
        else:
            columns = encode_conversations(rows, fmt, data, item["stage"], eval_columns=False, stats=Stats())
        for k, golden in enumerate(item["rows"]):
            for column, expected in golden["expected"].items():
                assert columns[column][k] == expected, f"{name} {dataset} row {k} {column}"


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory, tiny_qwen2vl_dir):
    """family -> tiny model dir, built on first use (the same builders the bench ran)."""
    from tests.fixtures.tiny_vlm_families import BUILDERS

    built = {"qwen2_vl": tiny_qwen2vl_dir}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = BUILDERS[family](tmp_path_factory.mktemp(f"parity-{family}"))
        return built[family]
    return get


@pytest.mark.parametrize("name", sorted(n for n, t in TEMPLATES.items() if t.vision))
def test_vision_template_ids_and_labels_equal_llamafactory_on_mllm_demo(name, vision_dirs, lf_demo_dir):
    """Every mllm_demo row, images expanded by the family's processor, as LLaMA-Factory 0.9.5 tokenized it."""
    from tunepipe.data.vision import MediaTokens

    fixture = json.loads((MULTIMODAL / f"{name}.json").read_text(encoding="utf-8"))
    model_dir = vision_dirs(fixture["model"])
    data = load_config(None, [f"data.cutoff_len={fixture['cutoff_len']}", f"data.template={name}",
                              f"data.template_date={fixture['template_date']}"]).data
    tokenizer = load_tokenizer(model_dir)
    fmt = ChatFormat(tokenizer, name, today=data.today())
    fmt.media = MediaTokens.load(model_dir, tokenizer, lf_demo_dir, fixture["image_max_pixels"],
                                 fixture["image_min_pixels"])
    assert sum(len(golden["row"]["images"]) for golden in fixture["datasets"]["mllm_demo"]["rows"]) > 0
    check_fixture(name, fixture, fmt, data)


def test_qwen3_5_tool_format_equals_llamafactory():
    """LLaMA-Factory 0.9.5 needs a multimodal processor to run the qwen3_5 templates on text rows, so
    their tool format (the one part they do not share with qwen3_vl) is compared on its own: the tools
    text and the <function=...> calls of glaive_toolcall_en_demo rows, as its Qwen35ToolUtils wrote them
    (the whole set, 300 tools texts and 211 calls, matched when captured: docs/migrating-from-llama-factory.md)."""
    from tunepipe.data.chat.named_templates import THOUGHT
    from tunepipe.data.chat.tool_formats import calls_text, tools_text

    fixture = json.loads((FIXTURES / "tools" / "qwen3_5.json").read_text(encoding="utf-8"))
    assert TEMPLATES["qwen3_5"].tool_format == TEMPLATES["qwen3_5_nothink"].tool_format == "qwen3_5"
    for row in fixture["rows"]:
        assert tools_text("qwen3_5", row["tools"], date.fromisoformat(DEFAULT_TEMPLATE_DATE)) == row["expected_tools_text"]
        assert [calls_text("qwen3_5", call, THOUGHT) for call in row["function_calls"]] == row["expected_calls_text"]
