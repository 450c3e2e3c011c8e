"""Tests for the offline long-context task generators (`hybrid_megatron.eval.tasks`).

CPU only, no downloads: the BPE tokenizer is trained here on a few KB of text, essays and QA
files are written to tmp dirs. Runs in a few seconds.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from hybrid_megatron.data.tokenizer import ByteTokenizer, HFTokenizer
from hybrid_megatron.eval.tasks import (
    DATA_DIR_ENV,
    RULER_TASKS,
    SYNTHETIC_TASKS,
    TASKS,
    EvalDataError,
    MissingTaskDataError,
    Sample,
    TargetLengthError,
    generate_grid,
    generate_samples,
    get_task,
)
from hybrid_megatron.eval.tasks.fitting import DoesNotFit, fit_size
from hybrid_megatron.eval.tasks.freq_words import zeta
from hybrid_megatron.eval.tasks.haystack import DEPTHS, NOISE
from hybrid_megatron.eval.tasks.words import (
    common_word_pool,
    load_words,
    random_key_word,
    random_uuid,
)

BYTE = ByteTokenizer()
NEEDLE_RE = re.compile(r"One of the special magic (numbers|words|uuids) for (\S+) is: (\S+)\.")
# Largest haystack unit of each synthetic task, in bytes: the fitting tolerance (see generate.py).
TOLERANCE_FRACTION = 0.03


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A byte-level BPE (vocab 1500) trained on the task vocabulary, saved and reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = list(common_word_pool())
    corpus = [NOISE] * 20 + [" ".join(rng.sample(words, 50)) for _ in range(200)]
    corpus += [
        f"The pass key is {rng.randint(1, 50000)}. VAR ABCDE = {rng.randint(0, 99999)}"
        for _ in range(100)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))
    return HFTokenizer(path)


def _essay_text(n_sentences: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    adjs, nouns, verbs = load_words("adjectives"), load_words("nouns"), load_words("verbs")
    out = []
    for i in range(n_sentences):
        a, n1, v, n2 = rng.choice(adjs), rng.choice(nouns), rng.choice(verbs), rng.choice(nouns)
        s = f"The {a} {n1} will {v} a {n2}"
        out.append(s + ("?" if i % 7 == 0 else "."))
        if i % 50 == 49:
            out.append("\n\n")
    return " ".join(out)


@pytest.fixture(scope="module")
def essay_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("essays")
    (root / "a.txt").write_text(_essay_text(200, 1))
    (root / "b.txt").write_text(_essay_text(200, 2))
    return root


def _context(sample: Sample) -> str:
    """The haystack part of a niah prompt (between the instructions and the question)."""
    start = sample.input.index("afterwards.\n") + len("afterwards.\n")
    return sample.input[start : sample.input.rindex("\nWhat ")]


# ----------------------------------------------------------------------------- registry


def test_registry_lists_ruler_tasks_and_passkey():
    assert set(RULER_TASKS) == {
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
        "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
        "vt", "cwe", "fwe", "qa_1", "qa_2",
    }  # fmt: skip
    assert list(TASKS) == [*RULER_TASKS, "passkey"]
    assert set(SYNTHETIC_TASKS) == {
        "niah_single_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "vt",
        "cwe",
        "fwe",
        "passkey",
    }
    expected_budget = {"vt": 30, "cwe": 120, "fwe": 50, "passkey": 16}
    for name in SYNTHETIC_TASKS:
        assert get_task(name).max_new_tokens == expected_budget.get(name, 128)


def test_get_task_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="no option.*colour"):
        get_task("niah_single_1", colour="red")
    # Data options are shared: tasks that read no files ignore them.
    assert get_task("cwe", data_dir="/nowhere").name == "cwe"
    with pytest.raises(ValueError, match="only accepted with a task name"):
        generate_samples(get_task("fwe"), BYTE, 4096, 1, alpha=3.0)


def test_word_lists_are_rulers_wonderwords_lists():
    """RULER reads wonderwords 2.2's files line by line, right-stripped, as written."""
    sizes = {"nouns": 6786, "adjectives": 910, "verbs": 1041}  # distinct entries in 2.2
    for kind, size in sizes.items():
        words = load_words(kind)
        assert len(words) == size and all(w == w.rstrip() and w for w in words)
    assert {"ATM", "x-ray", "ad hoc"} <= set(common_word_pool())  # kept as RULER keeps them
    assert "nasty" in load_words("adjectives")  # "nasty " in the file, right-stripped
    assert len(common_word_pool()) == len(set(load_words("nouns")) | set(load_words("adjectives"))
                                          | set(load_words("verbs")))  # fmt: skip
    adjs, nouns = set(load_words("adjectives")), set(load_words("nouns"))

    def adjective_noun(key: str) -> bool:
        return any(key[:i] in adjs and key[i + 1 :] in nouns for i, c in enumerate(key) if c == "-")

    rng = random.Random(0)
    assert all(adjective_noun(random_key_word(rng)) for _ in range(200))
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", random_uuid(rng)
    )


def test_ruler_depths():
    assert len(DEPTHS) == 40 and DEPTHS[0] == 0 and DEPTHS[-1] == 100 and DEPTHS[1] == 3


# ----------------------------------------------------------------------------- fitting


def test_fit_size_finds_the_largest_fitting_size():
    rng = random.Random(0)
    for trial in range(50):
        base, slope = rng.randint(10, 500), rng.uniform(0.3, 40)
        budget = rng.randint(1000, 200_000)
        f = lambda s, b=base, k=slope: b + int(k * s) + (s % 3)  # noqa: E731
        guess = rng.choice([None, rng.randint(0, 50_000)])
        hint = rng.choice([None, slope * rng.uniform(0.5, 2)])
        fit = fit_size(f, budget, min_size=0, guess=guess, slope=hint)
        assert f(fit.size) <= budget < f(fit.size + 1), trial
        assert fit.evals <= 30
    with pytest.raises(DoesNotFit):
        fit_size(lambda s: 100 + s, 50)


def test_fit_size_respects_max_size_and_non_monotone_lengths():
    assert fit_size(lambda s: s, 10**6, max_size=77).size == 77
    wobble = lambda s: 3 * s + (7 if s % 5 == 0 else 0)  # noqa: E731
    fit = fit_size(wobble, 1000)
    assert wobble(fit.size) <= 1000 and fit.size >= 325


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_same_seed_same_samples(task):
    a = [s.to_dict() for s in generate_samples(task, BYTE, 4096, 3, seed=7)]
    b = [s.to_dict() for s in generate_samples(task, BYTE, 4096, 3, seed=7)]
    c = [s.to_dict() for s in generate_samples(task, BYTE, 4096, 3, seed=8)]
    assert a == b
    assert [s["input"] for s in a] != [s["input"] for s in c]
    assert len({s["input"] for s in a}) == 3  # samples differ from each other
    shard = generate_samples(task, BYTE, 4096, 2, seed=7, start_index=1)
    assert [s.to_dict() for s in shard] == a[1:]  # shards match one big run


def test_sample_round_trips_through_dict():
    s = generate_samples("niah_single_1", BYTE, 2048, 1)[0]
    d = json.loads(json.dumps(s.to_dict()))
    assert Sample.from_dict(d) == s
    assert s.prompt == s.input + s.answer_prefix


# ----------------------------------------------------------------------------- length fitting


def _check_lengths(samples, tokenizer, target, tolerance):
    for s in samples:
        assert s.target_length == target
        assert len(tokenizer.encode(s.prompt)) + s.max_new_tokens == s.length
        assert s.length <= target
        assert target - s.length <= tolerance, (s.task, target, s.length)


@pytest.mark.parametrize("target", [4096, 8192, 32768])
@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_fits_target_length_byte_tokenizer(task, target):
    samples = generate_samples(task, BYTE, target, 3, seed=1)
    _check_lengths(samples, BYTE, target, TOLERANCE_FRACTION * target)
    # A few full tokenizations per sample, not a binary search over the whole range.
    assert sum(s.metadata["fit_evals"] for s in samples) / len(samples) <= 6


@pytest.mark.parametrize("target", [2048, 8192])
@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_fits_target_length_bpe_tokenizer(task, target, bpe):
    samples = generate_samples(task, bpe, target, 2, seed=1)
    _check_lengths(samples, bpe, target, max(TOLERANCE_FRACTION * target, 64))


def test_too_short_target_raises():
    with pytest.raises(TargetLengthError, match="too short for task 'niah_single_1'"):
        generate_samples("niah_single_1", BYTE, 300, 1)


def test_tight_tasks_are_within_a_few_tokens():
    """Fine-grained haystacks (passkey characters, fwe words) land within a few tokens."""
    for task in ("passkey", "fwe"):
        for s in generate_samples(task, BYTE, 16384, 3):
            assert 16384 - s.length <= 16, task


# ----------------------------------------------------------------------------- task content


def test_niah_single_1_format():
    s = generate_samples("niah_single_1", BYTE, 4096, 1)[0]
    assert s.input.startswith("A special magic number is hidden within the following text.")
    assert "What is the special magic number for " in s.input
    assert re.fullmatch(
        r" The special magic number for [a-z]+-[a-z]+ mentioned in the provided "
        r"text is",
        s.answer_prefix,
    )
    needles = NEEDLE_RE.findall(s.input)
    assert len(needles) == 1 and needles[0][0] == "numbers"
    assert needles[0][2] == s.outputs[0] and re.fullmatch(r"\d{7}", s.outputs[0])
    assert needles[0][1] in s.answer_prefix
    lines = _context(s).split("\n")
    assert sum(line == NOISE for line in lines) == len(lines) - 1


def test_niah_multikey_haystacks_are_distractor_needles():
    for task, vtype in (("niah_multikey_2", r"\d{7}"), ("niah_multikey_3", r"[0-9a-f-]{36}")):
        s = generate_samples(task, BYTE, 4096, 1)[0]
        lines = _context(s).split("\n")
        found = [NEEDLE_RE.fullmatch(line) for line in lines]
        assert all(found) and len(lines) > 10
        keys = [m.group(2) for m in found]
        query = s.answer_prefix.split(" for ")[1].split(" mentioned")[0]
        assert keys.count(query) == 1
        assert found[keys.index(query)].group(3) == s.outputs[0]
        assert re.fullmatch(vtype, s.outputs[0])


def test_niah_essay_variants(essay_dir):
    opts = {"essay_path": essay_dir}
    s = generate_samples("niah_multivalue", BYTE, 4096, 1, **opts)[0]
    assert s.input.startswith("Some special magic numbers are hidden")
    assert s.answer_prefix.endswith("mentioned in the provided text are")
    assert len(s.outputs) == 4 and all(v in s.input for v in s.outputs)

    s = generate_samples("niah_multiquery", BYTE, 4096, 1, **opts)[0]
    query = s.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    assert re.fullmatch(r"[a-z-]+, [a-z-]+, [a-z-]+, and [a-z-]+", query)
    assert len(s.outputs) == 4 and len(NEEDLE_RE.findall(s.input)) == 4

    s = generate_samples("niah_multikey_1", BYTE, 4096, 1, **opts)[0]
    assert len(NEEDLE_RE.findall(s.input)) == 4 and len(s.outputs) == 1

    s = generate_samples("niah_single_3", BYTE, 4096, 1, **opts)[0]
    assert "special magic uuid for" in s.input and re.fullmatch(r"[0-9a-f-]{36}", s.outputs[0])
    # Needles sit at sentence starts of the essay text.
    ctx = _context(s)
    pos = ctx.index("One of the special magic")
    assert pos == 0 or ctx[pos - 2] in ".?"


def test_vt_chain_and_example():
    s = generate_samples("vt", BYTE, 8192, 1)[0]
    value = re.search(r"assigned the value (\d{5}) in the text above\.$", s.input).group(1)
    assert s.answer_prefix.endswith(f"5 variables are assigned the value {value}, they are: ")
    # The solved example comes first, then the real question.
    assert s.input.count("Memorize and track the chain(s)") == 2
    main = s.input[s.input.rindex("Memorize and track") :]
    chain = re.findall(r"^VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5}) |(\d{5}))$", main, flags=re.M)
    assert [c[0] for c in chain] == s.outputs and chain[0][2] == value
    assert all(chain[i][1] == chain[i - 1][0] for i in range(1, 5))
    example = s.input[: s.input.rindex("Memorize and track")]
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n$", example)


def test_cwe_counts():
    s = generate_samples("cwe", BYTE, 32768, 1)[0]
    assert s.metadata["variant"] == "long"
    main = s.input[s.input.rindex("Below is a numbered list") :]
    items = re.findall(r"\d+\. ([a-z-]+)", main.split("\n")[1])
    counts = Counter(items)
    assert len(s.outputs) == 10
    assert all(counts[w] == 30 for w in s.outputs)
    assert set(counts.values()) == {30, 3}
    assert s.input.count("Answer: The top 10 words") == 1  # the solved example
    short = generate_samples("cwe", BYTE, 2048, 1)[0]
    assert short.metadata["variant"] == "short"


def test_cwe_word_pool_extends_past_the_shipped_list():
    gen = get_task("cwe")
    state = gen.draw(random.Random(0), 0, 200_000)
    words = gen._words(state, len(common_word_pool()) + 100)
    assert len(set(words)) == len(words) and "-" in words[-1]


def test_fwe_answer_is_most_frequent():
    s = generate_samples("fwe", BYTE, 8192, 1)[0]
    text = s.input.split("coded words. ")[1].split("\nQuestion:")[0]
    top = [w for w, _ in Counter(text.split()).most_common(4)]
    assert top[0] == "..." and top[1:] == s.outputs
    assert abs(zeta(2.0) - 3.14159265358979**2 / 6) < 1e-9


def test_passkey_prompt():
    s = generate_samples("passkey", BYTE, 4096, 1)[0]
    key = s.outputs[0]
    assert s.input.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n" in s.input
    assert s.prompt.endswith("\nWhat is the pass key? The pass key is")
    assert s.metric == "passkey" and 1 <= int(key) <= 50000


def test_model_template_and_remove_newline_tab():
    s = generate_samples(
        "niah_single_1",
        BYTE,
        4096,
        1,
        model_template="[INST] {task_template} [/INST]",
        remove_newline_tab=True,
    )[0]
    assert s.input.startswith("[INST] A special magic") and s.input.endswith("[/INST]")
    assert "\n" not in s.input and s.answer_prefix.startswith(" The special")
    assert len(BYTE.encode(s.prompt)) + s.max_new_tokens == s.length <= 4096


# ----------------------------------------------------------------------------- depth placement


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_niah_needle_depth_noise(depth):
    s = generate_samples("niah_single_1", BYTE, 8192, 1, depth=depth)[0]
    ctx = _context(s)
    needle = NEEDLE_RE.search(ctx).group(0)
    before = ctx.index(needle)
    haystack_chars = len(ctx) - len(needle) - 1
    assert s.depth == depth
    assert abs(before / haystack_chars - depth / 100) <= (len(NOISE) + 1) / haystack_chars
    tokens_before = len(BYTE.encode(ctx[:before]))
    assert abs(tokens_before / len(BYTE.encode(ctx)) - depth / 100) < 0.02


@pytest.mark.parametrize("depth", [0, 33, 50, 100])
def test_needle_depth_needle_haystack_bpe(depth, bpe):
    s = generate_samples("niah_multikey_2", bpe, 4096, 1, depth=depth)[0]
    ctx = _context(s)
    lines = ctx.split("\n")
    query = s.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    idx = next(i for i, line in enumerate(lines) if f" for {query} is:" in line)
    assert abs(idx / (len(lines) - 1) - depth / 100) <= 1 / (len(lines) - 1)


def test_random_depths_are_reported_truthfully():
    for s in generate_samples("niah_single_1", BYTE, 8192, 5):
        ctx = _context(s)
        frac = ctx.index("One of the special") / len(ctx)
        assert abs(frac - s.depth / 100) < 0.02


@pytest.mark.parametrize("depth", [0, 20, 50, 80, 100])
def test_needle_depth_essay(depth, essay_dir):
    s = generate_samples("niah_single_2", BYTE, 8192, 1, depth=depth, essay_path=essay_dir)[0]
    ctx = _context(s)
    needle = NEEDLE_RE.search(ctx).group(0)
    frac = ctx.index(needle) / (len(ctx) - len(needle))
    assert abs(frac - depth / 100) < 0.02  # within about one sentence


@pytest.mark.parametrize("depth", [0, 40, 100])
def test_passkey_depth(depth):
    s = generate_samples("passkey", BYTE, 8192, 1, depth=depth)[0]
    lines = s.input.split("\n")
    prefix, suffix = lines[1], lines[3]
    assert lines[2].startswith("The pass key is")
    assert abs(len(prefix) / (len(prefix) + len(suffix)) - depth / 100) < 1e-3


def test_needle_grid():
    cells = generate_grid(BYTE, [2048, 4096], depths=[0, 50, 100], num_samples=2, seed=3)
    assert [(c.target_length, c.depth) for c in cells] == [
        (L, d) for L in (2048, 4096) for d in (0.0, 50.0, 100.0)
    ]
    for c in cells:
        assert len(c.samples) == 2
        assert all(s.depth == c.depth and s.length <= c.target_length for s in c.samples)
    # Same seed in every cell: the same needles, only the haystack and depth change.
    assert len({tuple(c.samples[0].outputs) for c in cells}) == 1
    passkey = generate_grid(BYTE, [4096], depths=[25], task="passkey")
    assert passkey[0].samples[0].depth == 25 and passkey[0].samples[0].task == "passkey"


# ----------------------------------------------------------------------------- user data files


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multivalue", "qa_1", "qa_2"])
def test_missing_data_raises_a_clear_error(task, tmp_path, monkeypatch):
    with pytest.raises(MissingTaskDataError) as err:
        get_task(task)
    assert err.value.task == task and DATA_DIR_ENV in str(err.value)
    assert "download" in str(err.value)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(MissingTaskDataError) as err:
        generate_samples(task, BYTE, 4096, 1)
    expected = {"qa_1": "squad.json", "qa_2": "hotpotqa.json"}.get(task, "PaulGrahamEssays.json")
    assert err.value.path == str(tmp_path / expected)
    assert expected in str(err.value)


def test_essay_file_formats(tmp_path, essay_dir):
    text = _essay_text(300, 5)
    (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": text}))
    (tmp_path / "list.json").write_text(json.dumps([text[:5000], {"text": text[5000:]}]))
    (tmp_path / "essay.txt").write_text(text)
    for opts in (
        {"data_dir": tmp_path},
        {"essay_path": tmp_path / "list.json"},
        {"essay_path": tmp_path / "essay.txt"},
        {"essay_path": essay_dir},
    ):
        s = generate_samples("niah_single_2", BYTE, 4096, 1, **opts)[0]
        assert s.outputs[0] in s.input and s.length <= 4096
    (tmp_path / "bad.json").write_text(json.dumps({"essays": 3}))
    with pytest.raises(EvalDataError, match="unknown layout"):
        get_task("niah_single_2", essay_path=tmp_path / "bad.json")
    # A short essay is repeated to fill long haystacks, as in RULER.
    (tmp_path / "short.txt").write_text("Short essay. It repeats.")
    s = generate_samples("niah_single_2", BYTE, 4096, 1, essay_path=tmp_path / "short.txt")[0]
    assert 4096 - s.length < 16


def _squad(path: Path) -> Path:
    data = {"data": [
        {"paragraphs": [
            {"context": f"Article {a} paragraph {p}. " + _essay_text(4, 10 * a + p),
             "qas": [{"question": f"What is in article {a} paragraph {p}?",
                      "answers": [{"text": f"answer {a}.{p}"}, {"text": f"alt {a}.{p}"}],
                      "is_impossible": False},
                     {"question": "Unanswerable?", "answers": [], "is_impossible": True}]}
            for p in range(3)]}
        for a in range(4)]}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def _hotpot(path: Path) -> Path:
    data = [{"question": f"Hotpot question {i}?", "answer": f"hot answer {i}",
             "context": [[f"Title {i}-{j}", [f"Sentence {i}-{j}. ", _essay_text(3, i * 7 + j)]]
                         for j in range(4)]}
            for i in range(6)]  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def test_qa_tasks_from_local_files(tmp_path):
    squad = _squad(tmp_path / "squad.json")
    samples = generate_samples("qa_1", BYTE, 1500, 3, qa_path=squad)
    for i, s in enumerate(samples):
        a, p = divmod(i, 3)
        assert s.input.endswith(f"Question: What is in article {a} paragraph {p}?")
        assert s.outputs == [f"answer {a}.{p}", f"alt {a}.{p}"] and s.answer_prefix == " Answer:"
        gold = s.metadata["gold_documents"]
        assert len(gold) == 1 and f"Document {gold[0]}:\nArticle {a} paragraph {p}." in s.input
        assert s.metric == "string_match_part" and s.max_new_tokens == 32 and s.length <= 1500
        # Paragraphs of the same article are the first distractors (RULER's SQuAD rule).
        assert 3 < s.metadata["haystack_size"] < 12 and s.input.count(f"Article {a} paragraph") == 3
    _hotpot(tmp_path / "hotpotqa.json")
    for s in generate_samples("qa_2", BYTE, 4096, 2, data_dir=tmp_path):
        assert len(s.metadata["gold_documents"]) == 4 and s.length <= 4096
        assert s.outputs[0].startswith("hot answer")
    # Longer than the whole corpus: documents repeat, as in RULER.
    s = generate_samples("qa_2", BYTE, 32768, 1, data_dir=tmp_path)[0]
    assert s.length <= 32768 and s.metadata["haystack_size"] > 24


def test_qa_malformed_file(tmp_path):
    (tmp_path / "squad.json").write_text("[1, 2]")
    with pytest.raises(EvalDataError, match="not a squad file"):
        get_task("qa_1", data_dir=tmp_path)
    (tmp_path / "hotpotqa.json").write_text('[{"question": "q"}]')
    with pytest.raises(EvalDataError, match="not a hotpotqa file"):
        get_task("qa_2", data_dir=tmp_path)


# ----------------------------------------------------------------------------- RULER parity


def test_vt_statements_never_adjacent_as_in_ruler():
    """RULER inserts each statement before a distinct noise line (random.sample over lines):
    a noise line always separates two statements and follows the last one, at any size."""
    from hybrid_megatron.eval.tasks.variable_tracking import VariableTrackingTask

    task = VariableTrackingTask(num_chains=2, num_hops=4, add_fewshot=False)
    for seed in range(40):
        state = task.draw(random.Random(seed), 0, 0)
        for size in (10, 11, 14, 25):
            lines = task.render(state, size).input.split("\n")
            body = lines[lines.index("") + 1 : lines.index("") + 1 + size + 10]
            kinds = ["var" if line.startswith("VAR ") else "noise" for line in body]
            assert kinds.count("var") == 10 and kinds.count("noise") == size, (seed, size)
            assert kinds[-1] == "noise", (seed, size)
            assert not any(a == b == "var" for a, b in zip(kinds, kinds[1:])), (seed, size)


def test_qa_questions_are_not_cycled(tmp_path):
    """RULER's sample i is question i (QAS[index]); more samples than questions is an error."""
    squad = _squad(tmp_path / "squad.json")  # 12 answerable questions
    samples = generate_samples("qa_1", BYTE, 1000, 12, qa_path=squad)
    assert len({s.input.rsplit("Question: ", 1)[1] for s in samples}) == 12
    with pytest.raises(EvalDataError, match="12 distinct samples .* but 13"):
        generate_samples("qa_1", BYTE, 1000, 13, qa_path=squad)
    with pytest.raises(EvalDataError, match="at most 12"):
        generate_samples("qa_1", BYTE, 1000, 2, qa_path=squad, start_index=11)
