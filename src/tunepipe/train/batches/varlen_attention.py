"""Variable-length attention for padding-free batches where flash attention cannot run (CPU).

flash-attention's varlen kernel attends inside each sample of a row of concatenated
samples; nothing equivalent ships for CPU. SDPA with a block-diagonal 4-D mask is exact
but computes the whole [T, T] score matrix of the row and masks most of it away (a batch
of 4 samples pays ~4x the attention it needs). This attention function runs SDPA's
causal kernel once per sample instead, from the same `cu_seq_lens_q` boundaries the
flash path uses, and is registered with transformers' AttentionInterface so the model
code calls it like any other kernel. Without `cu_seq_lens_q` (ordinary padded batches,
generation) it is plain SDPA.

Sliding windows: the model code passes each layer's `sliding_window` (None on full-attention
layers of Gemma 2/3 and Qwen2/3, the config's window on every Mistral / Phi-3 layer); Qwen2-MoE's
attention sets the window on itself without passing it, so it is read from the module then. A
sample longer than the window gets a banded causal mask (query i sees keys j with
0 <= i - j < window, transformers' own rule), so windowed layers see exactly what the
model's eager attention sees. Attention-logit softcapping (Gemma 2) has no SDPA form:
`model_setup.attention_implementation` sends softcapped models to eager attention, and
this kernel refuses a `softcap` rather than ignore it.

For the preference trainers: nothing to do; models from `model_setup` use it on CPU and
fall back to SDPA for the 2-D masks your collators pass.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tunepipe.train.batches.collate import VARLEN as NAME

_registered = False


def register() -> str:
    """Make NAME a valid `attn_implementation` (kernel + SDPA-style mask builder); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, sdpa_varlen_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


@torch.compiler.disable  # runs eagerly inside a compiled layer (fast_path.py): see the comment below
def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D], as transformers expects."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} cannot softcap attention logits: load the model with eager attention")
    batch, heads, width, _ = query.shape
    q, k, v = (_end_to_end(t) for t in (query, key, value))
    dropout = dropout if module.training else 0.0
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    # Python ints from a tensor: under torch_compile this would break the graph (data-dependent)
    # and specialise on every batch layout; disabled above, the layer compiles as two graphs
    # around this call, and the per-sample loop runs eagerly whatever the lengths.
    lengths = [e - s for s, e in itertools.pairwise(boundaries.tolist())]
    # split, not slicing: split's backward writes all gradients with one concatenation,
    # where each slice's backward would zero-fill a full-size buffer and add into it.
    # 4-D pieces on purpose: on CPU only 4-D inputs reach SDPA's flash kernel (3-D ones
    # fall back to the math path, which materialises every score matrix).
    parts = [_sample_attention(qi, ki, vi, window, dropout, scaling)
             for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    out = torch.cat(parts, dim=2).reshape(heads, batch, width, value.shape[-1])
    return out.permute(1, 2, 0, 3).contiguous(), None


def _sample_attention(q, k, v, window: int | None, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal SDPA over one sample; banded (sliding window) when the sample outgrows the window."""
    length = q.shape[2]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(length, window, q.device),
                                          dropout_p=dropout, scale=scaling, enable_gqa=True)


def window_mask(length: int, window: int, device=None) -> torch.Tensor:
    """[T, T] bool: query i attends key j when 0 <= i - j < window (masking_utils' sliding rule)."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (distance >= 0) & (distance < window)


def _end_to_end(states: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [1, H, B*T, D]: the batch's rows laid end to end, as the boundaries count."""
    batch, heads, width, dim = states.shape
    if batch == 1:
        return states
    return states.transpose(0, 1).reshape(1, heads, batch * width, dim)
