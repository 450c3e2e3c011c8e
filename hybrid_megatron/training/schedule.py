"""One forward-backward over a global batch with Megatron-Core's pipeline schedules.

Megatron picks the schedule from the parallel state: no pipelining, 1F1B, or interleaved
1F1B with virtual pipeline chunks. Model chunks are wrapped in Megatron's DDP so gradient
reduction (data parallel, tied embeddings across pipeline stages, sequence-parallel norms)
is Megatron's `finalize_model_grads`.

Context parallelism: each forward step takes this CP rank's load-balanced part of the
micro-batch (`context_parallel.layout.shard_batch`); the loss is the masked sum of the local
tokens over the CP group's token count. Megatron's schedule multiplies it by the CP size and
DDP averages gradients over data x context ranks, so the gradient is that of the whole
sequence's mean loss; the reported loss is summed over the CP group.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from hybrid_megatron.context_parallel.layout import shard_batch


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


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor, cp_group=None):
    """Mean loss over unmasked tokens of one micro-batch, plus a reporting dict.

    With a context-parallel group of size > 1 the inputs are this rank's part of the
    sequence: the result is its share of the whole sequence's mean (local sum / global count)
    and the reported loss is the whole sequence's mean.
    """
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    cp = cp_group is not None and cp_group.size() > 1
    if cp:
        count = count.detach().clone()
        dist.all_reduce(count, group=cp_group)
    loss = total / count.clamp(min=1)
    reported = loss.detach().clone()
    if cp:
        dist.all_reduce(reported, group=cp_group)
    return loss, {"lm loss": reported}


def lm_forward_step(data_iterator: Iterator[dict] | None, model: torch.nn.Module):
    """Megatron forward-step function: batch dict -> (per-token losses, loss function)."""
    batch = next(data_iterator) if data_iterator is not None else None
    cp_group = None
    if parallel_state.get_context_parallel_world_size() > 1:
        cp_group = parallel_state.get_context_parallel_group()
        if batch is not None:
            batch = shard_batch(batch, cp_group.rank(), cp_group.size())
    tokens = batch["tokens"] if batch is not None else None
    positions = batch["position_ids"] if batch is not None else None
    labels = batch["labels"] if batch is not None else None
    output = model(tokens, positions, None, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None else None
    return output, partial(masked_lm_loss, loss_mask, cp_group=cp_group)


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
