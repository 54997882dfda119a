"""Next-token loss that only pays the vocabulary projection for trained positions.

For the preference trainers: `causal_lm_loss(model, batch, num_items_in_batch)` is the SFT /
pretraining loss of a `collate.SegmentCollator` batch (use it for an SFT term such as
`pref_ftx`); `label_hidden_states` gives the final hidden states of the trained positions,
and `linear_cross_entropy` the summed-then-normalised loss of those rows.

Why hand-written: with a 49k-token vocabulary the output projection and the softmax are a
large share of a small model's step, and a stock forward materialises float32 logits for
every position ([B, T, V]: 400 MB for 4 x 512 tokens) although prompt positions carry no
loss. Here the model runs without its head, only positions whose target is not -100 are
projected, in chunks, and each chunk's gradient is computed right away (so no [N, V]
tensor is kept for backward either). No library does this on CPU: Liger's and Apple's
fused kernels need Triton on a GPU.

Normalisation: the sum over trained tokens is divided by `num_items_in_batch`, the number
of trained tokens in the whole optimizer step (every accumulation micro-batch, and every
process under DDP), which transformers' Trainer counts from `shift_labels`. So batch 4 x
accumulation 1 and batch 1 x accumulation 4 give the same update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunepipe.train.batches.collate import IGNORE_INDEX, model_inputs

# Rows per chunk so that one chunk's float32 logits stay near 64 MB whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 24


def causal_lm_loss(model, batch: dict, num_items_in_batch=None, label_smoothing: float = 0.0,
                   dft: bool = False, eaft_alpha: float | None = None, anchor=None) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions / `num_items_in_batch`
    (default: this batch's trained-token count).

    `label_smoothing` eps gives transformers' LabelSmoother meaning (LLaMA-Factory's
    `label_smoothing_factor`): each token's loss is (1 - eps) * its cross-entropy + eps * the
    mean over the vocabulary of -log p, i.e. the target is (1 - eps) one-hot + eps uniform.
    `dft` (LLaMA-Factory's `use_dft_loss`, Dynamic Fine-Tuning): each token's cross-entropy
    is weighted by the model's probability of that token, detached: sum(ce * exp(-ce)) / N
    (the config refuses it together with label smoothing).
    `eaft_alpha` (LLaMA-Factory's `use_eaft_loss` / `eaft_alpha`, Entropy-Adaptive Fine-Tuning):
    each token's cross-entropy is weighted by (H / 3) ** alpha, detached, where H is the entropy
    of the softmax over the model's 20 largest logits at that position (3 ~ ln 20, its maximum).
    `anchor` (`asft.ReferenceAnchor`, LLaMA-Factory's `use_asft_loss`): DFT plus
    `anchor.alpha` x KL(reference || model) of each trained position's next-token distribution,
    both summed over trained tokens / `num_items_in_batch`.
    A mixture-of-experts model configured to return its router loss (`moe.configure_router_loss`)
    adds `router_aux_loss_coef * aux`, weighted by this micro-batch's share of the step's
    trained tokens (so accumulation and processes average it as they average the tokens)."""
    targets_2d = batch["shift_labels"]
    selected = targets_2d != IGNORE_INDEX
    targets = targets_2d[selected]
    normalizer = num_items_in_batch if num_items_in_batch is not None else selected.sum()
    head = plain_output_head(model)
    weighting = TokenWeighting(dft=dft or anchor is not None, eaft_alpha=eaft_alpha)
    ref_head = anchor.output_head(model) if anchor is not None else None
    if head is None or (anchor is not None and ref_head is None):
        # heads with LoRA, soft-capping or scaling: let the models apply their own heads
        out = model(**model_inputs(batch), logits_to_keep=selected)
        logits = out.logits.float()
        token_ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
        loss = (token_ce * weighting.of(logits.detach(), token_ce.detach())).sum() / normalizer
        if anchor is not None:
            ref_logp = anchor.logits(model, batch, selected).float().log_softmax(-1)
            kl = (ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum()
            loss = loss + anchor.alpha * kl / normalizer
    else:
        hidden, out = label_hidden_states(model, batch, selected, with_outputs=True)
        kl_anchor = (anchor.hidden_states(model, batch, selected), ref_head, anchor.alpha) if anchor else None
        loss = linear_cross_entropy(hidden, head.weight, head.bias, targets, normalizer, label_smoothing,
                                    weighting=weighting, kl_anchor=kl_anchor)
    return loss + router_loss(model, out, selected.sum() / normalizer)


class TokenWeighting:
    """The detached per-token weight of the DFT / EAFT losses (1 for plain cross-entropy)."""

    EAFT_TOP_K = 20  # LLaMA-Factory's EAFT: entropy of the renormalised top-20 distribution
    EAFT_SCALE = 3.0  # ~ ln(20), the largest that entropy can be: weights stay in [0, 1]

    def __init__(self, dft: bool = False, eaft_alpha: float | None = None):
        self.dft, self.eaft_alpha = dft, eaft_alpha

    def __bool__(self) -> bool:
        return self.dft or self.eaft_alpha is not None

    def of(self, logits: torch.Tensor, row_ce: torch.Tensor) -> torch.Tensor | float:
        """Weights of rows with these (float32, detached) logits and cross-entropies."""
        if self.dft:
            return torch.exp(-row_ce)
        if self.eaft_alpha is not None:
            top = logits.topk(min(self.EAFT_TOP_K, logits.shape[-1]), dim=-1).values
            log_p = top.log_softmax(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            return (entropy / self.EAFT_SCALE).pow(self.eaft_alpha)
        return 1.0


def router_loss(model, out, share) -> torch.Tensor | float:
    """`router_aux_loss_coef * aux_loss * share` when the model returned a router loss, else 0."""
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        return 0.0
    config = getattr(getattr(model, "module", model), "config", None)
    return config.router_aux_loss_coef * aux * share


def label_hidden_states(model, batch: dict, selected: torch.Tensor, with_outputs: bool = False):
    """Final (normed) hidden states at the `selected` positions, as [N, hidden] (and the model
    outputs when `with_outputs`, for a router loss).

    The model is called through its own forward (so a DDP or accelerate wrapper sees the
    call) with `logits_to_keep` selecting no position: the head projects nothing."""
    nothing = torch.zeros_like(selected)
    out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=nothing)
    hidden = out.hidden_states[-1][selected]
    return (hidden, out) if with_outputs else hidden


def plain_output_head(model) -> torch.nn.Linear | None:
    """The output projection when it is a plain Linear and logits are used as it gives them."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrapper
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    changes_logits = any(getattr(config, key, None) not in (None, 1, 1.0)
                         for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if type(head) is not torch.nn.Linear or changes_logits:
        return None
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: the weight is only whole inside the head's forward
        return None
    return head


def chunk_rows(vocab_size: int) -> int:
    return max(64, CHUNK_ELEMENTS // max(vocab_size, 1))


def linear_cross_entropy(hidden, weight, bias, targets, normalizer, label_smoothing: float = 0.0,
                         dft: bool = False, weighting: TokenWeighting | None = None,
                         kl_anchor=None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T + bias, targets_i) / normalizer, chunked, gradients fused
    (with label_smoothing eps: the target distribution is (1 - eps) one-hot + eps uniform;
    with `dft` / `weighting` each row's CE is weighted by a detached weight, a constant for the
    gradient; `kl_anchor` = (reference hidden [N, H'], reference head, alpha) adds
    alpha * sum_i KL(q_i || p_i) / normalizer, q_i the reference's next-token distribution)."""
    if not torch.is_tensor(normalizer):
        normalizer = torch.tensor(float(normalizer))
    weighting = weighting if weighting is not None else TokenWeighting(dft=dft)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, normalizer.to(torch.float32),
                                     float(label_smoothing), weighting, kl_anchor)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients of hidden / weight / bias
    (softmax - one_hot) / normalizer pushed through the projection; backward only scales them.
    DFT / EAFT multiply each row's loss and gradient by a detached weight (`TokenWeighting`);
    the ASFT anchor adds alpha * KL(q || p) per row, whose logit gradient is alpha * (p - q)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, normalizer, smoothing=0.0, weighting=None, kl_anchor=None):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = chunk_rows(weight.shape[0])
            for start in range(0, h.shape[0], step):
                rows = slice(start, start + step)
                logits = F.linear(h[rows], w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                target = targets[rows]
                picked = logits.gather(1, target[:, None]).squeeze(1)
                if smoothing:  # -sum_v q_v log p_v with q = (1 - eps) one-hot + eps / V
                    picked = (1.0 - smoothing) * picked + smoothing * logits.mean(dim=-1)
                row_ce = lse - picked
                row_weight = weighting.of(logits, row_ce) if weighting else None
                total += (row_ce * row_weight).sum() if weighting else row_ce.sum()
                ref_p = None
                if kl_anchor is not None:  # sum_v q_v (log q_v - log p_v), log p = logits - lse
                    ref_hidden, ref_head, alpha = kl_anchor
                    ref_logp = ref_head(ref_hidden[rows].to(ref_head.weight.dtype)).float().log_softmax(-1)
                    ref_p = ref_logp.exp()
                    total += alpha * (ref_p * (ref_logp - logits + lse[:, None])).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(loss_sum)/d(logits) = softmax - one_hot, computed in place on the logits
                grad = logits.sub_(lse[:, None]).exp_()
                kl_grad = (grad - ref_p).mul_(kl_anchor[2]) if ref_p is not None else None
                grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0 - smoothing
                if smoothing:
                    grad.sub_(smoothing / grad.shape[1])
                if weighting:
                    grad.mul_(row_weight[:, None])
                if kl_grad is not None:
                    grad.add_(kl_grad)
                grad.div_(normalizer)
                grad_lp = grad.to(dtype)
                if need_h:
                    grad_h[rows] = (grad_lp @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (grad_lp.t() @ h[rows]).float()
                if need_b:
                    grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.to(torch.float32)
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None
