"""What a model to evaluate is: a short hash of its weights' identity, not its folder name."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_FINGERPRINT_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_METADATA = ("config.json", "generation_config.json", "model.safetensors.index.json")


def _fingerprint(h: Any, path: Path) -> None:
    """Name, size and the first and last MiB of a file (values of its first/last tensors)."""
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > 2 * _FINGERPRINT_BYTES:
            f.seek(size - _FINGERPRINT_BYTES)
        h.update(f.read(_FINGERPRINT_BYTES))


def model_identity(path: Path, kind: str) -> str:
    """A short hash naming the weights at `path`, stable across reruns: its resolved path and,
    for a Megatron checkpoint, its completion marker (iteration, file sizes and CRC32s); for a
    Hugging Face directory, its config, weights index, tokenizer files and a fingerprint of
    every weight file. Another model in a folder of the same name gets another identity.
    Raises OSError when the files cannot be read."""
    from hybrid_megatron.checkpoint.layout import COMPLETE_MARKER

    h = hashlib.sha1(str(path.expanduser().resolve()).encode() + b"\0")
    if kind == "megatron":
        h.update((path / COMPLETE_MARKER).read_bytes())
    else:
        for name in (*_HF_METADATA, *TOKENIZER_FILES):
            if (path / name).is_file():
                h.update(name.encode() + b"\0" + (path / name).read_bytes())
        for f in sorted(path.iterdir()):
            if f.suffix in _WEIGHT_SUFFIXES and f.is_file():
                _fingerprint(h, f)
    return h.hexdigest()[:16]
