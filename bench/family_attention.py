"""How far a padding-free batch's logits are from each sample run alone, per model family.

    .venv/bin/python bench/family_attention.py

For each tiny family model of tests/fixtures/families.py (sliding window 16, samples of
18-40 tokens, Gemma 2 attention softcap 1.0): the max |logit difference| between one
padding-free row of five samples and each sample alone on the family's eager attention,
(a) with a hand-built block-diagonal 4-D mask on SDPA, eager for Gemma 2 (what tunepipe
passed before: it replaces the model's own sliding-window masks), (b) on each kernel tunepipe picks now for
`flash_attn: auto | sdpa | disabled`. Not a test: it prints figures (the tests assert 1e-5).
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/family_attention.py`, this folder would come first on sys.path and
# bench/tokenize.py would shadow the standard library's tokenize module; the repo root is
# added for tests.fixtures (the family models the tests build).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import torch
from _common import machine_summary, print_machine
from tests.fixtures.families import FAMILIES, family_config, model_class
from tests.fixtures.tiny_model import build_tokenizer

from tunepipe.config import ModelConfig
from tunepipe.train.batches.collate import SegmentCollator, model_inputs, positions
from tunepipe.train.model.model_setup import attention_implementation

LENGTHS = [40, 23, 37, 18, 29]


def block_diagonal(lengths: list[int]) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths))
    return (torch.ones(len(ids), len(ids), dtype=torch.bool).tril() & (ids[:, None] == ids[None, :]))[None, None]


def gaps(name: str, tokenizer) -> dict[str, float]:
    config = family_config(name, tokenizer)
    torch.manual_seed(0)
    reference = model_class(name)._from_config(config, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in LENGTHS]
    rows = [{"input_ids": s, "labels": s} for s in samples]
    with torch.no_grad():
        alone = torch.cat([reference(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in samples])
        result = {}
        # before: SDPA (eager for softcapped models, which SDPA refuses) with a 4-D block mask
        kernel = "eager" if FAMILIES[name].softcapped() else "sdpa"
        before = model_class(name)._from_config(config, attn_implementation=kernel).eval()
        before.load_state_dict(reference.state_dict())
        ids = torch.tensor([[t for s in samples for t in s]])
        mask = block_diagonal(LENGTHS)
        if kernel == "eager":  # eager adds its mask to the scores
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        logits = before(input_ids=ids, position_ids=positions(LENGTHS, ids.shape[1])[None],
                        attention_mask=mask, use_cache=False).logits[0]
        result[f"4-D mask on {kernel} (before)"] = (logits - alone).abs().max().item()
        for choice in ("auto", "sdpa", "disabled"):
            attn = attention_implementation(ModelConfig(flash_attn=choice), config)
            model = model_class(name)._from_config(config, attn_implementation=attn).eval()
            model.load_state_dict(reference.state_dict())
            batch = SegmentCollator(0, attn, flatten=True)(rows)
            result[f"{choice} -> {attn}"] = (model(**model_inputs(batch)).logits[0] - alone).abs().max().item()
    return result


def main() -> None:
    print_machine(machine_summary())
    tokenizer = build_tokenizer()
    for name in FAMILIES:
        cells = ", ".join(f"{key}: {value:.2g}" for key, value in gaps(name, tokenizer).items())
        print(f"{name:<8} {cells}")


if __name__ == "__main__":
    main()
