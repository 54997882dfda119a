"""Variable-length attention for padding-free batches where flash attention cannot run (CPU).

flash-attention's varlen kernel attends inside each sample of a row of concatenated
samples; nothing equivalent ships for CPU. SDPA with a block-diagonal 4-D mask is exact
but computes the whole [T, T] score matrix of the row and masks most of it away (a batch
of 4 samples pays ~4x the attention it needs). This attention function runs SDPA's
causal kernel once per sample instead, from the same `cu_seq_lens_q` boundaries the
flash path uses, and is registered with transformers' AttentionInterface so the model
code calls it like any other kernel. Without `cu_seq_lens_q` (ordinary padded batches,
generation) it is plain SDPA.

For the preference trainers: nothing to do; models from `model_setup` use it on CPU and
fall back to SDPA for the 2-D masks your collators pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunepipe_sdpa_varlen"
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


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D], as transformers expects."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, width, dim = query.shape
    # rows laid end to end, as the boundaries count them: [H, B*T, D]
    q = query.transpose(0, 1).reshape(heads, batch * width, dim)
    k = key.transpose(0, 1).reshape(key.shape[1], batch * width, dim)
    v = value.transpose(0, 1).reshape(value.shape[1], batch * width, value.shape[-1])
    dropout = dropout if module.training else 0.0
    cuts = boundaries.tolist()
    parts = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], dropout_p=dropout,
                                            is_causal=True, scale=scaling, enable_gqa=True)
             for s, e in zip(cuts[:-1], cuts[1:]) if e > s]
    out = torch.cat(parts, dim=1).reshape(heads, batch, width, v.shape[-1])
    return out.permute(1, 2, 0, 3).contiguous(), None
