"""`fused_lora`: one LoRA A matmul per group of projections that read the same input.

A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and gate_proj and
up_proj on the same MLP input. PEFT runs each projection's LoRA alone: three `x @ A^T`
matmuls that read x three times, three (tokens x hidden) input gradients that autograd then
adds up, and `lora_B(...) * scaling` followed by `result + ...`: two passes over a
(tokens x out) tensor per projection, forward and backward. PEFT has no grouped LoRA forward,
so this module hand-writes one, as small as it can be:

- the first member of a group called with input x computes `x @ cat(A_q, A_k, A_v)^T` once
  (autograd runs through the cat: each A gets its own gradient, x one input gradient) and keeps
  the slices of the other members, which take theirs when called with the same x (the same
  tensor object, unmodified, in the same grad / autocast mode, same active adapters); the entry
  is dropped once every member took its slice, and a different input (a checkpointing
  recompute, the next step, a member called alone) always computes afresh;
- every LoRA Linear (in a group or alone: o_proj, down_proj) adds its B product to its base
  output by one `torch.addmm(result, a, B^T, alpha=scaling)`: `scaling` folded into the GEMM
  instead of a separate multiply and add over (tokens x out), forward and backward.

Not a single B matmul: the members' outputs go to separate results, so one B would be
block-diagonal (3x the multiply-adds, on zeros) and its output split again; B's input has r
columns, so what it costs is writing the output, which a block-diagonal B does not save.

PEFT stays the owner: the same modules, parameters, state-dict keys and saved files; only a
member's `forward` is replaced (an instance attribute), and it falls back to PEFT's own forward
whenever the fused one would not compute the same thing: adapters disabled or merged, mixed
adapter batches (`adapter_names`), a variant (DoRA, aLoRA), an active dropout (its masks differ
per module; p 0 or eval mode is an identity and fuses), a LoRA bias, or extra forward arguments. Only PEFT's plain `lora.Linear` takes
part (not OFT, not QLoRA's bitsandbytes layers); families whose attention already has one
fused qkv projection (Phi-3's qkv_proj / gate_up_proj) have no group to fuse.
"""

from __future__ import annotations

import logging
import types

log = logging.getLogger(__name__)

# Sibling projections that the decoder layers of the supported families call on one input.
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GROUP_ATTR = "_tunepipe_lora_group"


def fuse_lora_inputs(model) -> int:
    """Give every plain LoRA Linear the grouped forward: siblings named in INPUT_GROUPS share
    one A matmul, every other one is a group of one (it still gets the folded scaling);
    returns how many groups have several members. A second call changes nothing."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    shared = 0
    for parent in model.modules():
        for names in INPUT_GROUPS:
            members = [getattr(parent, name, None) for name in names]
            members = [m for m in members if type(m) is LoraLinear and not hasattr(m, GROUP_ATTR)]
            if len(members) > 1:
                _install(InputGroup(members))
                shared += 1
    alone = [m for m in model.modules() if type(m) is LoraLinear and not hasattr(m, GROUP_ATTR)]
    for member in alone:
        _install(InputGroup([member]))
    log.info("fused_lora: %d groups of LoRA projections share one A matmul, %d layers alone", shared, len(alone))
    return shared


def _install(group: InputGroup) -> None:
    for member in group.members:
        setattr(member, GROUP_ATTR, group)
        member.forward = types.MethodType(grouped_forward, member)


def grouped_forward(self, x, *args, **kwargs):
    """A member's forward: the group's fused A slice when it applies, else PEFT's forward."""
    group = getattr(self, GROUP_ATTR)
    if args or kwargs or not fusable(self):
        return type(self).forward(self, x, *args, **kwargs)
    slices = group.take(self, x)
    result = self.base_layer(x)
    result_dtype = result.dtype
    for adapter, lora_a in slices:
        result = add_lora_product(result, lora_a, self.lora_B[adapter].weight, self.scaling[adapter])
    return result.to(result_dtype)


def add_lora_product(result, lora_a, weight_b, scaling):
    """`result + (lora_a @ weight_b^T) * scaling` as one GEMM (addmm's alpha is the scaling),
    on the flattened tokens; in float32 it equals PEFT's multiply-then-add to rounding."""
    import torch

    if not isinstance(scaling, (int, float)):
        return result + torch.nn.functional.linear(lora_a, weight_b) * scaling
    if result.dtype != lora_a.dtype and not torch.is_autocast_enabled(result.device.type):
        result = result.to(lora_a.dtype)  # PEFT's `result + lora` promotes the same way
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), lora_a.reshape(-1, lora_a.shape[-1]),
                       weight_b.t(), alpha=scaling)
    return flat.view(*result.shape[:-1], flat.shape[-1])


def fusable(module) -> bool:
    """PEFT's plain LoRA path, with nothing that differs per module between A and the input."""
    from torch import nn

    if module.disable_adapters or module.merged:
        return False
    for adapter in _active(module):
        dropout = module.lora_dropout[adapter]
        identity = isinstance(dropout, nn.Identity) or (
            isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training))
        if (not identity or adapter in module.lora_variant or module.lora_A[adapter].bias is not None
                or module.lora_B[adapter].bias is not None):
            return False
    return True


def _active(module) -> list[str]:
    return [adapter for adapter in module.active_adapters if adapter in module.lora_A]


class InputGroup:
    """The members of one group and the fused A output waiting for the members not yet called."""

    def __init__(self, members):
        self.members = members
        self.pending = None  # (x, key, {member index: [(adapter, A slice), ...]})

    def take(self, member, x) -> list:
        """`member`'s LoRA A outputs for input x: from the pending fused product when it was
        computed for this very x in this mode, else a fresh fused product for the group."""
        index = self.members.index(member)
        key = _input_key(x, _active(member))
        if self.pending is None or self.pending[0] is not x or self.pending[1] != key or index not in self.pending[2]:
            self.pending = (x, key, self._fused_product(x))
        slices = self.pending[2].pop(index)
        if not self.pending[2]:
            self.pending = None  # every member served: drop the reference to x
        return slices

    def _fused_product(self, x) -> dict:
        """One `x @ cat(A...)^T` for every active adapter of every member that can take part."""
        import torch

        parts = [(index, adapter, member) for index, member in enumerate(self.members) if fusable(member)
                 for adapter in _active(member)]
        weights = [member.lora_A[adapter].weight for _, adapter, member in parts]
        owner = parts[0][2]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        product = torch.nn.functional.linear(owner._cast_input_dtype(x, weights[0].dtype), weight)
        by_member: dict[int, list] = {}
        for (index, adapter, _), lora_a in zip(parts, product.split([w.shape[0] for w in weights], dim=-1)):
            by_member.setdefault(index, []).append((adapter, lora_a))
        return by_member


def _input_key(x, adapters) -> tuple:
    """Besides the input's identity, what a pending product is valid for: the input's version
    (no in-place change since), the grad and autocast modes, and the active adapters."""
    import torch

    device = x.device.type
    return (x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None, tuple(adapters))
