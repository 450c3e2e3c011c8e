"""Data layer: tokenizers, a synthetic retrieval corpus, preprocessing into Megatron's indexed
format, and train/valid GPT dataset building through Megatron-Core.

Names are imported on first use (PEP 562), so importing one submodule does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Datasets": "datasets",
    "MegatronTokenizerAdapter": "datasets",
    "build_datasets": "datasets",
    "parse_blend": "datasets",
    "validate_prefix": "datasets",
    "DataError": "errors",
    "PreprocessResult": "preprocess",
    "preprocess": "preprocess",
    "read_sidecar": "preprocess",
    "Fact": "synthetic",
    "SyntheticDocument": "synthetic",
    "generate_corpus": "synthetic",
    "iter_documents": "synthetic",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
