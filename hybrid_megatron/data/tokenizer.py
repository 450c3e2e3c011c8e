"""Tokenizers for preprocessing and training: a built-in byte tokenizer and a local HF wrapper.

Both expose the same small interface (`encode`, `decode`, `eod`, `pad`, `vocab_size`, `spec`).
`spec` is the string that `build_tokenizer` accepts to rebuild the same tokenizer; it is
recorded in the preprocessing sidecar (PREFIX.json).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from hybrid_megatron.data.errors import DataError

BYTE_SPEC = "byte"
BPE_SPEC = "bpe"  # a BPE trained on the run's own generated corpus: RUN_DIR/data/tokenizer

# Files of which at least one must be present for a directory to hold a HF tokenizer.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer."""

    spec: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    @property
    def pad(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) plus `<eod>` (256) and `<pad>` (257); needs no files."""

    spec = BYTE_SPEC
    EOD = 256
    PAD = 257

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def pad(self) -> int:
        return self.PAD

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: its UTF-8 bytes (no special tokens added)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never downloads).

    `encode` adds no special tokens (no BOS); preprocessing appends `eod` (the EOS token) to
    each document.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(
                f"tokenizer path '{path}' does not exist. Pass 'byte' for the built-in byte "
                "tokenizer, or a local directory written by `hybrid-megatron train-tokenizer` or "
                "`tokenizer.save_pretrained(DIR)` (downloads are disabled)."
            )
        if not p.is_dir() or not any((p / f).is_file() for f in _HF_TOKENIZER_FILES):
            raise DataError(
                f"tokenizer path '{path}' is not a tokenizer directory: expected a directory "
                f"containing one of {', '.join(_HF_TOKENIZER_FILES)} (as written by "
                "`tokenizer.save_pretrained(DIR)`)."
            )
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"could not load a Hugging Face tokenizer from '{path}': {err}. Check that the "
                "directory was written by `tokenizer.save_pretrained(DIR)` and is complete."
            ) from err
        if self._tok.eos_token_id is None:
            raise DataError(
                f"the tokenizer in '{path}' has no EOS token, which is used as the "
                "end-of-document token. Set `eos_token` in its tokenizer_config.json."
            )
        self.spec = str(p.resolve())

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad(self) -> int | None:
        pad = self._tok.pad_token_id
        return None if pad is None else int(pad)

    @property
    def hf_tokenizer(self):
        """The wrapped `transformers` tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r})"


def run_tokenizer_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run with `data.tokenizer: bpe` keeps the tokenizer it trained."""
    return Path(run_dir) / "data" / "tokenizer"


def resolve_tokenizer_spec(spec: str | os.PathLike, run_dir: str | os.PathLike | None) -> str:
    """`spec` with 'bpe' replaced by the run's own tokenizer directory (needs `run_dir`)."""
    if str(spec) != BPE_SPEC:
        return str(spec)
    if run_dir is None:
        raise DataError("data.tokenizer 'bpe' names the run's own tokenizer: a run dir is needed.")
    return str(run_tokenizer_dir(run_dir))


def build_tokenizer(
    spec: str | os.PathLike, run_dir: str | os.PathLike | None = None
) -> ByteTokenizer | HFTokenizer:
    """'byte' -> `ByteTokenizer`; 'bpe' -> the run's trained tokenizer; else a local HF dir."""
    spec = resolve_tokenizer_spec(spec, run_dir)
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    return HFTokenizer(spec)


# ------------------------------------------------------------------ the byte tokenizer for HF

BYTE_EOD_TOKEN, BYTE_PAD_TOKEN = "<eod>", "<pad>"


def byte_to_char() -> dict[int, str]:
    """A printable, reversible character for each byte (the byte-level pre-tokenizer's map).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are
    shifted to code points 256 and up, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_hf_tokenizer():
    """A `PreTrainedTokenizerFast` whose ids equal `ByteTokenizer`'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=BYTE_EOD_TOKEN, pad_token=BYTE_PAD_TOKEN
    )
    if fast.convert_tokens_to_ids(BYTE_EOD_TOKEN) != ByteTokenizer.EOD:
        raise AssertionError("byte tokenizer special token ids are out of order")
    return fast
