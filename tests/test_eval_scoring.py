"""Tests for the RULER scorers and aggregation helpers (`hybrid_megatron.eval.scoring`)."""

from __future__ import annotations

import random

import pytest

from hybrid_megatron.eval.scoring import (
    average_by_length,
    average_by_task,
    depth_length_table,
    match_all,
    match_part,
    metric_for_task,
    null_counts,
    overall_average,
    passkey_accuracy,
    passkey_match,
    postprocess_pred,
    score_sample,
    score_samples,
    score_task,
    string_match_all,
    string_match_part,
    task_length_table,
)
from hybrid_megatron.eval.tasks import Sample


def _ruler_all(preds, refs):
    """RULER's formula, written out as a reference."""
    score = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


def _ruler_part(preds, refs):
    score = sum(max(float(r.lower() in p.lower()) for r in ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


def test_postprocess_pred_replaces_control_characters():
    assert postprocess_pred("  1234567\n") == "1234567"
    assert postprocess_pred("abc\x00def\x1fghi") == "abc\ndef\nghi"
    assert postprocess_pred("\tkey\x07 value\r\n") == "key\n value"
    assert postprocess_pred("\x00\x01\x02") == ""
    assert postprocess_pred("caf\u00e9 \x7f") == "caf\u00e9 \x7f"  # only U+0000-U+001F, as RULER
    assert postprocess_pred("") == ""


def test_string_match_all_partial_and_case():
    refs = [["1234567", "7654321", "Apple-Tree", "x"]]
    assert string_match_all(["The values are 1234567 and apple-tree."], refs) == 50.0
    assert string_match_all(["1234567 7654321 APPLE-TREE x"], refs) == 100.0
    assert string_match_all([""], refs) == 0.0
    # Substring semantics: a reference inside a longer token still counts.
    assert string_match_all(["123456789"], [["2345"]]) == 100.0
    assert string_match_all(["a", "b", "c"], [["a"], ["x"], ["x"]]) == 33.33


def test_string_match_part_any_reference():
    refs = [["Paris", "the city of Paris"], ["1912"]]
    assert string_match_part(["It is PARIS.", "in 1913"], refs) == 50.0
    assert string_match_part(["", ""], refs) == 0.0
    assert string_match_part(["paris 1912"] * 2, refs) == 100.0


def test_metrics_match_ruler_formula_on_random_cases():
    rng = random.Random(0)
    alphabet = "abAB12 \n"
    for _ in range(200):
        n = rng.randint(1, 6)
        preds = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(n)]
        refs = [
            [
                "".join(rng.choices(alphabet[:6], k=rng.randint(1, 3)))
                for _ in range(rng.randint(1, 4))
            ]
            for _ in range(n)
        ]
        assert string_match_all(preds, refs) == _ruler_all(preds, refs)
        assert string_match_part(preds, refs) == _ruler_part(preds, refs)


def test_passkey_first_integer():
    assert passkey_match(" 41401. Remember it.", ["41401"]) == 1.0
    assert passkey_match("The pass key is 41401", 41401) == 1.0
    assert passkey_match("12 then 41401", "41401") == 0.0  # only the first integer counts
    assert passkey_match("414011", ["41401"]) == 0.0
    assert passkey_match("no digits", ["41401"]) == 0.0
    assert passkey_match("", ["41401"]) == 0.0
    assert passkey_accuracy(["41401", "x", "00041401"], [["41401"]] * 3) == 66.67


def test_metric_for_task():
    assert metric_for_task("qa_1") == metric_for_task("qa_2") == "string_match_part"
    assert metric_for_task("passkey") == "passkey"
    for t in ("niah_single_1", "niah_multiquery", "vt", "cwe", "fwe"):
        assert metric_for_task(t) == "string_match_all"


def test_score_task_postprocesses_and_picks_the_metric():
    assert score_task("qa_1", ["\x00Paris\x00"], [["paris", "london"]]) == 100.0
    assert (
        score_task(
            "niah_multivalue",
            ["1111111\x1f2222222"],
            [["1111111", "2222222", "3333333", "4444444"]],
        )
        == 50.0
    )
    assert score_task("passkey", [" 123 is it"], [["123"]]) == 100.0
    assert score_sample("A\x00B", ["a\nb"], "string_match_all") == 1.0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="no predictions"):
        string_match_all([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        string_match_part(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        match_all("a", [])
    with pytest.raises(ValueError, match="at least one reference"):
        match_part("a", [])
    with pytest.raises(ValueError, match="unknown metric"):
        score_sample("a", ["a"], "bleu")


def _sample(task: str, length: int, outputs: list[str], depth: float | None = None, i: int = 0):
    return Sample(index=i, task=task, input="x", answer_prefix="", outputs=outputs, length=length,
                  target_length=length, max_new_tokens=8, depth=depth,
                  metric=metric_for_task(task))  # fmt: skip


def test_aggregation_tables():
    samples = [
        _sample("niah_single_1", 4096, ["1111111"], depth=0.0),
        _sample("niah_single_1", 4096, ["2222222"], depth=50.0),
        _sample("niah_single_1", 8192, ["3333333"], depth=0.0),
        _sample("qa_1", 4096, ["paris", "lyon"]),
        _sample("qa_1", 8192, ["rome"]).to_dict(),  # dicts work too (e.g. read from JSONL)
        _sample("vt", 4096, ["AAAAA", "BBBBB"]),
    ]
    preds = ["1111111", "", "3333333", "Lyon", "milan", "aaaaa and more"]
    scores = score_samples(samples, preds)
    assert [s.score for s in scores] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.5]
    table = task_length_table(scores)
    assert table == {
        "niah_single_1": {4096: 50.0, 8192: 100.0},
        "qa_1": {4096: 100.0, 8192: 0.0},
        "vt": {4096: 50.0},
    }
    assert average_by_length(table) == {4096: 66.67, 8192: 50.0}
    assert average_by_task(table) == {"niah_single_1": 75.0, "qa_1": 50.0, "vt": 50.0}
    assert overall_average(table) == 58.34
    assert depth_length_table(scores) == {4096: {0.0: 100.0, 50.0: 0.0}, 8192: {0.0: 100.0}}
    assert null_counts(scores)[("niah_single_1", 4096)] == "1/2"
    with pytest.raises(ValueError, match="2 samples but 1"):
        score_samples(samples[:2], preds[:1])


def test_results_count_nulls_and_average_as_ruler_does():
    """results.json from rows: a prediction of control characters only is null after RULER's
    postprocess_pred; averages are RULER's sum / count (fmean rounds 48.125 the other way)."""
    from hybrid_megatron.eval.aggregate import aggregate_rows

    refs = [["a", "b", "c", "d"], ["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e"],
            ["a", "b"], ["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e"],
            ["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e"]]  # fmt: skip
    preds = ["a b c", "a b", "a b", "a", "a", "a", "a b c", "a b c d"]
    preds[5] = "a\x01"  # found, and not empty
    scores = [match_all(postprocess_pred(p), r) for p, r in zip(preds, refs)]
    assert scores == [0.75, 0.4, 0.4, 0.5, 0.2, 0.2, 0.6, 0.8]
    rows = [
        {"key": f"m/vt/4096/{i}", "model": "m", "task": "vt", "length": 4096, "index": i,
         "depth": None, "score": s,
         "prediction": p, "outputs": r, "metric": "string_match_all"}
        for i, (s, p, r) in enumerate(zip(scores, preds, refs))
    ]  # fmt: skip
    rows.append(dict(rows[0], key="m/vt/4096/8", index=8, prediction="\x01\x02 \x1f", score=0.0))
    rows.append(dict(rows[0], key="m/vt/4096/9", index=9, prediction="  ", score=0.0))
    ruler = _ruler_all(
        [postprocess_pred(r["prediction"]) for r in rows], [r["outputs"] for r in rows]
    )
    (model,) = aggregate_rows(rows)["models"].values()
    cell = model["tasks"]["vt"]["4096"]
    assert cell["score"] == ruler == 38.5
    assert cell["nulls"] == "2/10"  # "\x01\x02 \x1f" is empty after postprocess_pred
    eight = rows[:8]
    (model,) = aggregate_rows(eight)["models"].values()
    assert model["tasks"]["vt"]["4096"]["score"] == _ruler_all(preds, refs) == 48.13
