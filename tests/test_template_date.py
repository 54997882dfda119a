"""The date a template renders is `data.template_date`, a declared input: never the clock.

Llama 3's tool prompt writes `Today Date: ...`, and transformers gives jinja chat templates a
`strftime_now` that reads the clock (Llama 3.1 / 3.2, Granite, SmolLM3 use it). Both render
`data.template_date` in tunepipe, so the same rows and params give the same shards on any day.
The clock is moved with time-machine: a code path that read it would give other bytes here.
"""

from __future__ import annotations

import json
from datetime import date

import pytest
import time_machine

from tests.test_tokenize import model_with_template, run_stages, tree_hashes
from tunepipe.config import DEFAULT_TEMPLATE_DATE
from tunepipe.config.loader import load_config
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.errors import TunepipeError
from tunepipe.models.base import load_tokenizer

# A ChatML template that writes the day like Llama 3.1's does: strftime_now, the clock in transformers
DATED_TEMPLATE = (
    "{{ '<|im_start|>system\nToday is ' + strftime_now('%d %b %Y') + '.<|im_end|>\n' }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOL_ROW = {"system": "", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "tools": json.dumps([{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}])}
CLOCKS = ("2031-02-28 23:59:30", "2019-11-05 04:00:00")


def rendered(fmt: ChatFormat, row: dict) -> str:
    return "".join(e for turn in fmt.turns(row) for e in turn if isinstance(e, str))


@pytest.fixture(scope="module")
def dated_model(tiny_model_dir, tmp_path_factory):
    return model_with_template(tmp_path_factory.mktemp("dated") / "model", tiny_model_dir, DATED_TEMPLATE)


def test_templates_render_data_template_date_whatever_the_clock(tiny_model_dir, dated_model):
    day = load_config(None, ["data.template_date=2030-01-02"]).data.today()
    assert day == date(2030, 1, 2)
    for clock in CLOCKS:
        with time_machine.travel(clock, tick=False):
            llama3 = ChatFormat(load_tokenizer(tiny_model_dir), "llama3", today=day)
            assert "Today Date: 02 Jan 2030\n" in rendered(llama3, TOOL_ROW)
            jinja = ChatFormat(load_tokenizer(dated_model), today=day)
            assert "Today is 02 Jan 2030." in rendered(jinja, TOOL_ROW)
            default = ChatFormat(load_tokenizer(dated_model))
            assert "Today is 26 Jul 2024." in rendered(default, TOOL_ROW)  # DEFAULT_TEMPLATE_DATE


@pytest.mark.parametrize("model", ["llama3", "dated_jinja"])
def test_tokenize_gives_the_same_bytes_on_any_day(model, tmp_path, tiny_model_dir, dated_model, lf_demo_dir):
    base, template = (tiny_model_dir, "llama3") if model == "llama3" else (dated_model, None)
    params = {"cutoff_len": 512, "max_samples": 20, "val_size": 0.2,
              **({"template": template} if template else {})}
    hashes = []
    for k, clock in enumerate(CLOCKS):
        with time_machine.travel(clock):
            _, layout, _ = run_stages(tmp_path / str(k), base, lf_demo_dir, "glaive_toolcall_en_demo", **params)
        hashes.append(tree_hashes(layout.tokenized))
    assert hashes[0] == hashes[1]
    meta = json.loads((layout.tokenized / "meta.json").read_text())
    assert meta["template_date"] == DEFAULT_TEMPLATE_DATE
    # and the declared input does move the bytes: another date, other shards
    _, other, _ = run_stages(tmp_path / "other", base, lf_demo_dir, "glaive_toolcall_en_demo",
                             template_date="2030-01-02", **params)
    assert tree_hashes(other.tokenized)["train/data-00000-of-00001.arrow"] != \
        hashes[0]["train/data-00000-of-00001.arrow"]
    assert json.loads((other.tokenized / "meta.json").read_text())["template_date"] == "2030-01-02"


def test_template_date_is_checked_and_reads_yaml_dates(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("template_date: 2025-03-09\n")  # unquoted: YAML reads a date
    assert load_config(config).data.template_date == "2025-03-09"
    with pytest.raises(TunepipeError, match="data.template_date='yesterday': must be a date, YYYY-MM-DD"):
        load_config(None, ["data.template_date=yesterday"])
