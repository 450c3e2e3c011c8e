"""Benchmark: CPU decode speed of the HF model after a 1K vs a 16K-token prompt.

Usage: python bench/bench_decode.py [--config configs/tiny.yaml] [--prompts 1024 16384]
       [--decode 32] [--model HF_DIR]

Two variants of the config's architecture (random weights, built through the same config
mapping the converter uses): "swa+mamba" (every full-attention layer turned into SWA) and
"hybrid" (as configured, with full attention). `--model` benchmarks a converted directory
instead. Each prompt is prefilled in chunks through the cache; then rounds of `--decode`
greedy one-token steps alternate between the prompt lengths, the fastest round of each
counting. Prints tokens/s per prompt length, cache size, the short/long speed ratio (about
1 when the per-token cost does not depend on the context) and a final JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_megatron.config import load_config
from hybrid_megatron.hf import HybridMegatronCache, HybridMegatronForCausalLM
from hybrid_megatron.hf.config_mapping import hf_config_from_run_config


def build_variants(config_path: str) -> dict[str, HybridMegatronForCausalLM]:
    cfg = load_config(config_path)
    variants = {}
    for name, pattern in (
        ("swa+mamba", cfg.model.pattern.replace("*", "S")),
        ("hybrid", cfg.model.pattern),
    ):
        run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pattern=pattern))
        config = hf_config_from_run_config(run, run.model.padded_vocab_size(1))
        torch.manual_seed(0)
        variants[name] = HybridMegatronForCausalLM(config).eval()
    return variants


@torch.no_grad()
def prefill(model: HybridMegatronForCausalLM, length: int, chunk: int) -> tuple:
    """Prefill `length` random tokens in chunks: (cache, next greedy token, seconds)."""
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    cache = HybridMegatronCache(model.config)
    t0 = time.perf_counter()
    for start in range(0, length, chunk):
        out = model(prompt[:, start : start + chunk], past_key_values=cache, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1), time.perf_counter() - t0


@torch.no_grad()
def decode_round(model, cache, token, steps: int) -> tuple[torch.Tensor, float]:
    """`steps` greedy one-token steps: (last token, seconds)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    return token, time.perf_counter() - t0


def measure(model, prompts: list[int], steps: int, chunk: int, rounds: int) -> list[dict]:
    """Decode speed after each prompt length. Rounds alternate between the prompts and the
    fastest round of each counts, so load from other processes hits all lengths alike."""
    states = [list(prefill(model, n, chunk)) for n in prompts]
    best = [float("inf")] * len(prompts)
    for _ in range(rounds):
        for i, state in enumerate(states):
            state[1], seconds = decode_round(model, state[0], state[1], steps)
            best[i] = min(best[i], seconds)
    return [
        {
            "prompt": n,
            "prefill_s": round(state[2], 3),
            "decode_tok_s": round(steps / t, 2),
            "cache_mib": round(sum(state[0].nbytes_per_layer()) / 2**20, 3),
        }
        for n, state, t in zip(prompts, states, best)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--model", default=None, help="benchmark this converted HF directory")
    ap.add_argument(
        "--prompts", type=int, nargs=2, default=[1024, 16384], metavar=("SHORT", "LONG")
    )
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per measurement")
    ap.add_argument("--rounds", type=int, default=10, help="decode rounds; the fastest counts")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). Tiny-model decoding is latency bound: "
        "extra threads mostly add synchronisation, and on a shared CPU much noise",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        models = {Path(args.model).name: HybridMegatronForCausalLM.from_pretrained(args.model)}
        models = {k: m.float().eval() for k, m in models.items()}
    else:
        models = build_variants(args.config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, decode {args.decode}")
    results = {}
    for name, model in models.items():
        measure(model, [64], 4, args.prefill_chunk, 1)  # first-call overheads
        rows = measure(model, args.prompts, args.decode, args.prefill_chunk, args.rounds)
        ratio = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
        results[name] = {"runs": rows, "short_over_long": round(ratio, 2)}
        layers = "".join(t[0] for t in model.config.layer_types)
        print(f"\n{name} ({model.config.num_hidden_layers} layers: {layers})")
        for r in rows:
            print(
                f"  prompt {r['prompt']:>6}: decode {r['decode_tok_s']:8.1f} tok/s  "
                f"prefill {r['prefill_s']:6.2f} s  cache {r['cache_mib']:7.2f} MiB"
            )
        print(f"  decode speed {args.prompts[0]} / {args.prompts[1]} prompt: {ratio:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
