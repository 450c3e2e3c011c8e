"""Context parallelism (CP) for every layer type, on torch.distributed (gloo or NCCL).

- `plan`: chunk ownership, halo transfers and the traffic model (no torch).
- `layout`: sharding of batches / tensors in Megatron's load-balanced order.
- `comm`: differentiable all-gather and point-to-point halo exchange, with volume counting.
- `attention`: exact CP attention around any local kernel (all-gather; halo for SWA).
- `mamba`: exact CP Mamba-2 (conv halo + SSM state passing).

Nothing is imported here, so `plan` stays importable without torch.
"""
