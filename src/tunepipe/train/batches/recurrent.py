"""Models whose layers carry a recurrent state along a row: no padding-free rows, no packing.

Qwen3.5 / Qwen3.5-MoE mix full-attention layers with Gated DeltaNet linear-attention layers
(`layer_types` "linear_attention"), which run a causal convolution and a recurrent state from
the first token of a row to the last. Position ids restarting at a sample boundary do not reset
that state: samples laid end to end in one row (tunepipe's padding-free batches, packed rows)
would each read the ones before them. transformers passes sample boundaries to these layers
(`cu_seq_lens_q`) only to the flash-linear-attention / causal-conv1d kernels; its torch
fallbacks (the CPU path, and any GPU without those packages) ignore them. So such a model
trains on right-padded rows, one sample each: a causal layer never lets the padding after a
sample change that sample, so each row equals the sample alone (tests/test_model_families.py).
"""

from __future__ import annotations

from tunepipe.errors import TunepipeError

# transformers' layer_types values of layers that keep a state across the row
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "mamba"})


def recurrent_layer_types(model_config) -> set[str]:
    """The state-carrying layer types of a (text or vision-language) model config."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return set(getattr(text, "layer_types", None) or ()) & RECURRENT_LAYER_TYPES


def refuse_packed_rows(model_config, packed: bool) -> None:
    """Packed shards (several samples per row) cannot train a model with recurrent layers."""
    kinds = recurrent_layer_types(model_config)
    if packed and kinds:
        raise TunepipeError(
            f"data.packing=true: {model_config.model_type} has {', '.join(sorted(kinds))} layers, whose "
            "recurrent state runs across a packed row, so each sample would read the samples before it "
            "(transformers resets it at sample boundaries only in the flash-linear-attention kernels)",
            hint="set packing: false (and neat_packing: false); rows are then padded, one sample each")
