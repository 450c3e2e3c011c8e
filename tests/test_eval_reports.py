"""Eval aggregation against hand-computed numbers, result files, plots and `eval-report`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from hybrid_megatron.eval import store
from hybrid_megatron.eval.aggregate import aggregate_rows, format_markdown
from hybrid_megatron.eval.plan import item_key
from hybrid_megatron.eval.sharding import Shard

PNG = b"\x89PNG\r\n\x1a\n"


def _row(model, task, length, index, score, depth=None, grid=False, prediction="x", it=None):
    return {
        "key": item_key(model, task, length, depth if grid else None, index),
        "model": model,
        "model_path": f"/runs/{model}",
        "iteration": it,
        "run": "run_a" if it is not None else None,
        "task": task,
        "length": length,
        "depth": depth,
        "grid": grid,
        "index": index,
        "prediction": prediction,
        "outputs": ["1234567"],
        "score": score,
        "seconds": 0.5,
    }


def _ppl_row(model, length, index, bins, it=None):
    return {
        "key": item_key(model, "ppl", length, None, index),
        "model": model,
        "iteration": it,
        "run": "run_a" if it is not None else None,
        "task": "ppl",
        "length": length,
        "index": index,
        "bins": bins,
    }


def _rows() -> list[dict]:
    m = "run_a/iter_0000100"
    rows = [
        # niah 1K: 1 and 0.5 -> 75; niah 2K: 0 (an empty prediction) and 1 -> 50
        _row(m, "niah_single_1", 1024, 0, 1.0, it=100),
        _row(m, "niah_single_1", 1024, 1, 0.5, it=100),
        _row(m, "niah_single_1", 2048, 0, 0.0, prediction="  ", it=100),
        _row(m, "niah_single_1", 2048, 1, 1.0, it=100),
        # passkey 1K: 100; 2K: 0
        _row(m, "passkey", 1024, 0, 1.0, it=100),
        _row(m, "passkey", 2048, 0, 0.0, it=100),
        # grid: (1K, 0%) two samples 1, 0 -> 50; (1K, 100%) 1 -> 100
        _row(m, "niah_single_1", 1024, 0, 1.0, depth=0.0, grid=True, it=100),
        _row(m, "niah_single_1", 1024, 1, 0.0, depth=0.0, grid=True, it=100),
        _row(m, "niah_single_1", 1024, 0, 1.0, depth=100.0, grid=True, it=100),
        _ppl_row(m, 8, 0, [[1, 2, 2.0, 1], [2, 4, 3.0, 2], [4, 8, 4.0, 4]], it=100),
        _ppl_row(m, 8, 1, [[1, 2, 4.0, 1], [2, 4, 1.0, 2], [4, 8, 4.0, 4]], it=100),
        {
            "key": f"{m}|qa_1|skipped",
            "model": m,
            "task": "qa_1",
            "length": None,
            "skipped": "task 'qa_1' needs a squad QA file",
        },
        # a later checkpoint of the same run: niah 1K 100, 2K 0
        _row("run_a/iter_0000200", "niah_single_1", 1024, 0, 1.0, it=200),
        _row("run_a/iter_0000200", "niah_single_1", 2048, 0, 0.0, it=200),
    ]
    return rows


def test_aggregation_matches_hand_computed_numbers():
    results = aggregate_rows(reversed(_rows()))  # row order does not matter
    assert list(results["models"]) == ["run_a/iter_0000100", "run_a/iter_0000200"]
    m = results["models"]["run_a/iter_0000100"]
    assert m["iteration"] == 100 and m["run"] == "run_a"
    assert m["tasks"]["niah_single_1"] == {
        "1024": {"score": 75.0, "n": 2, "nulls": "0/2"},
        "2048": {"score": 50.0, "n": 2, "nulls": "1/2"},
    }
    assert m["tasks"]["passkey"]["1024"]["score"] == 100.0
    assert m["average_by_length"] == {"1024": 87.5, "2048": 25.0}
    assert m["average_by_task"] == {"niah_single_1": 62.5, "passkey": 50.0}
    assert m["average"] == 56.25
    assert m["grid"]["niah_single_1"]["1024"] == {
        "0": {"score": 50.0, "n": 2},
        "100": {"score": 100.0, "n": 1},
    }
    assert m["grid_by_length"]["niah_single_1"] == {"1024": 66.67}
    ppl = m["ppl"]["8"]
    assert ppl["n"] == 2 and ppl["tokens"] == 14
    assert ppl["loss"] == pytest.approx(18.0 / 14, abs=1e-6)
    assert [(b["lo"], b["hi"], b["loss"], b["tokens"]) for b in ppl["bins"]] == [
        (1, 2, 3.0, 2),
        (2, 4, 1.0, 4),
        (4, 8, 1.0, 8),
    ]
    assert m["skipped"] == {"qa_1": "task 'qa_1' needs a squad QA file"}
    later = results["models"]["run_a/iter_0000200"]
    assert later["average"] == 50.0 and later["skipped"] == {}
    assert results["num_samples"] == len(_rows()) - 1

    md = format_markdown(results)
    assert "## run_a/iter_0000100 (iteration 100)" in md
    assert "| task | 1024 | 2048 | avg |" in md
    assert "| niah_single_1 | 75.00 | 50.00 | 62.50 |" in md
    assert "| **average** | 87.50 | 25.00 | 56.25 |" in md
    assert "| 1024 | 50.00 | 100.00 |" in md  # grid row
    assert "| 8 | 1.2857 |" in md
    assert "- skipped qa_1: task 'qa_1' needs a squad QA file" in md


def test_a_task_skipped_earlier_but_evaluated_later_is_not_reported_skipped():
    rows = _rows()[:2] + [
        {"key": "run_a/iter_0000100|niah_single_1|skipped", "model": "run_a/iter_0000100"}
        | {"task": "niah_single_1", "length": None, "skipped": "no data"},
        {"key": "k", "model": "run_a/iter_0000100", "task": "passkey", "length": 4096}
        | {"skipped": "too short"},
    ]
    m = aggregate_rows(rows)["models"]["run_a/iter_0000100"]
    assert m["skipped"] == {"passkey@4096": "too short"}


def _write_rows(out: Path, shard: Shard, rows: list[dict]) -> None:
    with store.RowWriter(store.sample_file(out, shard)) as writer:
        for row in rows:
            writer.write(row)


def test_rows_merge_across_world_sizes_and_survive_cut_off_lines(tmp_path):
    rows = _rows()
    _write_rows(tmp_path, Shard(0, 1), rows[:5])
    _write_rows(tmp_path, Shard(1, 2), rows[3:])  # overlapping keys: first row wins
    path = store.sample_file(tmp_path, Shard(1, 2))
    with open(path, "a") as f:
        f.write('{"key": "half a ro')
    _write_rows(tmp_path, Shard(1, 2), [])  # a writer reopening starts on a fresh line
    with open(path, "a") as f:
        f.write(json.dumps(rows[0] | {"score": 0.0}) + "\n")
    with pytest.warns(UserWarning, match="1 unreadable"):
        merged = store.read_rows(tmp_path)
    assert sorted(r["key"] for r in merged) == sorted(r["key"] for r in rows)
    assert next(r for r in merged if r["key"] == rows[0]["key"])["score"] == 1.0
    assert aggregate_rows(merged) == aggregate_rows(rows)

    store.write_done(tmp_path, Shard(1, 2), "abc", 3)
    assert store.ranks_done(tmp_path, 2, "abc") == [1]
    assert store.ranks_done(tmp_path, 2, "other plan") == []


def test_plots_and_eval_report_cli(tmp_path, capsys):
    from hybrid_megatron.commands.eval import add_subcommands as add_eval_subcommands
    from hybrid_megatron.reports.eval_plots import load_results, write_plots

    rows = _rows()
    a, b = tmp_path / "a", tmp_path / "b"  # e.g. two Slurm array tasks, one per checkpoint
    _write_rows(a, Shard(0, 1), [r for r in rows if "iter_0000100" in r["model"]])
    _write_rows(b, Shard(0, 1), [r for r in rows if "iter_0000200" in r["model"]])
    parser = argparse.ArgumentParser()
    add_eval_subcommands(parser.add_subparsers(dest="command", required=True))
    report = tmp_path / "report"
    args = parser.parse_args(["eval-report", str(a), str(b), "--output", str(report)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| **average** | 87.50 | 25.00 | 56.25 |" in printed
    results = load_results(report)
    assert results == aggregate_rows(rows)
    names = sorted(p.name for p in (report / "plots").iterdir())
    assert names == [
        "heatmap_run_a_iter_0000100_niah_single_1.png",
        "loss_by_position_run_a_iter_0000100.png",
        "score_vs_length_run_a_iter_0000100.png",
        "score_vs_length_run_a_iter_0000200.png",
        "score_vs_step_run_a.png",
    ]
    assert all((report / "plots" / n).read_bytes()[:8] == PNG for n in names)

    # A second model with perplexity: the models' loss curves are compared in one figure.
    extra = _ppl_row("other", 8, 0, [[1, 2, 1.0, 1], [2, 4, 1.0, 2], [4, 8, 1.0, 4]])
    written = write_plots(aggregate_rows([*rows, extra]), tmp_path / "plots2")
    assert "loss_by_position.png" in {p.name for p in written}

    from hybrid_megatron.errors import ConfigError

    empty = tmp_path / "empty"
    empty.mkdir()
    args = parser.parse_args(["eval-report", str(empty)])
    with pytest.raises(ConfigError, match="no samples"):
        args.func(args)
