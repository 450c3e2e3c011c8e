"""Tests for the data layer (`hybrid_megatron.data`): tokenizers, synthetic corpus,
preprocessing into Megatron's indexed format, and GPT/blended dataset building.

CPU only, small files in tmp dirs, no downloads; the whole file runs in well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_megatron.data import synthetic
from hybrid_megatron.data.datasets import (
    build_datasets,
    check_helpers,
    parse_blend,
    validate_prefix,
)
from hybrid_megatron.data.errors import DataError
from hybrid_megatron.data.preprocess import preprocess, read_sidecar
from hybrid_megatron.data.synthetic import generate_corpus, iter_documents
from hybrid_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from hybrid_megatron.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SEQ = 64

pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex")


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _read_back(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two preprocessed synthetic corpora (A: 300 docs, B: 200 docs) with the byte tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    out = {"root": root}
    for name, n, seed in (("a", 300, 1), ("b", 200, 2)):
        src = generate_corpus(root / f"{name}.jsonl", n, seed=seed, max_distance=128)
        preprocess([src], root / name, "byte", log=None)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny word-level HF tokenizer saved locally (built from a few strings, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>", "<pad>"])
    tok.train_from_iterator(["the pass key is", "hello world", "key value is"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    for text in ("plain ascii.", "héllo wörld — 日本語 🙂", ""):
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eod, tok.pad]) == text  # specials are dropped
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multibyte char is replaced
    assert build_tokenizer("byte").encode("ü") == [0xC3, 0xBC]


def test_hf_tokenizer_local(hf_dir):
    tok = build_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer)
    assert tok.eod == tok.hf_tokenizer.eos_token_id
    assert tok.vocab_size == len(tok.hf_tokenizer)
    ids = tok.encode("hello world")
    assert len(ids) == 2 and tok.eod not in ids
    assert tok.decode(ids) == "hello world"
    assert tok.encode_batch(["hello", "world"]) == [ids[:1], ids[1:]]


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*'byte'"):
        HFTokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="not a tokenizer directory"):
        build_tokenizer(str(tmp_path))  # exists, but holds no tokenizer files
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="could not load"):
        HFTokenizer(tmp_path)


# ----------------------------------------------------------------------------- generator

_KV_STATEMENT = re.compile(r"key (\d{4}) = (\d{5})\.")
_KV_QUERY = re.compile(r"The value of key (\d{4}) is (\d{5})\.")
_PK_STATEMENT = re.compile(r"The pass key is (\d{5})\. Remember it\.")
_PK_QUERY = re.compile(r"What is the pass key\? The pass key is (\d{5})\.")


def test_generator_deterministic(tmp_path):
    a = generate_corpus(tmp_path / "a.jsonl", 50, seed=7)
    b = generate_corpus(tmp_path / "b.jsonl", 50, seed=7)
    c = generate_corpus(tmp_path / "c.jsonl", 50, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # Document i depends only on (seed, i): a longer corpus starts with the same documents.
    longer = generate_corpus(tmp_path / "d.jsonl", 80, seed=7).read_text().splitlines()
    assert longer[:50] == a.read_text().splitlines()
    assert all(json.loads(line).keys() == {"text"} for line in longer)


def test_generator_states_what_it_asks():
    lo, hi = 20, 150
    docs = list(iter_documents(400, seed=3, min_distance=lo, max_distance=hi))
    kinds = set()
    for doc in docs:
        text = doc.text
        assert text.isascii() and not re.search(r"\d", _strip_facts(text))
        stated = {m.group(1): (m.group(2), m.end()) for m in _KV_STATEMENT.finditer(text)}
        asked = {m.group(1): (m.group(2), m.start()) for m in _KV_QUERY.finditer(text)}
        pk_stated = [(m.group(1), m.end()) for m in _PK_STATEMENT.finditer(text)]
        pk_asked = [(m.group(1), m.start()) for m in _PK_QUERY.finditer(text)]
        # Every stated fact is asked, only stated facts are asked, with the stated value,
        # after the statement, at a distance in range.
        assert stated.keys() == asked.keys()
        for key, (value, end) in stated.items():
            q_value, start = asked[key]
            assert q_value == value and lo <= start - end <= hi
        assert len(pk_stated) == len(pk_asked) <= 1
        for (value, end), (q_value, start) in zip(pk_stated, pk_asked):
            assert q_value == value and lo <= start - end <= hi
        # The returned metadata agrees with the text.
        assert len(doc.facts) == len(stated) + len(pk_stated) >= 1
        for fact in doc.facts:
            kinds.add(fact.kind)
            assert text[fact.answer_start : fact.answer_start + 5] == fact.value
            assert fact.distance == fact.query_start - fact.statement_end
    assert kinds == {"kv", "passkey"}
    assert max(len(d.facts) for d in docs) > 1  # interleaved facts occur


def _strip_facts(text: str) -> str:
    for pattern in (_KV_STATEMENT, _KV_QUERY, _PK_STATEMENT, _PK_QUERY):
        text = pattern.sub("", text)
    return text


def test_generator_rejects_bad_distances():
    with pytest.raises(ValueError, match="min_distance"):
        next(iter_documents(1, min_distance=2))
    with pytest.raises(ValueError, match="max_distance"):
        generate_corpus("unused.jsonl", 1, min_distance=50, max_distance=40)
    doc = synthetic.generate_document(random.Random(0), min_distance=9, max_distance=9)
    assert {f.distance for f in doc.facts} == {9}


@pytest.mark.parametrize("doc_length", [None, 511])
def test_generator_eval_format_documents(doc_length):
    """niah / passkey documents are the evaluation prompt followed by its answer."""
    from hybrid_megatron.eval.tasks import niah, passkey

    docs = list(
        iter_documents(
            400,
            seed=5,
            min_distance=40,
            max_distance=120,
            niah_fraction=0.25,
            passkey_fraction=0.25,
            copy_fraction=0.2,
            repeat_fraction=0.1,
            doc_length=doc_length,
        )
    )
    plain = list(iter_documents(400, seed=5, min_distance=40, max_distance=120))
    counts = {"niah": 0, "passkey_prompt": 0, "copy": 0, "repeat": 0, "kv": 0, "passkey": 0,
              "repeat_numbers": 0}  # fmt: skip
    for doc, recall_doc in zip(docs, plain):
        text, fact = doc.text, doc.facts[0]
        counts[fact.kind] += 1
        if doc_length is not None:
            assert len(text) == doc_length or fact.kind in ("kv", "passkey")
        if fact.kind in ("kv", "passkey"):
            # Recall documents of a mixed corpus are those of an unmixed one (then padded).
            assert text.startswith(recall_doc.text) and doc.facts == recall_doc.facts
            continue
        if fact.kind == "copy":  # "Copy: {numbers}. Again: {numbers}." blocks
            assert len(doc.facts) >= (2 if doc_length else 1)
            for f in doc.facts:
                assert text[f.statement_start : f.statement_end - 1] == f.value
                assert text[f.answer_start : f.answer_start + len(f.value)] == f.value
                assert re.fullmatch(r"\d{5}( \d{5})*", f.value) and 40 <= f.distance <= 120
            continue
        if fact.kind == "repeat":  # "Repeat: {s} | {s} | ..." with copies `distance` apart
            (f,) = doc.facts
            copies = text.split("\n")[0].removeprefix("Repeat: ").split(" | ")
            assert len(copies) >= (3 if doc_length is None else 4)
            assert len(text) >= (6 * 120 if doc_length is None else doc_length)  # mostly copies
            assert set(copies) == {f.value} and re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", f.value)
            counts["repeat_numbers"] += any(c.isdigit() for c in f.value)
            assert text[f.answer_start : f.answer_start + len(f.value)] == f.value
            assert f.answer_start - f.statement_start == f.distance and 40 <= f.distance <= 120
            continue
        prompt = text[: fact.answer_start - 1]
        assert text[fact.answer_start - 1 :].startswith(f" {fact.value}.")
        statement = text[fact.statement_start : fact.statement_end]
        if fact.kind == "niah":
            fmt = {"type_needle_v": "number", "query": fact.key}
            assert statement == niah.NEEDLE.format(
                type_needle_v="numbers", key=fact.key, value=fact.value
            )
            assert prompt.endswith(niah.ANSWER_PREFIX_ONE.format(**fmt))
            assert len(fact.value) == 7 and prompt.count(fact.value) == 1
        else:
            assert statement == passkey.INFO.format(key=fact.value)
            assert prompt.startswith(passkey.DESCRIPTION)
            assert prompt.endswith(passkey.QUESTION + passkey.ANSWER_PREFIX)
            assert 1 <= int(fact.value) <= 99999
        assert fact.statement_end <= fact.query_start < fact.answer_start
    assert min(counts.values()) > 15 and counts["repeat_numbers"] < counts["repeat"], counts
    # Whole-sequence documents: the haystack grows to fill the length.
    if doc_length is not None:
        assert min(len(d.text) for d in docs if d.facts[0].kind == "niah") == doc_length


def test_max_haystack_sizes_eval_prompts_apart_from_repeat_distances():
    """max_haystack stretches niah/passkey haystacks; repeat distances keep max_distance."""
    mix = {"niah_fraction": 0.4, "passkey_fraction": 0.3, "repeat_fraction": 0.3}
    docs = list(iter_documents(600, seed=3, min_distance=10, max_distance=120, **mix))
    wide = list(
        iter_documents(600, seed=3, min_distance=10, max_distance=120, max_haystack=800, **mix)
    )

    def longest(kind: str, corpus: list) -> int:
        return max(d.facts[0].query_start - d.facts[0].statement_end for d in corpus
                   if d.facts[0].kind == kind)  # fmt: skip

    # Needle-to-question distance: 0..1 noise lines (120 // 92) vs up to 8 (800 // 92).
    assert longest("niah", docs) <= 2 * 92 < 6 * 92 < longest("niah", wide) <= 9 * 92
    assert longest("passkey_prompt", docs) <= 120 + 100 < 600 < longest("passkey_prompt", wide)
    for doc in wide:
        if doc.facts[0].kind == "repeat":
            assert 10 <= doc.facts[0].distance <= 120
    with pytest.raises(ConfigError, match=r"max_haystack=5 is below min_distance=10"):
        next(iter_documents(1, min_distance=10, max_distance=120, max_haystack=5))


@pytest.mark.parametrize("min_distance, max_distance", [(16, 30), (40, 200), (100, 150)])
def test_copy_documents_fit_doc_length(min_distance, max_distance):
    """Copy blocks are capped so a filled document never overflows its sequence."""
    rng = random.Random(0)
    for _ in range(100):
        doc = synthetic.generate_copy_document(rng, min_distance, max_distance, length=255)
        assert len(doc.text) == 255
        assert all(min_distance <= f.distance <= max_distance for f in doc.facts)
    assert synthetic.smallest_document("copy", 150) > 255  # refused by the config check instead


def test_generator_rejects_bad_mix():
    with pytest.raises(ValueError, match="niah_fraction"):
        next(iter_documents(1, niah_fraction=0.7, passkey_fraction=0.5))
    with pytest.raises(ValueError, match="doc_length"):
        next(iter_documents(1, doc_length=0))


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_roundtrip_indexed(tmp_path):
    texts = ["first doc.", "héllo wörld — 日本語 🙂", "x" * 300]
    src = _write_jsonl(tmp_path / "docs.jsonl", texts[:2] + [""])  # the empty text is skipped
    txt = tmp_path / "more.txt"
    txt.write_text(f"\n{texts[2]}\n\n   \n\nlast paragraph\n", encoding="utf-8")
    res = preprocess([src, txt], tmp_path / "out" / "ds", "byte", txt_mode="paragraph", log=None)
    tok = ByteTokenizer()
    expected = [tok.encode(t) + [tok.eod] for t in texts + ["last paragraph"]]
    assert _read_back(res.prefix) == expected
    assert (res.num_documents, res.num_tokens, res.skipped_empty) == (4, sum(map(len, expected)), 1)
    meta = read_sidecar(res.prefix)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 258 and meta["eod"] == 256
    assert meta["num_documents"] == 4 and meta["dtype"] == "uint16"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx", "ds.json"]
    # txt_mode="file": the whole file is one document.
    res = preprocess([txt], tmp_path / "whole", log=None)
    assert _read_back(res.prefix) == [tok.encode(txt.read_text()) + [tok.eod]]


def test_preprocess_hf_tokenizer(tmp_path, hf_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", ["hello world", "the pass key is"])
    res = preprocess([src], tmp_path / "hf", str(hf_dir), log=None)
    tok = build_tokenizer(str(hf_dir))
    assert _read_back(res.prefix) == [
        tok.encode(t) + [tok.eod] for t in ("hello world", "the pass key is")
    ]
    assert read_sidecar(res.prefix)["vocab_size"] == tok.vocab_size


def test_preprocess_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        preprocess([tmp_path / "missing.jsonl"], tmp_path / "x", log=None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no documents"):
        preprocess([empty], tmp_path / "x", log=None)
    blank = _write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no documents"):
        preprocess([blank], tmp_path / "x", log=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:3: invalid JSON"):
        preprocess([bad], tmp_path / "x", log=None)
    nokey = _write_jsonl(tmp_path / "nokey.jsonl", ["fine"])
    with nokey.open("a") as f:
        f.write('{"body": "text under another key"}\n')
    with pytest.raises(DataError, match=r"nokey.jsonl:2: no key 'text'.*'body'.*--json-key"):
        preprocess([nokey], tmp_path / "x", log=None)
    with pytest.raises(DataError, match="unsupported extension"):
        preprocess(
            [tmp_path / "bad.jsonl", _touch(tmp_path / "data.csv")], tmp_path / "x", log=None
        )
    # Nothing half-written is left behind by the failures above.
    assert not list(tmp_path.glob("x.*"))


def _touch(path: Path) -> Path:
    path.write_text("a,b\n")
    return path


def test_preprocess_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "preprocess_cli", REPO_ROOT / "tools" / "preprocess_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = _write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    assert cli.main(["--input", str(src), "--output-prefix", str(tmp_path / "d")]) == 0
    assert _read_back(tmp_path / "d") == [[111, 110, 101, 256], [116, 119, 111, 256]]
    assert cli.main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", "x"]) == 2
    assert "error: input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- datasets


def _sample_windows(ds, docs: list[list[int]]) -> list[np.ndarray]:
    """The token windows GPTDataset should return, rebuilt from its indices and the source docs."""
    concat = np.concatenate([docs[d] for d in ds.document_index])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in ds.document_index])])
    out = []
    for k in range(len(ds)):
        doc_pos, offset = ds.sample_index[ds.shuffle_index[k]]
        start = starts[doc_pos] + offset
        out.append(concat[start : start + SEQ + 1])
    return out


def test_gpt_dataset_roundtrip(corpus):
    tok = ByteTokenizer()
    texts = [json.loads(line)["text"] for line in (corpus["root"] / "a.jsonl").open()]
    docs = [tok.encode(t) + [tok.eod] for t in texts]
    assert _read_back(corpus["a"]) == docs
    train, valid = build_datasets(
        str(corpus["a"]), "90,10,0", SEQ, 1234, 200, 20, tok, 512, corpus["root"] / "cache"
    )
    assert len(train) >= 200 and len(valid) >= 20
    assert type(train).__name__ == "GPTDataset"
    for ds in (train, valid):
        for k, window in enumerate(_sample_windows(ds, docs)):
            sample = ds[k]
            assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert sample["tokens"].tolist() == window[:-1].tolist()
            assert sample["labels"].tolist() == window[1:].tolist()
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
    # Valid documents come from the last 10% of the corpus, train from the first 90%.
    assert set(valid.document_index.tolist()) == set(range(270, 300))
    assert set(train.document_index.tolist()) == set(range(270))
    assert tok.eod in torch.cat([train[k]["tokens"] for k in range(20)]).tolist()


def test_blend_two_prefixes(corpus):
    tok = ByteTokenizer()
    blend = f"0.7 {corpus['a']} 0.3 {corpus['b']}"
    train, valid = build_datasets(
        blend, "95,5,0", SEQ, 7, 400, 40, tok, 512, corpus["root"] / "cache"
    )
    assert (len(train), len(valid)) == (400, 40)
    counts = np.bincount([int(train[i]["dataset_id"]) for i in range(len(train))], minlength=2)
    assert abs(counts[0] / len(train) - 0.7) < 0.02
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8, shuffle=True)))
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (8, SEQ)
    assert batch["tokens"].dtype == torch.int64 and int(batch["tokens"].max()) < 258
    # Unweighted blends are weighted by token count; valid_samples=0 -> no valid dataset.
    train, valid = build_datasets(
        [str(corpus["a"]), str(corpus["b"])],
        "95,5,0",
        SEQ,
        7,
        100,
        0,
        tok,
        512,
        corpus["root"] / "cache",
    )
    assert 100 <= len(train) <= 102 and valid is None  # Megatron rounds up per prefix


def test_dataloader_workers(corpus):
    train, _ = build_datasets(
        str(corpus["b"]), "100,0,0", SEQ, 1, 16, 0, ByteTokenizer(), 512, corpus["root"] / "cache"
    )
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1)
    batches = list(loader)
    assert len(batches) >= 4 and batches[0]["tokens"].shape == (4, SEQ)
    assert torch.equal(batches[0]["tokens"][0], train[0]["tokens"])


def test_build_in_single_process_gloo_group(corpus, tmp_path):
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        blend = f"0.5 {corpus['a']} 0.5 {corpus['b']}"
        train, valid = build_datasets(
            blend, "90,10,0", SEQ, 3, 64, 8, ByteTokenizer(), 512, tmp_path / "cache"
        )
        assert (len(train), len(valid)) == (64, 8)
        # Rank 0 cached both the GPTDataset and the BlendedDataset indices.
        names = [p.name for p in (tmp_path / "cache").rglob("*.npy")]
        assert any("BlendedDataset" in n for n in names) and any("GPTDataset" in n for n in names)
        again, _ = build_datasets(
            blend, "90,10,0", SEQ, 3, 64, 8, ByteTokenizer(), 512, tmp_path / "cache"
        )
        assert torch.equal(again[5]["tokens"], train[5]["tokens"])
    finally:
        torch.distributed.destroy_process_group()


def test_regenerated_data_gets_fresh_index_cache(tmp_path):
    src = generate_corpus(tmp_path / "c.jsonl", 60, seed=1)
    preprocess([src], tmp_path / "c", log=None)
    build_datasets(
        str(tmp_path / "c"), "100,0,0", SEQ, 1, 10, 0, ByteTokenizer(), 512, tmp_path / "cache"
    )
    src = generate_corpus(tmp_path / "c.jsonl", 60, seed=2)
    preprocess([src], tmp_path / "c", log=None)
    train, _ = build_datasets(
        str(tmp_path / "c"), "100,0,0", SEQ, 1, 10, 0, ByteTokenizer(), 512, tmp_path / "cache"
    )
    assert len(list((tmp_path / "cache").iterdir())) == 2
    docs = _read_back(tmp_path / "c")
    assert train[0]["tokens"].tolist() == _sample_windows(train, docs)[0][:-1].tolist()


# ----------------------------------------------------------------------------- bad datasets


@pytest.fixture
def copy_of_a(corpus, tmp_path) -> Path:
    for ext in ("bin", "idx", "json"):
        shutil.copy(f"{corpus['a']}.{ext}", tmp_path / f"a.{ext}")
    return tmp_path / "a"


def _build(prefix, model_vocab=512, split="90,10,0"):
    return build_datasets(
        str(prefix),
        split,
        SEQ,
        1,
        10,
        2,
        ByteTokenizer(),
        model_vocab,
        Path(prefix).parent / "cache",
    )


@pytest.mark.parametrize("ext", ["bin", "idx"])
def test_missing_file(copy_of_a, ext):
    os.remove(f"{copy_of_a}.{ext}")
    with pytest.raises(DataError, match=rf"a\.{ext} not found.*tools/preprocess_data\.py"):
        _build(copy_of_a)


def test_truncated_bin(copy_of_a):
    size = os.path.getsize(f"{copy_of_a}.bin")
    with open(f"{copy_of_a}.bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataError, match=rf"a\.bin is truncated.*{size - 10:,} bytes"):
        _build(copy_of_a)
    with open(f"{copy_of_a}.bin", "r+b") as f:
        f.truncate(0)
    with pytest.raises(DataError, match=r"a\.bin is truncated"):
        _build(copy_of_a)


def test_bin_larger_than_index(copy_of_a):
    with open(f"{copy_of_a}.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="different runs"):
        _build(copy_of_a)


@pytest.mark.parametrize("damage", ["header", "truncate", "empty", "counts"])
def test_corrupt_idx(copy_of_a, damage):
    idx = Path(f"{copy_of_a}.idx")
    data = idx.read_bytes()
    if damage == "header":
        data = b"GARBAGE!!" + data[9:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    else:  # a sequence count larger than the file holds
        data = data[:18] + struct.pack("<Q", 10**9) + data[26:]
    idx.write_bytes(data)
    with pytest.raises(DataError, match=r"index file .*a\.idx is corrupt"):
        _build(copy_of_a)


def _idx_tables(idx: Path) -> tuple[int, int, int]:
    """(sequence count, byte offset of the pointer table, of the document index)."""
    n = struct.unpack("<Q", idx.read_bytes()[18:26])[0]
    return n, 34 + 4 * n, 34 + 12 * n


@pytest.mark.parametrize("damage", ["shifted", "wild", "documents"])
def test_corrupt_pointer_tables_are_named_before_training(copy_of_a, damage):
    """A shifted pointer trained silently on wrong tokens and a wild one crashed at the first
    batch with a numpy traceback (issue 14, item 11)."""
    idx = Path(f"{copy_of_a}.idx")
    data = bytearray(idx.read_bytes())
    n, pointers, documents = _idx_tables(idx)
    assert n > 3
    at = pointers + 8 * 2  # pointer of sequence 2
    value = struct.unpack_from("<q", data, at)[0]
    if damage == "shifted":  # still inside the .bin, still monotone
        struct.pack_into("<q", data, at, value + 2)
        match = r"sequence pointer 2 is \d+ but sequence 1 ends at byte"
    elif damage == "wild":
        struct.pack_into("<q", data, at, value ^ (1 << 40))
        match = r"sequence pointer 2 is"
    else:  # the document index goes back
        struct.pack_into("<q", data, documents + 8 * 2, 0)
        match = r"document index entry 2 \(0\) is below the one before it"
    idx.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"index file .*a\.idx is corrupt .*{match}.*preprocess"):
        _build(copy_of_a)


def test_vocab_bigger_than_model(copy_of_a):
    # The tokenizer alone does not fit the model.
    with pytest.raises(DataError, match=r"vocab mismatch.*258.*200"):
        _build(copy_of_a, model_vocab=200)
    # The sidecar records a vocab larger than the model's.
    msg = r"vocab mismatch.*vocab size 258.*model's vocab size is 200"
    with pytest.raises(DataError, match=msg):
        validate_prefix(str(copy_of_a), 200)
    # Without a sidecar, the sampled token ids are checked (eod = 256 is in the data).
    os.remove(f"{copy_of_a}.json")
    with pytest.raises(DataError, match=r"holds token id 256.*vocab size is 200"):
        validate_prefix(str(copy_of_a), 200)
    assert validate_prefix(str(copy_of_a), 258).max_token_id == 256


def test_tokenizer_mismatch(copy_of_a, hf_dir):
    with pytest.raises(DataError, match="tokenizer mismatch"):
        build_datasets(
            str(copy_of_a),
            "90,10,0",
            SEQ,
            1,
            10,
            2,
            build_tokenizer(str(hf_dir)),
            512,
            copy_of_a.parent / "cache",
        )


def test_split_and_blend_errors(copy_of_a, tmp_path):
    src = _write_jsonl(tmp_path / "tiny.jsonl", [f"doc {i}" for i in range(20)])
    preprocess([src], tmp_path / "tiny", log=None)
    # 2% of 20 documents rounds to none: Megatron would spin forever; we refuse up front.
    with pytest.raises(DataError, match="valid split with 0 documents"):
        _build(tmp_path / "tiny", split="98,2,0")
    with pytest.raises(DataError, match="gives validation no data"):
        _build(copy_of_a, split="100,0,0")
    with pytest.raises(DataError, match="split 'a,b' is invalid"):
        _build(copy_of_a, split="a,b")
    with pytest.raises(DataError, match="cannot parse the data blend"):
        parse_blend(f"0.5 {copy_of_a} {copy_of_a}")
    with pytest.raises(DataError, match="positive"):
        parse_blend(f"0 {copy_of_a} 1 {copy_of_a}")
    assert parse_blend(f"{copy_of_a}.bin") == ([str(copy_of_a)], None)
    assert parse_blend([(0.3, "x"), (0.7, "y")])[1] == [0.3, 0.7]


def test_missing_helpers_message(monkeypatch):
    check_helpers()
    monkeypatch.setitem(__import__("sys").modules, "megatron.core.datasets.helpers_cpp", None)
    with pytest.raises(RuntimeError, match="helpers_cpp.*reinstall megatron-core"):
        check_helpers()


def test_recall_probe_covers_repeat_documents_with_letter_chance():
    """Repeat documents enter the recall probe; chance counts letters (26 ** -n) and digits."""
    from hybrid_megatron.eval.recall import recall_items

    items = recall_items(ByteTokenizer(), 20, 256, min_distance=16, max_distance=60,
                         repeat_fraction=1.0)  # fmt: skip
    assert len(items) == 20 and {it.kind for it in items} == {"repeat"}
    with_digits = 0
    for it in items:
        value = bytes(it.tokens[it.value_start :]).decode()
        letters, digits = sum(c.isalpha() for c in value), sum(c.isdigit() for c in value)
        assert letters + digits >= 10
        assert it.chance == pytest.approx(26.0**-letters * 10.0**-digits)
        assert bytes(it.tokens[: it.value_start]).decode().endswith(value + " | ")
        with_digits += digits > 0
    assert 0 < with_digits < len(items)  # half of the repeat documents mix in numbers


# ------------------------------------------------------------------------- tokenizer training


def test_train_tokenizer_cli_bpe_round_trip(tmp_path, capsys):
    """`hybrid-megatron train-tokenizer`: an offline byte-level BPE that loads everywhere."""
    from hybrid_megatron.cli import main as cli_main
    from hybrid_megatron.eval.tasks import generate_samples

    corpus = generate_corpus(
        tmp_path / "corpus.jsonl", 300, seed=2, niah_fraction=0.3, passkey_fraction=0.3
    )
    out = tmp_path / "tok"
    args = ["train-tokenizer", "--input", str(corpus), "--vocab-size", "400", "--output", str(out)]
    assert cli_main(args) == 0
    tok = build_tokenizer(str(out))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
    assert tok.decode([tok.eod]) == "<eod>" and tok.pad is not None and tok.pad != tok.eod
    text = "The pass key is 90817. Ünïcode ✓ and tabs\tstay.\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: lossless on text it never saw
    assert [tok.decode([i]) for i in tok.encode("123 4567")] == [*"123", " ", *"4567"]
    # Trained on the synthetic corpus, the niah prompt is several times shorter than bytes.
    (sample,) = generate_samples("niah_single_1", tok, 200, 1, 0, max_new_tokens=12)
    assert len(tok.encode(sample.prompt)) <= 200 < len(sample.prompt.encode()) / 2
    # Usable by preprocessing; an existing tokenizer is never overwritten.
    result = preprocess([corpus], tmp_path / "ds", tokenizer=str(out), log=None)
    assert result.num_documents == 300
    before = (out / "tokenizer.json").read_bytes()
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == before
    assert cli_main([*args[:4], "100", "--output", str(tmp_path / "small")]) == 2
    assert re.search(r"vocab_size=100 is too small.*>= 258", capsys.readouterr().err)
    assert not (tmp_path / "small").exists()


def test_train_tokenizer_reports_the_size_it_wrote(tmp_path, capsys):
    """On a small corpus BPE stops below the requested size; the message claimed the
    requested size (issue 14, item 12)."""
    from hybrid_megatron.cli import main as cli_main

    corpus = _write_jsonl(tmp_path / "small.jsonl", ["the pass key is 12345", "hello world"] * 3)
    out = tmp_path / "tok"
    args = ["train-tokenizer", "--input", str(corpus), "--vocab-size", "2000"]
    assert cli_main([*args, "--output", str(out)]) == 0
    written = build_tokenizer(str(out)).vocab_size
    assert 258 <= written < 2000
    err = capsys.readouterr().err
    assert f"wrote a {written}-token byte-level BPE tokenizer" in err and "2000 requested" in err


def test_non_utf8_input_names_its_line(tmp_path):
    """The error named the line where decoding of a buffered block started (line 1 here), not
    the line holding the bad bytes (issue 14, item 12)."""
    lines = [json.dumps({"text": f"document {i}"}).encode() for i in range(200)]
    lines[150] = b'{"text": "caf\xe9"}'  # Latin-1, not UTF-8
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl:151: not valid UTF-8 at byte 14 "):
        preprocess([bad], tmp_path / "x", log=None)
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"first line\nsecond\nthird caf\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.txt:3: not valid UTF-8 at byte 10 "):
        preprocess([txt], tmp_path / "y", log=None)
