"""Data layer: tokenizers, a synthetic retrieval corpus, preprocessing into Megatron's indexed
format, and train/valid GPT dataset building through Megatron-Core."""

from hybrid_megatron.data.datasets import (
    Datasets,
    MegatronTokenizerAdapter,
    build_datasets,
    parse_blend,
    validate_prefix,
)
from hybrid_megatron.data.errors import DataError
from hybrid_megatron.data.preprocess import PreprocessResult, preprocess, read_sidecar
from hybrid_megatron.data.synthetic import (
    Fact,
    SyntheticDocument,
    generate_corpus,
    iter_documents,
)
from hybrid_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "Datasets",
    "Fact",
    "HFTokenizer",
    "MegatronTokenizerAdapter",
    "PreprocessResult",
    "SyntheticDocument",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "generate_corpus",
    "iter_documents",
    "parse_blend",
    "preprocess",
    "read_sidecar",
    "validate_prefix",
]
