"""In-training retrieval monitor (`train.retrieval_monitor_interval: K`).

Every K steps (and at the last step) the training model runs forward-only, through the same
Megatron schedule as validation, over a small fixed probe set: held-out documents of the
built-in recall corpus (`eval.recall`), each cut just before a fact's value that the
document stated earlier. Forward pre-hooks on the full-attention layers' core attention
read the (rotary-embedded) queries and keys, and each head's attention-mass retrieval score
is computed as in `analyze retrieval-heads`: the attention of the second-to-last prompt
token summed over every earlier occurrence of the value's tokens, averaged over prompts.

Each measurement is one metrics.jsonl row (and TensorBoard scalars under `retrieval/`):
{"step", "split": "retrieval", "prompts", "mass_mean", "mass_max", "top_layer",
"top_head", "L{layer}H{head}": score, ...}, layers numbered from 0 as in the HF model.
Works under tensor and pipeline parallelism (each rank scores the heads it holds; one
all-reduce); context parallelism is refused by config validation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hybrid_megatron.analysis.retrieval_heads import find_occurrences

Tensor = torch.Tensor
QUERY_OFFSET = 2  # the second-to-last prompt token, as in the paper's score
CORE_ATTENTION = "self_attention.core_attention"


def probe_prompts(cfg: Any, run_dir: Path, count: int) -> list[tuple[list[int], list[int]]]:
    """Up to `count` (prompt tokens, answer positions) pairs from held-out recall documents."""
    from hybrid_megatron.data.tokenizer import build_tokenizer
    from hybrid_megatron.eval.recall import recall_items
    from hybrid_megatron.training.data import synthetic_mix

    s = cfg.data.synthetic
    tokenizer = build_tokenizer(cfg.data.tokenizer, run_dir)
    items = recall_items(
        tokenizer, 8 * count, cfg.model.seq_length, s.seed, s.min_distance, s.max_distance,
        s.max_facts, **synthetic_mix(cfg),
    )  # fmt: skip
    out = []
    for it in items:
        prompt = it.tokens[: it.value_start]
        value = it.tokens[it.value_start : it.value_start + it.value_len]
        positions = find_occurrences(prompt, value)
        if positions and len(prompt) > QUERY_OFFSET:
            out.append((prompt, positions))
        if len(out) == count:
            break
    return out


def mass_of(q: Tensor, k: Tensor, query: int, positions: list[int], scale: float) -> Tensor:
    """Per head: causal attention of position `query` summed over `positions`.
    q [s, heads, d], k [s, groups, d] (one sample, Megatron's sequence-first layout)."""
    heads, groups = q.shape[1], k.shape[1]
    keys = k[: query + 1].float().repeat_interleave(heads // groups, dim=1)  # [query+1, h, d]
    scores = torch.einsum("hd,jhd->hj", q[query].float(), keys) * scale
    probs = scores.softmax(-1)
    return probs[:, positions].sum(-1)


class RetrievalMonitor:
    """Scores the full-attention heads of the training model on a fixed probe set."""

    def __init__(self, cfg: Any, run_dir: Path, chunks: list[Any], device: torch.device):
        from megatron.core import parallel_state as ps

        from hybrid_megatron.pattern import LayerKind, compile_pattern

        self.cfg, self.chunks, self.device = cfg, chunks, device
        self.interval = cfg.train.retrieval_monitor_interval
        plans = compile_pattern(cfg.model, cfg.parallel).layers
        self.layers = [p.number for p in plans if p.kind == LayerKind.FULL_ATTENTION]
        self.heads = cfg.model.num_attention_heads
        self.prompts = probe_prompts(cfg, run_dir, cfg.train.retrieval_monitor_prompts)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.counts = ps.get_data_parallel_rank() == 0  # one data-parallel replica reports
        self.rank0 = dist.get_rank() == 0

    def due(self, step: int) -> bool:
        return bool(self.prompts) and (step % self.interval == 0 or step == self.cfg.train.steps)

    def _batches(self) -> tuple[list[dict[str, Tensor]], int]:
        s, mb = self.cfg.model.seq_length, self.cfg.train.micro_batch_size
        pp = self.cfg.parallel.pipeline  # the interleaved schedule wants multiples of it
        n = math.ceil(len(self.prompts) / mb / pp) * pp
        tokens = torch.zeros(n * mb, s, dtype=torch.long)
        for i, (prompt, _) in enumerate(self.prompts):
            tokens[i, : len(prompt)] = torch.tensor(prompt)
        batches = []
        for b in range(n):
            t = tokens[b * mb : (b + 1) * mb].to(self.device)
            batches.append(
                {
                    "tokens": t,
                    "labels": torch.zeros_like(t),
                    "loss_mask": torch.zeros(t.shape, device=self.device),
                    "position_ids": torch.arange(s, device=self.device).expand(mb, -1),
                }
            )
        return batches, n

    def _hook(self, sums: Tensor, row: int, seen: dict[int, int]) -> Any:
        mb = self.cfg.train.micro_batch_size

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            q, k = args[0], args[1]  # [s, b, heads here, d], [s, b, groups here, d]
            micro = seen.get(row, 0)
            seen[row] = micro + 1
            scale = getattr(module, "softmax_scale", None) or 1 / math.sqrt(q.shape[-1])
            first = self.tp_rank * q.shape[2]
            for b in range(q.shape[1]):
                index = micro * mb + b
                if index >= len(self.prompts):
                    break
                prompt, positions = self.prompts[index]
                query = len(prompt) - QUERY_OFFSET
                m = mass_of(q[:, b].detach(), k[:, b].detach(), query, positions, scale)
                sums[row, first : first + q.shape[2]] += m.to(sums.device)

        return hook

    @torch.no_grad()
    def measure(self) -> Tensor:
        """[full-attention layers, heads] mean scores (every rank gets the same tensor)."""
        from hybrid_megatron.training.schedule import forward_backward

        sums = torch.zeros(len(self.layers), self.heads, dtype=torch.float64)
        seen: dict[int, int] = {}
        handles = []
        for chunk in self.chunks:
            for name, module in chunk.named_modules():
                number = getattr(module, "layer_number", None)
                if name.endswith(CORE_ATTENTION) and number in self.layers:
                    hook = self._hook(sums, self.layers.index(number), seen)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        batches, n = self._batches()
        for c in self.chunks:
            c.eval()
        try:
            iters = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
            forward_backward(
                self.chunks, iters, n, self.cfg.model.seq_length,
                self.cfg.train.micro_batch_size, forward_only=True,
            )  # fmt: skip
        finally:
            for h in handles:
                h.remove()
            for c in self.chunks:
                c.train()
        if not self.counts:
            sums.zero_()
        reduce_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        total = sums.to(reduce_device)
        dist.all_reduce(total)
        return total.cpu() / len(self.prompts)

    def row(self, step: int, scores: Tensor) -> dict[str, Any]:
        """The metrics row of one measurement."""
        flat = scores.flatten()
        top = int(flat.argmax())
        row: dict[str, Any] = {
            "step": step,
            "split": "retrieval",
            "prompts": len(self.prompts),
            "mass_mean": float(flat.mean()),
            "mass_max": float(flat[top]),
            "top_layer": self.layers[top // self.heads] - 1,
            "top_head": top % self.heads,
        }
        for i, number in enumerate(self.layers):
            for h in range(self.heads):
                row[f"L{number - 1}H{h}"] = float(scores[i, h])
        return row

    def maybe_log(self, step: int, writer: Any) -> dict[str, Any] | None:
        """At due steps: measure (collective) and log a row on rank 0; returns the row."""
        if not self.due(step):
            return None
        row = self.row(step, self.measure())
        if self.rank0:
            writer.log(row)
            print(
                f"retrieval monitor at step {step}: attention mass on the answer "
                f"mean {row['mass_mean']:.3f}, top L{row['top_layer']}H{row['top_head']} "
                f"{row['mass_max']:.3f} ({row['prompts']} prompts)",
                flush=True,
            )
        return row


def retrieval_monitor(
    cfg: Any, run_dir: Path, chunks: list[Any], device: torch.device
) -> RetrievalMonitor | None:
    """The monitor of a run, or None when `train.retrieval_monitor_interval` is 0."""
    if not cfg.train.retrieval_monitor_interval:
        return None
    monitor = RetrievalMonitor(cfg, run_dir, chunks, device)
    if not monitor.prompts and monitor.rank0:
        print(
            "hybrid-megatron: warning: the retrieval monitor found no probe prompt within "
            f"model.seq_length={cfg.model.seq_length} tokens; it is off for this run.",
            flush=True,
        )
    return monitor
