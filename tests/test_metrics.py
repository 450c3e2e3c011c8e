"""metrics.jsonl + TensorBoard writer, resume truncation, step timing and log-line formatting."""

from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from hybrid_megatron.training import progress as P
from hybrid_megatron.training.metrics import TRAIN_KEYS, MetricsWriter, memory_gb, read_metrics


def _train_steps(w: MetricsWriter, steps) -> None:
    for s in steps:
        w.log_train(s, loss=10.0 - s, lr=1e-3, tokens=s * 100, consumed_samples=s * 2)


def test_rows_are_json_lines_with_all_keys(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
        w.log_train(1, loss=torch.tensor(2.5), lr=np.float32(0.5), grad_norm=float("nan"))
        w.log_valid(1, loss=2.0, tokens=512)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    train, valid = (json.loads(line) for line in lines)  # strict JSON: no NaN literals
    assert set(TRAIN_KEYS) <= set(train) and train["split"] == "train"
    assert (
        train["loss"] == 2.5
        and train["lr"] == 0.5
        and train["grad_norm"] is None
        and train["mem_gb"] is None
    )
    assert valid == {"step": 1, "split": "valid", "loss": 2.0, "ppl": math.exp(2.0), "tokens": 512}
    assert read_metrics(tmp_path) == [train, valid]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    assert w.log_train(1, loss=1.0) is None
    assert w.truncate_after(0) == 0
    w.close()
    assert not (tmp_path / "run").exists()


def test_step_must_be_an_int(tmp_path):
    with (
        MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w,
        pytest.raises(ValueError, match="step"),
    ):
        w.log({"loss": 1.0})


def test_truncate_after_resume_leaves_no_duplicates(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
        _train_steps(w, range(1, 6))
        w.log_valid(4, 5.0)
    # resume from the checkpoint of step 3 in a new process
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
        assert w.truncate_after(3) == 3  # train 4, 5 and valid 4
        _train_steps(w, range(4, 7))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["split"] == "train" for r in rows)
    assert [p.name for p in tmp_path.iterdir() if p.name != "metrics.jsonl"] == []


def test_truncate_while_open_and_without_file(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    assert w.truncate_after(10) == 0
    _train_steps(w, range(1, 4))
    assert w.truncate_after(1) == 2
    _train_steps(w, [2])
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_line_cut_off_by_a_crash_is_skipped_and_not_glued_to(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
        _train_steps(w, [1])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 3.')  # interrupted mid-write
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
        _train_steps(w, [2])
    with pytest.warns(UserWarning, match="1 unreadable"):
        rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, enabled=True) as w:
        _train_steps(w, range(1, 6))
        w.log_valid(5, 2.0)
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.truncate_after(3)
        for s in (4, 5):
            w.log_train(s, loss=100.0 + s)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "valid/loss", "valid/ppl"} <= set(tags)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0)]


def test_missing_tensorboard_warns_once_and_keeps_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    monkeypatch.setattr(MetricsWriter, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="TensorBoard logging is off"):
        w = MetricsWriter(tmp_path / "a", enabled=True)
        _train_steps(w, [1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w2 = MetricsWriter(tmp_path / "b", enabled=True)
        _train_steps(w2, [1])
    w.close()
    w2.close()
    assert len(read_metrics(tmp_path / "a")) == 2
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_memory_gb_on_cpu_is_process_rss():
    mem = memory_gb("cpu")
    assert mem is not None and 0.01 < mem < 1000


# --------------------------------------------------------------------------- progress


def test_throughput_excludes_warmup_once_enough_steps():
    meter = P.ThroughputMeter(window=3, warmup_steps=1)
    assert meter.tokens_per_s is None and meter.seconds_per_step is None
    meter.update(tokens=1000, seconds=10.0)  # slow first step (compilation)
    assert meter.tokens_per_s == 100.0  # nothing else yet: use it
    meter.update(1000, 1.0)
    assert meter.tokens_per_s == 1000.0 and meter.seconds_per_step == 1.0
    for _ in range(3):
        meter.update(1000, 2.0)
    assert meter.tokens_per_s == 500.0  # sliding window of 3 steps dropped the 1 s step
    assert meter.seconds_per_step == 2.0


def test_step_timer_with_fake_clock():
    now = iter([0.0, 5.0, 7.5, 10.0, 12.0, 13.0])
    calls = []
    timer = P.StepTimer(clock=lambda: next(now), sync=lambda: calls.append(1))
    timer.start()  # t=5
    assert timer.stop() == 2.5
    timer.start()  # t=10
    assert timer.stop() == 2.0
    assert timer.elapsed() == 13.0 and len(calls) == 2  # sync before each stop
    with pytest.raises(RuntimeError, match="start"):
        P.StepTimer(clock=lambda: 0.0).stop()


def test_eta_and_duration_format():
    assert P.eta(120, 2000, 2.0) == 1880 * 2.0
    assert P.eta(2000, 2000, 2.0) == 0.0
    assert P.eta(1, 10, None) is None
    assert P.format_duration(3720) == "1h02m"
    assert P.format_duration(185) == "3m05s"
    assert P.format_duration(42.4) == "42s"
    assert P.format_duration(2 * 86400 + 3 * 3600 + 59) == "2d03h"


def test_format_step_line_full_and_sparse():
    line = P.format_step_line(
        step=120,
        total_steps=2000,
        loss=3.2141,
        lr=2.9e-4,
        grad_norm=0.8123,
        tokens_per_s=12_345,
        tflops_per_device=45.12,
        mfu=0.3821,
        mem_gb=12.06,
        eta_s=3720,
    )
    expected = (
        "step 120/2000 | loss 3.214 | lr 2.9e-04 | gnorm 0.81 | 12.3k tok/s | 45.1 TFLOP/s | "
        "MFU 38.2% | mem 12.1 GB | ETA 1h02m"
    )
    assert line == expected
    sparse = P.format_step_line(step=3, total_steps=10, loss=float("nan"), lr=0.0)
    assert sparse == "step 3/10 | loss nan | lr 0.0e+00"


def test_human_units():
    assert P.format_count(950) == "950"
    assert P.format_count(12_345) == "12.3k"
    assert P.format_count(2_500_000) == "2.50M"
    assert P.format_flops(0.0021) == "2.10 GFLOP/s"
    assert P.format_flops(1234.0) == "1.23 PFLOP/s"


# --------------------------------------------------------------------------- loss curves


def _run(tmp_path, name: str, steps=range(1, 11)):
    run = tmp_path / name
    with MetricsWriter(run, enabled=True, tensorboard=False) as w:
        _train_steps(w, steps)
        w.log_valid(5, 4.5)
        w.log_valid(10, 1.5, tokens=1000)
    return run


def test_plot_two_runs_writes_png(tmp_path):
    from hybrid_megatron.reports.loss_curve import plot_loss_curves

    runs = [_run(tmp_path, "a"), _run(tmp_path, "b", range(1, 6))]
    for kwargs in ({}, {"smooth": 3, "x": "tokens", "log_x": True, "log_y": False}):
        out = plot_loss_curves(runs, tmp_path / "plots" / "loss.png", **kwargs)
        assert out == tmp_path / "plots" / "loss.png"
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
        out.unlink()


def test_load_run_dedupes_steps_and_maps_valid_steps_to_tokens(tmp_path):
    from hybrid_megatron.reports.loss_curve import load_run

    run = _run(tmp_path, "r", range(1, 11))
    with MetricsWriter(run, enabled=True, tensorboard=False) as w:  # resumed, not truncated
        w.log_train(10, loss=0.5, tokens=1000)
    curves = load_run(run)
    assert list(curves.train) == list(range(1, 11)) and curves.train[10]["loss"] == 0.5
    assert curves.x_of(curves.valid, "tokens") == [500.0, 1000.0]  # step 5 interpolated
    assert curves.x_of(curves.train, "step")[:3] == [1.0, 2.0, 3.0]


def test_smooth_values_is_a_trailing_mean():
    from hybrid_megatron.reports.loss_curve import smooth_values

    assert smooth_values([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert smooth_values([3.0, 1.0], 0) == [3.0, 1.0]


def test_plot_subcommand_and_missing_metrics_error(tmp_path, capsys):
    import argparse

    from hybrid_megatron.commands.plot import add_subcommands as add_plot_subcommand
    from hybrid_megatron.reports.loss_curve import plot_loss_curves

    parser = argparse.ArgumentParser(prog="hybrid-megatron")
    add_plot_subcommand(parser.add_subparsers(dest="command", required=True))
    run, out = _run(tmp_path, "a"), tmp_path / "l.png"
    args = parser.parse_args(["plot", str(run), "--out", str(out), "--smooth", "2"])
    assert args.func(args) == 0 and out.is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    args = parser.parse_args(["plot", str(run), str(empty), "--out", str(tmp_path / "x.png")])
    assert args.func(args) == 2
    assert f"{empty} has no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_loss_curves([tmp_path / "nope"], out)
