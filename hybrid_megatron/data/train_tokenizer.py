"""Train a byte-level BPE tokenizer on local .jsonl/.txt files, offline (HF `tokenizers`).

    hybrid-megatron train-tokenizer --input data/corpus.jsonl --vocab-size 512 --output tok/

The result is a Hugging Face tokenizer directory (`tokenizer.json` + config, written with
`save_pretrained`) usable anywhere a tokenizer path is accepted: `data.tokenizer`,
`preprocess --tokenizer`, conversion (shipped with the HF model) and evaluation.

Design: GPT-2 style byte-level BPE, so any text encodes without unknown tokens and decodes
back exactly; digits are always single tokens (as in Llama 3 / Qwen), so numbers are copied
digit by digit, the same at every position; `<eod>` is the end-of-document (EOS) token and
`<pad>` the padding token. A small vocabulary trained on the text a model will see makes
word-heavy prompts several times shorter than bytes (RULER's niah_single_1 template: 375 byte
tokens, about 110 with 512 BPE tokens trained on the synthetic corpus).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from hybrid_megatron.data.errors import DataError
from hybrid_megatron.data.preprocess import TXT_MODES, expand_inputs, iter_file_documents

EOD_TOKEN = "<eod>"
PAD_TOKEN = "<pad>"
_BYTE_ALPHABET = 256
MIN_VOCAB = _BYTE_ALPHABET + 2  # every byte plus <eod> and <pad>


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(
            f"tokenizer output '{output}' already exists and is not an empty directory; "
            "pass a new directory (an existing tokenizer is never overwritten)."
        )


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output: str | os.PathLike,
    *,
    min_frequency: int = 2,
) -> Path:
    """Train byte-level BPE on `texts` and save it as a HF tokenizer directory at `output`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(output).expanduser()
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs >= {MIN_VOCAB} "
            f"tokens ({_BYTE_ALPHABET} bytes + {EOD_TOKEN} + {PAD_TOKEN})."
        )
    _check_output(out)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            if text.strip():
                seen += 1
                yield text

    tokenizer.train_from_iterator(counted(), trainer)
    if not seen:
        raise DataError("no documents to train the tokenizer on: every input text is empty.")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOD_TOKEN, pad_token=PAD_TOKEN
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fast.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left over if saving failed
    return out


def train_tokenizer_from_files(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    output: str | os.PathLike,
    *,
    json_key: str = "text",
    txt_mode: str = "file",
    log: Callable[[str], None] | None = None,
) -> Path:
    """`train_bpe_tokenizer` over the documents of .jsonl/.txt files or directories."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode={txt_mode!r}; use one of {', '.join(TXT_MODES)}.")
    files = expand_inputs(inputs)
    _check_output(Path(output).expanduser())
    texts = (text for path in files for text in iter_file_documents(path, json_key, txt_mode))
    out = train_bpe_tokenizer(texts, vocab_size, output)
    if log:
        written = written_vocab_size(out)
        note = (
            ""
            if written == vocab_size
            else f" ({vocab_size} requested: the text has too few distinct pairs to merge "
            "for more; train on more text for a larger vocabulary)"
        )
        log(f"wrote a {written}-token byte-level BPE tokenizer to {out}{note}")
    return out


def written_vocab_size(tokenizer_dir: Path) -> int:
    """Tokens of a saved tokenizer (special tokens included): what training produced, which
    can be fewer than requested on a small corpus."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size()
