"""The toy study: the study files validate (every run's config, before any work), the report
states emergence steps and paired comparisons from the stages' outputs, and the quick study
runs end to end (train -> eval -> retrieval heads -> trace -> report) and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_megatron.analysis.study.config import load_study
from hybrid_megatron.analysis.study.report import write_report
from hybrid_megatron.config import load_config
from hybrid_megatron.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "configs" / "experiments" / "toy_study.yaml"
QUICK = REPO / "configs" / "experiments" / "toy_study_quick.yaml"


def test_full_study_has_the_six_hybrids_with_all_checkpoints_kept():
    study = load_study(FULL)
    assert len(study.seeds) >= 2 and len(study.runs()) == 6 * len(study.seeds)
    got = {}
    for variant, seed in study.runs():
        cfg = load_config(study.base, study.overrides(variant, seed))
        assert cfg.train.seed == seed and cfg.checkpoint.keep_last is None
        assert cfg.after_training.eval_tasks == [] and cfg.data.tokenizer == "bpe"
        kinds = set(cfg.model.pattern) - {"-"}
        got[variant.name] = (
            "".join(sorted(kinds)),
            cfg.model.swa.window if "S" in kinds else None,
            cfg.model.full_attention.rope,
        )
    assert got == {
        "swa16": ("*S", 16, True),
        "swa16_nope": ("*S", 16, False),
        "swa128": ("*S", 128, True),
        "swa128_nope": ("*S", 128, False),
        "mamba2": ("*M", None, True),
        "full": ("*", None, True),
    }


def _study_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'tiny_base.yaml'}\n{body}")
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("variants: {a: {set: [model.swa.window=0]}}\n", "variant 'a' (seed 0): "),
        ("variants: {a: {}}\ncolour: red\n", "unknown key(s) ['colour']"),
        ("variants: {a: {}}\neval: {task: [x]}\n", "unknown key(s) ['task'] in 'eval'"),
        ("variants: {}\n", "'variants' must map names"),
        ("variants: {a: {sets: []}}\n", "variant 'a' takes only 'description' and 'set'"),
    ],
)
def test_study_file_errors_name_the_problem(tmp_path, body, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_study(_study_file(tmp_path, body))


def test_unknown_variant_in_only(tmp_path):
    with pytest.raises(ConfigError, match=r"--only \['b'\]: no such variant"):
        load_study(_study_file(tmp_path, "variants: {a: {}}\n"), only=["b"])


def _fake_stage_outputs(out: Path, name: str, scores: dict, copies: dict) -> None:
    """eval results.json and trace.json as the stages write them (only what the report reads)."""
    models = {
        f"{name}/iter_{s:07d}": {"iteration": s, "tasks": {"passkey": {"256": {"score": v}}}}
        for s, v in scores.items()
    }
    (out / "eval" / name).mkdir(parents=True)
    (out / "eval" / name / "results.json").write_text(json.dumps({"models": models}))
    checkpoints = [
        {"step": s, "heads": [{"layer": 3, "head": 1, "copy_paste": c, "attention_mass": c}]}
        for s, c in copies.items()
    ]
    final = {"retrieval_heads": [{"layer": 3, "head": 1, "copy_paste": list(copies.values())[-1]}]}
    (out / "trace" / name).mkdir(parents=True)
    (out / "trace" / name / "trace.json").write_text(
        json.dumps({"checkpoints": checkpoints, "final": final, "heads": []})
    )


def _window_study(tmp_path: Path, seeds: list[int]):
    """Two SWA variants, windows 8 ('small') and 64 ('large'), emergence at score 50."""
    body = (
        f"seeds: {seeds}\n"
        "variants:\n"
        "  small: {set: [model.pattern=S-*-, model.swa.window=8]}\n"
        "  large: {set: [model.pattern=S-*-, model.swa.window=64]}\n"
        "eval: {emergence_score: 50}\n"
    )
    return load_study(_study_file(tmp_path, body))


def test_report_states_emergence_and_compares_windows(tmp_path):
    study = _window_study(tmp_path, seeds=[0])
    out = tmp_path / "out"
    # small: passkey 60 at step 200 (then dips), heads at 200; large: passkey and heads at 400
    _fake_stage_outputs(
        out, "small_s0", {100: 0.0, 200: 60.0, 300: 40.0}, {100: None, 200: 0.3, 300: 0.5}
    )  # noqa: E501
    _fake_stage_outputs(
        out, "large_s0", {100: 0.0, 200: 10.0, 300: 10.0}, {100: 0.0, 200: 0.05, 300: 0.2}
    )  # noqa: E501
    data = write_report(study, out)
    small, large = data["runs"]
    assert small["emerge_step"] == {"passkey": 200} and not small["stays"]["passkey"]
    assert large["emerge_step"] == {"passkey": None}
    assert small["heads"]["heads_emerge_step"] == 200 and large["heads"]["heads_emerge_step"] == 300
    text = (out / "report.md").read_text()
    assert (
        "retrieval heads emerged later with window 64 (step 300) than with window 8 (step 200)"
        in text
    )  # noqa: E501
    assert "passkey emerged: small at 200; not in large" in text
    assert "200 (not kept)" in text and "One seed only" in text
    assert (out / "plots" / "retrieval_heads_vs_step.png").is_file()
    assert (out / "plots" / "score_vs_step_passkey.png").is_file()


def test_report_with_two_seeds_pairs_them_and_says_whether_they_agree(tmp_path):
    study = _window_study(tmp_path, seeds=[0, 1])
    out = tmp_path / "out"
    # heads: later with the large window in both seeds; passkey: earlier with the large
    # window in seed 0, later in seed 1
    _fake_stage_outputs(out, "small_s0", {100: 0.0, 200: 10.0}, {100: 0.3, 200: 0.5})
    _fake_stage_outputs(out, "large_s0", {100: 60.0, 200: 70.0}, {100: 0.0, 200: 0.2})
    _fake_stage_outputs(out, "small_s1", {100: 80.0, 200: 90.0}, {100: 0.05, 200: 0.4})
    _fake_stage_outputs(out, "large_s1", {100: 0.0, 200: 0.0}, {100: 0.0, 200: 0.0})
    write_report(study, out)
    text = (out / "report.md").read_text()
    across = text[text.index("## Across seeds") : text.index("## What it shows")]
    assert "| variant | passkey emerges at (s0 / s1) | retrieval heads emerge at (s0 / s1) |" in (
        across
    )
    # 300: the runs' steps; no metrics.jsonl here, so no final loss
    assert "| small | > 300 / 100 | 100 / 200 | 10.0 / 90.0 | - / - |" in across
    assert "| large | 100 / > 300 | 200 / > 300 | 70.0 / 0.0 | - / - |" in across
    assert (
        "NoPE full attention, retrieval heads with window 64 vs window 8: later (seed 0), "
        "later (seed 1); the same in every seed." in across
    )
    assert (
        "NoPE full attention, passkey with window 64 vs window 8: earlier (seed 0), "
        "later (seed 1); seeds disagree." in across
    )
    assert "One seed only" not in text


@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "quick"
    cmd = [sys.executable, "-m", "hybrid_megatron.cli", "analyze", "study", str(QUICK),
           "--out", str(out), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "study.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["swa8_s0", "swa32_s0"]
    for r in data["runs"]:
        assert [s for s, _ in r["scores"]["passkey"]] == [2, 4]
        assert [s for s, _ in r["scores"]["niah_single_1"]] == [2, 4]
        assert [x["step"] for x in r["heads"]["by_step"]] == [2, 4]
        assert r["final_valid_loss"] is not None
        assert (out / "heads" / r["name"] / "retrieval_heads.png").is_file()
        assert (out / "trace" / r["name"] / "trace.json").is_file()
    report = (out / "report.md").read_text()
    assert "| swa8_s0 | `S-*-` | 8 |" in report and "## What it shows" in report
    assert {p.name for p in (out / "plots").iterdir()} == {
        "loss.png", "score_vs_step_niah_single_1.png", "score_vs_step_passkey.png",
        "retrieval_heads_vs_step.png",
    }  # fmt: skip
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained (4 steps), skipping") == 2
    assert again.stdout.count("retrieval heads and trace up to date, skipping") == 2
    assert json.loads((out / "study.json").read_text()) == data
