"""Checkpoints: Megatron-Core dist_checkpointing (torch_dist format)."""
