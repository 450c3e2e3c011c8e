"""One forward-backward over a global batch with Megatron-Core's pipeline schedules.

Megatron picks the schedule from the parallel state: no pipelining, 1F1B, or interleaved
1F1B with virtual pipeline chunks. Model chunks are wrapped in Megatron's DDP so gradient
reduction (data parallel, tied embeddings across pipeline stages, sequence-parallel norms)
is Megatron's `finalize_model_grads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig


def wrap_ddp(
    chunks: list[torch.nn.Module],
    tconfig: TransformerConfig,
    use_distributed_optimizer: bool = False,
) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP (contiguous fp32 grad buffers, `param.main_grad`)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=tconfig,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    tconfig.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    return wrapped


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean loss over unmasked tokens of one micro-batch, plus a reporting dict."""
    mask = loss_mask.reshape(-1).float()
    loss = (per_token_loss.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def lm_forward_step(data_iterator: Iterator[dict] | None, model: torch.nn.Module):
    """Megatron forward-step function: batch dict -> (per-token losses, loss function)."""
    batch = next(data_iterator) if data_iterator is not None else None
    tokens = batch["tokens"] if batch is not None else None
    positions = batch["position_ids"] if batch is not None else None
    labels = batch["labels"] if batch is not None else None
    output = model(tokens, positions, None, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None else None
    return output, partial(masked_lm_loss, loss_mask)


def forward_backward(
    chunks: list[torch.nn.Module],
    data_iterator: Iterator[dict] | list[Iterator[dict]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> float | None:
    """Run one global batch; return the mean loss on the last pipeline stage, else None."""
    fb = get_forward_backward_func()
    losses = fb(
        forward_step_func=lm_forward_step,
        data_iterator=data_iterator,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not losses:
        return None
    return float(torch.stack([d["lm loss"] for d in losses]).mean())
