"""Golden shards: `template: chatml` shards stay byte-identical (tests/fixtures/golden_chatml.json,
written by `python -m tests.test_tokenize_golden --capture`).

History: captured first from the in-memory tokenize (commit 2614f46); the streaming tokenize
matched it byte for byte when it landed (19fff7e). The templates change 272ee90 then made
`chatml` LLaMA-Factory's named template on purpose (its parity with LLaMA-Factory is
tested in tests/test_template_parity.py), which changes ids / labels of some demo rows, so
the fixture was recaptured from that code; the streaming path itself gives the same bytes
for any worker count and chunk size (below).

Each case runs validate + tokenize on the LLaMA-Factory demo sets or the repo's own
data/ with the real SmolLM2 tokenizer and compares sha256 of every file under
data/tokenized/ and of metrics/data.json. Also run with 2 workers and a tiny chunk size:
the shards do not depend on how the rows were split among processes. Every case runs with the
clock moved (time-machine): the bytes depend on no date but `data.template_date`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import time_machine

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "golden_chatml.json"
SFT = "identity,alpaca_en_demo,glaive_toolcall_en_demo"
MOVED_CLOCK = "2031-02-28 12:00:00"
# case -> (dataset dir: "demo" or "repo", stage, dataset, data.* overrides)
CASES = {
    "sft": ("demo", "sft", SFT, {"cutoff_len": 256, "val_size": 0.1}),
    "sft_packed": ("demo", "sft", SFT, {"cutoff_len": 512, "packing": True, "val_size": 50}),
    "sft_mixed": ("demo", "sft", "alpaca_en_demo,identity", {"cutoff_len": 1024, "mix_strategy": "interleave_under",
                                                             "interleave_probs": "0.3,0.7", "max_samples": 80}),
    "sft_mask_history": ("demo", "sft", "glaive_toolcall_en_demo", {"cutoff_len": 400, "mask_history": True,
                                                                    "overlong": "drop"}),
    "dpo": ("demo", "dpo", "dpo_en_demo", {"cutoff_len": 256, "val_size": 0.1}),
    "kto": ("demo", "kto", "kto_en_demo", {"cutoff_len": 256}),
    "pt_packed": ("demo", "pt", "c4_demo", {"cutoff_len": 256, "packing": True, "val_size": 0.05}),
    "repo_sft": ("repo", "sft", "identity,instructions", {"cutoff_len": 1024, "val_size": 0.1}),
    "repo_dpo": ("repo", "dpo", "preferences", {"cutoff_len": 1024}),
}


def run_case(root: Path, base_dir: Path, dataset_dir: Path, stage: str, dataset: str, data: dict,
             extra: tuple = ()) -> dict[str, str]:
    from tunepipe.config.loader import load_config
    from tunepipe.data.tokenize import run_tokenize
    from tunepipe.data.validate import run_validate
    from tunepipe.layout import Layout

    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "base").symlink_to(base_dir)
    overrides = [f"data.dataset={dataset}", f"data.dataset_dir={dataset_dir}", f"train.stage={stage}",
                 "data.template=chatml", *[f"data.{k}={v}" for k, v in data.items()], *extra]
    cfg = load_config(None, overrides)
    if "val_size" not in data:
        cfg.data.val_size = 0
    layout = Layout.at(root)
    with time_machine.travel(MOVED_CLOCK):  # ticking: timeouts in the worker pool still pass
        run_validate(cfg, layout)
        run_tokenize(cfg, layout)
    files = {f"tokenized/{p.relative_to(layout.tokenized)}": p for p in sorted(layout.tokenized.rglob("*"))
             if p.is_file()}
    files["metrics/data.json"] = layout.metrics / "data.json"
    return {name: file_hash(path) for name, path in files.items()}


def file_hash(path: Path) -> str:
    """sha256 of the file; for datasets' state.json without `_fingerprint` (datasets derives it
    from the whole in-memory table, which a streaming writer never holds; tunepipe's own is a
    hash of the shard files, checked apart)."""
    data = path.read_bytes()
    if path.name == "state.json":
        state = json.loads(data)
        state.pop("_fingerprint")
        data = json.dumps(state, indent=2, sort_keys=True).encode()
    if path.name == "meta.json":  # meta.json gained `added_tokens` later: none for chatml, as before
        meta = json.loads(data)
        if meta.get("added_tokens") == []:
            del meta["added_tokens"]
        if meta.get("template_date") == "2024-07-26":  # and `template_date` later: the default, as before
            del meta["template_date"]
        if "default_system" in meta and meta["default_system"] is None:  # and `default_system`: unset
            del meta["default_system"]
        data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return hashlib.sha256(data).hexdigest()


def dataset_dir_for(where: str, lf_demo: Path) -> Path:
    return lf_demo if where == "demo" else REPO / "data"


@pytest.mark.parametrize("case", sorted(CASES))
def test_chatml_shards_equal_the_golden_hashes(case, tmp_path, smollm2_base_dir, lf_demo_dir):
    where, stage, dataset, data = CASES[case]
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[case]
    got = run_case(tmp_path, smollm2_base_dir, dataset_dir_for(where, lf_demo_dir), stage, dataset, data)
    assert got == golden


@pytest.mark.parametrize(("case", "workers", "chunk"), [("sft_packed", 1, 7), ("pt_packed", 3, 13), ("sft", 2, 333)])
def test_shards_do_not_depend_on_workers_or_chunk_size(case, workers, chunk, tmp_path, smollm2_base_dir,
                                                       lf_demo_dir, monkeypatch):
    from tunepipe.data.tokenizing import chunks

    monkeypatch.setattr(chunks, "RECYCLE", 2)  # workers replaced every 2 chunks: same bytes
    where, stage, dataset, data = CASES[case]
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[case]
    extra = (f"data.preprocessing_num_workers={workers}", f"data.preprocessing_batch_size={chunk}")
    got = run_case(tmp_path, smollm2_base_dir, dataset_dir_for(where, lf_demo_dir), stage, dataset, data, extra)
    assert got == golden


def test_packing_through_many_buckets_equals_packing_in_memory(tmp_path, monkeypatch):
    import numpy as np
    from datasets import load_from_disk

    from tunepipe.data.tokenizing import pack_spill
    from tunepipe.data.tokenizing.packing import pack
    from tunepipe.data.tokenizing.shards import ShardWriter, to_table

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 500, size=int(n)).tolist() for n in rng.integers(1, 60, size=700)]
    labels = [[-100] + row[1:] for row in ids]
    monkeypatch.setattr(pack_spill, "BUCKET_TOKENS", 300)  # 5 bins a bucket: many buckets
    spill = pack_spill.PackSpill(tmp_path / "spill")
    for start in range(0, len(ids), 64):
        spill.write(to_table({"input_ids": ids[start:start + 64], "labels": labels[start:start + 64]},
                             ["input_ids", "labels"]))
    writer = ShardWriter(tmp_path / "packed", ["input_ids", "labels", "seq_lens"])
    for table in spill.packed(60):
        writer.write(table)
    writer.close()
    expected = pack(ids, labels, 60)
    assert len(expected["input_ids"]) > 20 * 5
    assert load_from_disk(str(tmp_path / "packed")).to_dict() == expected


def capture(out: Path) -> None:
    import tempfile

    from tests.conftest import LF_DEMO
    from tunepipe.config import ModelConfig
    from tunepipe.models.base import prepare_base_model

    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base_model(ModelConfig(), Path(tmp) / "base")
        hashes = {case: run_case(Path(tmp) / case, base, dataset_dir_for(where, LF_DEMO), stage, dataset, data)
                  for case, (where, stage, dataset, data) in sorted(CASES.items())}
    out.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__" and sys.argv[1:] == ["--capture"]:
    capture(GOLDEN)
