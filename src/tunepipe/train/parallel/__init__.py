"""Several processes: torchrun / accelerate launch, Ray Train, one rank's worker, FSDP / DeepSpeed."""
