"""Dependency ranges stay what CI tests: the compatibility step's pins are the lower bounds
of pyproject.toml, and every library we use deeply has both bounds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEP = ("torch", "megatron-core", "transformers", "tokenizers", "safetensors", "jinja2", "scipy")


def _ranges() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", dep.split(";")[0]).groups()
        out[name.lower()] = spec.replace(" ", "")
    return out


def test_deep_dependencies_have_tested_lower_and_upper_bounds():
    ranges = _ranges()
    for name in DEEP:
        spec = ranges[name]
        assert re.search(r">=\d", spec) and re.search(r"<\d", spec), f"{name}: {spec}"


def test_lowest_constraints_pin_the_lower_bounds():
    ranges = _ranges()
    pins = {}
    for line in (REPO / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    assert {"transformers", "tokenizers", "safetensors"} <= pins.keys()
    for name, version in pins.items():
        lower = re.search(r">=([\w.]+)", ranges[name]).group(1)
        assert tuple(map(int, version.split("."))) >= tuple(map(int, lower.split(".")))
        assert version.split(".")[: len(lower.split("."))] == lower.split("."), (name, version)
