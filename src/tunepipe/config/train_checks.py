"""Checks of `TrainConfig` keys that work together: the SFT token losses, gradient
checkpointing's two switches, and the FSDP Trainer keys (kept apart from training.py so that
file stays a readable list of fields)."""

from __future__ import annotations

from tunepipe.config.checks import require

SFT_LOSS_KEYS = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")
FSDP_OPTIONS = {"full_shard", "shard_grad_op", "auto_wrap", "offload"}


def check_sft_losses(train) -> None:
    """At most one of DFT / EAFT / ASFT, none with label smoothing, sft / pt only."""
    chosen = [key for key in SFT_LOSS_KEYS if getattr(train, key)]
    require(len(chosen) <= 1, "train", chosen[-1] if chosen else "use_dft_loss", True,
            f"{' and '.join(chosen)} each replace the token loss: keep one (ASFT already includes DFT)")
    require(not (chosen and train.label_smoothing_factor), "train", chosen[0] if chosen else "", True,
            "weights each token's loss; smoothing the targets too has no agreed meaning: set "
            "label_smoothing_factor 0")
    for key in ("use_eaft_loss", "use_asft_loss"):
        require(not getattr(train, key) or train.stage in ("sft", "pt"), "train", key, True,
                f"applies to the next-token stages (sft, pt), not stage {train.stage}")
    for key in ("eaft_alpha", "asft_alpha"):
        require(getattr(train, key) >= 0, "train", key, getattr(train, key), "must be >= 0")


def check_checkpointing(train) -> None:
    require(not (train.gradient_checkpointing and train.disable_gradient_checkpointing), "train",
            "disable_gradient_checkpointing", True, "contradicts gradient_checkpointing: true: keep one")


def check_fsdp(train) -> None:
    """transformers' `fsdp` options that FSDP2 has, and no second way of launching."""
    options = train.fsdp_options()
    unknown = sorted(set(options) - FSDP_OPTIONS)
    require(not unknown, "train", "fsdp", train.fsdp, f"{', '.join(unknown)}: tunepipe runs FSDP2, which takes "
            "full_shard or shard_grad_op, auto_wrap and offload (no_shard: leave fsdp unset, DDP)")
    require(not ({"full_shard", "shard_grad_op"} <= set(options)), "train", "fsdp", train.fsdp,
            "full_shard and shard_grad_op exclude each other")
    require(not options or not (train.accelerate_config or train.deepspeed), "train", "fsdp", train.fsdp,
            "give the fsdp options, an accelerate config or a DeepSpeed JSON, not several")
    require(not train.fsdp_transformer_layer_cls_to_wrap or bool(options), "train",
            "fsdp_transformer_layer_cls_to_wrap", train.fsdp_transformer_layer_cls_to_wrap, "needs train.fsdp")


def check_ray(train) -> None:
    """Ray places its workers itself; its mapping keys must parse at load, not at launch."""
    require(train.ray_num_workers >= 1, "train", "ray_num_workers", train.ray_num_workers, "must be >= 1")
    require(train.ray_num_workers == 1 or (train.num_processes == 1 and train.num_machines == 1
                                            and not train.accelerate_config and not train.deepspeed),
            "train", "ray_num_workers", train.ray_num_workers,
            "Ray starts and places the workers itself: leave num_processes / num_machines at 1 and "
            "accelerate_config / deepspeed unset")
    train.ray_init_settings()
    train.ray_resources()
