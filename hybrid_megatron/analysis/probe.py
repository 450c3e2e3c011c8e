"""Linear probes per layer (`hybrid-megatron analyze probe`).

A needle classification task: niah prompts (the eval's generator) whose needle value is
one of `num_classes` fixed values; the label is which. For every layer, a multinomial
logistic regression (torch, L-BFGS, L2-regularised, standardised features) is trained on
the last prompt token's hidden state - the residual stream after the layer ("residual") and
the layer's own contribution to it ("delta") - and scored on held-out prompts. Accuracy
well above chance (1 / num_classes) at a layer means the needle's value is linearly
readable at the last token there.

Writes DIR/probe.json and DIR/probe.png (held-out accuracy by layer).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.errors import ConfigError

Tensor = torch.Tensor


@dataclass
class ProbeSettings:
    task: str = "niah_single_1"
    length: int = 4096
    num_samples: int = 200
    num_classes: int = 4
    test_fraction: float = 0.3
    l2: float = 1e-3
    seed: int = 42


def class_values(num_classes: int, seed: int) -> list[str]:
    """`num_classes` distinct 7-digit needle values."""
    rng = random.Random(seed)
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), num_classes)]


def probe_prompts(tok: Any, settings: ProbeSettings) -> tuple[list[str], list[int]]:
    """(prompts, labels): niah samples whose needle value is replaced by a class value."""
    from hybrid_megatron.eval.tasks import generate_samples

    if not settings.task.startswith("niah_"):
        raise ConfigError(f"--task {settings.task}: probing needs a niah_* task")
    samples = generate_samples(
        settings.task, tok, settings.length, settings.num_samples, settings.seed, max_new_tokens=8
    )
    values = class_values(settings.num_classes, settings.seed)
    rng = random.Random(settings.seed + 1)
    prompts, labels = [], []
    for s in samples:
        if len(s.outputs) != 1:
            raise ConfigError(
                f"--task {settings.task} has several needle values; use niah_single_*"
            )
        label = rng.randrange(settings.num_classes)
        prompts.append(s.prompt.replace(s.outputs[0], values[label]))
        labels.append(label)
    return prompts, labels


@torch.no_grad()
def last_token_features(model: Any, ids: list[int]) -> tuple[Tensor, Tensor]:
    """([layers, hidden] residual after each layer, [layers, hidden] each layer's delta) at the
    last position, from forward hooks on the decoder layers."""
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []

    def hook(module: Any, args: tuple, out: Any) -> None:
        inputs.append(args[0][0, -1].float().cpu())
        outputs.append((out[0] if isinstance(out, tuple) else out)[0, -1].float().cpu())

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    residual = torch.stack(outputs)
    return residual, residual - torch.stack(inputs)


def fit_logistic(x: Tensor, y: Tensor, classes: int, l2: float, steps: int = 100) -> Any:
    """A multinomial logistic regression (standardised inputs); returns predict(x) -> labels."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    z64 = z.double()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z64 @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()

    def predict(x_new: Tensor) -> Tensor:
        return (((x_new - mean) / std).double() @ w + b).argmax(-1)

    return predict


def probe_layers(
    features: dict[str, Tensor], labels: Tensor, settings: ProbeSettings
) -> list[dict[str, Any]]:
    """Train/test accuracy per layer and feature kind; features[kind] is [samples, layers, d]."""
    n = labels.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    n_test = max(1, int(round(n * settings.test_fraction)))
    test, train = order[:n_test], order[n_test:]
    if len(train) < 2 or len(set(labels[train].tolist())) < 2:
        raise ConfigError(
            f"{n} samples leave too few training samples of distinct classes; "
            "raise --num-samples or lower --test-fraction"
        )
    rows = []
    layers = next(iter(features.values())).shape[1]
    for layer in range(layers):
        row: dict[str, Any] = {"layer": layer}
        for kind, f in features.items():
            predict = fit_logistic(
                f[train, layer], labels[train], settings.num_classes, settings.l2
            )
            row[kind] = {
                "train_acc": float((predict(f[train, layer]) == labels[train]).double().mean()),
                "test_acc": float((predict(f[test, layer]) == labels[test]).double().mean()),
            }
        rows.append(row)
    return rows


def run_probe(
    model_path: str,
    out: Path,
    settings: ProbeSettings,
    *,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: str | None = None,
    verify_conversion: bool = True,
) -> Path:
    """`analyze probe`: write probe.json and probe.png to `out`."""
    from hybrid_megatron.analysis.plots import plot_lines
    from hybrid_megatron.analysis.sharding import (
        is_writer,
        load_analysis_model,
        shard_map,
    )

    if settings.num_classes < 2:
        raise ConfigError("--num-classes must be >= 2")
    if not 0 < settings.test_fraction < 1:
        raise ConfigError("--test-fraction must be in (0, 1)")
    model, tok, info = load_analysis_model(model_path, device, dtype, tokenizer, verify_conversion)
    prompts, labels = probe_prompts(tok, settings)
    pairs = shard_map(prompts, lambda p: last_token_features(model, tok.encode(p)))
    residual, delta = zip(*pairs, strict=True)
    features = {"residual": torch.stack(residual), "delta": torch.stack(delta)}
    rows = probe_layers(features, torch.tensor(labels), settings)
    types = list(getattr(model.config, "layer_types", None) or ["layer"] * len(rows))
    for row in rows:
        row["kind"] = types[row["layer"]]
    result = {
        "model": info.to_dict(),
        "settings": asdict(settings),
        "chance": 1 / settings.num_classes,
        "class_values": class_values(settings.num_classes, settings.seed),
        "label_counts": [labels.count(c) for c in range(settings.num_classes)],
        "layers": rows,
    }
    if not is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    x = [r["layer"] for r in rows]
    plot_lines(
        x,
        {
            "residual (test)": [r["residual"]["test_acc"] for r in rows],
            "delta (test)": [r["delta"]["test_acc"] for r in rows],
            "chance": [result["chance"]] * len(rows),
        },
        out / "probe.png",
        xlabel="layer",
        ylabel="held-out accuracy",
        title=f"needle-value probe ({settings.num_classes} classes, {info.name})",
    )
    return out
