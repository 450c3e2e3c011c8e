"""Benchmark: evaluation throughput of a model at long context on this machine.

Usage: python bench/bench_eval.py [--model PATH] [--config configs/tiny.yaml]
           [--lengths 4096 16384] [--repeats 3] [--threads N] [--device cpu]
           [--attn-implementation sdpa|flex_attention|eager]

Without --model, the architecture of --config (default: the tiny config) with random weights.
For each length it times, best of --repeats:
- prefill: one forward over the whole sequence without a cache (all logits), tokens/s;
- ppl: the perplexity path (`eval.perplexity.token_losses`: decoder + chunked head), tokens/s;
- passkey: one passkey prompt fitted to the length, greedy decoding of its 16-token answer
  with the runner's `greedy_generate` (prefill with cache + decode), samples/s.
Prompt generation speed per task is in bench/bench_eval_tasks.py. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_megatron.data.tokenizer import ByteTokenizer
from hybrid_megatron.eval.generation import greedy_generate
from hybrid_megatron.eval.models import EvalTokenizer, load_eval_model
from hybrid_megatron.eval.perplexity import token_losses
from hybrid_megatron.eval.tasks import generate_samples


def random_model(config_path: str, attn: str | None):
    """The config's architecture as an HF model with random weights, and its tokenizer."""
    from hybrid_megatron.config import load_config
    from hybrid_megatron.hf import HybridMegatronForCausalLM
    from hybrid_megatron.hf.config_mapping import hf_config_from_run_config

    cfg = load_config(config_path)
    if cfg.data.tokenizer != "byte":
        raise SystemExit("random weights need a byte-tokenizer config; pass --model for others")
    config = hf_config_from_run_config(cfg, cfg.model.padded_vocab_size(1))
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(0)
    model = HybridMegatronForCausalLM(config).eval()
    tok = EvalTokenizer(ByteTokenizer(), [ByteTokenizer.EOD], ByteTokenizer.PAD, None)
    return model, tok


def best_time(repeats: int, fn, *args, **kwargs) -> float:
    """Best wall time of `fn(*args, **kwargs)` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def _generate(model, tok, prompt: list[int], max_new_tokens: int) -> list:
    return list(greedy_generate(model, tok, [prompt], max_new_tokens))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="HF dir or Megatron checkpoint (default: random weights)")
    ap.add_argument("--config", default="configs/tiny.yaml", help="architecture without --model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn-implementation", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        model, tok, info = load_eval_model(
            args.model, args.device, attn_implementation=args.attn_implementation
        )
        name = info.name
    else:
        model, tok = random_model(args.config, args.attn_implementation)
        model.to(args.device)
        name = f"{Path(args.config).stem} (random weights)"
    params = sum(p.numel() for p in model.parameters())
    attn = model.config._attn_implementation
    print(
        f"model: {name}, {params / 1e6:.2f}M parameters, device {args.device}, "
        f"{torch.get_num_threads()} threads, attention {attn}"
    )
    header = f"{'length':>7} {'prefill tok/s':>14} {'ppl tok/s':>10} {'passkey s/sample':>17}"
    print(header)
    print("-" * len(header))
    results = []
    g = torch.Generator().manual_seed(0)
    for length in args.lengths:
        ids = torch.randint(0, 256, (1, length), generator=g).to(args.device)
        model(ids[:, :64], use_cache=False)  # warm-up (kernel selection, allocations)
        prefill = best_time(args.repeats, model, ids, use_cache=False)
        ppl = best_time(args.repeats, token_losses, model, ids[0])
        sample = generate_samples("passkey", tok, length, 1)[0]
        prompt = tok.encode(sample.prompt)
        passkey = best_time(args.repeats, _generate, model, tok, prompt, sample.max_new_tokens)
        row = {
            "length": length,
            "prefill_tokens_per_s": round(length / prefill, 1),
            "ppl_tokens_per_s": round(length / ppl, 1),
            "passkey_seconds_per_sample": round(passkey, 3),
        }
        results.append(row)
        print(
            f"{length:>7} {row['prefill_tokens_per_s']:>14,.0f} {row['ppl_tokens_per_s']:>10,.0f} "
            f"{passkey:>17.3f}"
        )
    print(json.dumps({"model": name, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
