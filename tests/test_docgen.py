"""The generated docs are current and complete: README config reference, LLaMA-Factory key table."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tunepipe.config import GROUPS, docgen
from tunepipe.config.lf_keys import (
    ALIAS_KEYS,
    INSTEAD_KEYS,
    NOOP_VALUES,
    OPERATIONAL_KEYS,
    TUNEPIPE_ONLY_KEYS,
    UNSUPPORTED_KEYS,
)
from tunepipe.errors import TunepipeError


def test_committed_docs_are_current():
    stale = [str(path) for path, (current, new) in docgen.render_all().items() if current != new]
    assert not stale, f"generated sections are stale in {stale}: run `python -m tunepipe.config.docgen`"


def test_every_config_field_has_a_docstring_and_a_reference_row():
    reference = docgen.config_reference()
    for group, cls in GROUPS.items():
        assert f"#### `{group}`" in reference
        for fld in dataclasses.fields(cls):
            assert re.search(rf"^\| `{fld.name}` \|", reference, re.MULTILINE), f"{group}.{fld.name} missing"


def test_field_docs_reads_the_string_after_each_field():
    source = '''
class A:
    x: int = 1
    """The x."""
    y: str = "a"
    z: bool = False
    """The z,
    over two lines."""
'''
    assert docgen.field_docs(source) == {"A": {"x": "The x.", "z": "The z, over two lines."}}


def test_types_render_without_table_pipes():
    assert docgen.render_type("Optional[Literal[4, 8]]") == "`4`, `8` or null"
    assert docgen.render_type("Union[str, list[float]]") == "string or list of number"
    assert docgen.render_type("bool") == "bool"


def test_lf_table_lists_every_known_key_once_with_its_treatment():
    table = docgen.lf_key_table()
    keys = re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE)
    assert len(keys) == len(set(keys))
    fields = {f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    expected = ((fields - TUNEPIPE_ONLY_KEYS) | set(OPERATIONAL_KEYS) | set(NOOP_VALUES) | set(INSTEAD_KEYS)
                | set(UNSUPPORTED_KEYS) | set(ALIAS_KEYS))
    assert set(keys) == expected
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", table, re.MULTILINE))
    assert rows["lora_rank"].strip() == "supported: `train.lora_rank`"
    assert rows["ddp_timeout"].strip() == "accepted, ignored with a warning"
    assert rows["use_unsloth"].strip() == "accepted; other than `false` warns"
    assert rows["upcast_layernorm"].strip() == "accepted only as `false`"
    assert rows["deepspeed"].strip() == "supported: `train.deepspeed`"
    assert rows["eval_num_beams"].strip() == "supported: read as `num_beams`"
    assert rows["ray_num_workers"].strip() == "supported: `train.ray_num_workers`"
    assert rows["ray_storage_filesystem"].strip() == "not supported: error"


def test_key_lists_are_disjoint_and_tunepipe_only_keys_are_fields():
    fields = {f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    lists = [set(OPERATIONAL_KEYS), set(NOOP_VALUES), set(INSTEAD_KEYS), set(UNSUPPORTED_KEYS), set(ALIAS_KEYS),
             fields]
    for i, first in enumerate(lists):
        for second in lists[i + 1:]:
            assert not first & second, first & second
    assert TUNEPIPE_ONLY_KEYS <= fields


def test_check_mode_reports_a_stale_file_and_rewrite_fixes_it(tmp_path, capsys):
    for rel in docgen.SECTIONS:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((docgen.REPO_ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("| `lora_rank` |", "| `lora_rnk` |"))
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "README.md" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0
    assert "| `lora_rank` |" in readme.read_text()


def test_missing_markers_name_the_file_and_section():
    with pytest.raises(TunepipeError, match="config-reference"):
        docgen.replace_section("no markers here", "config-reference", "body", "README.md")
