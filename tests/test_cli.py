"""The command line: info output, check runs a real step, config errors exit 2 with a message."""

from __future__ import annotations

import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_info_shows_every_layer_with_window_and_rope():
    out = _cli("info", "configs/tiny.yaml", "--set", "model.swa.window=16")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 12
    swa = [r for r in rows if "sliding-window" in " ".join(r)]
    assert len(swa) == 2 and all("16" in r for r in swa)
    full = [r for r in rows if "full" in r]
    assert all("nope" in r for r in full)


def test_check_runs_forward_backward():
    out = _cli("check", "configs/tiny.yaml", "--steps", "1")
    assert out.returncode == 0, out.stderr
    assert "check ok: device=cpu" in out.stdout


def test_info_and_check_show_the_context_parallel_layout():
    out = _cli("info", "configs/tiny.yaml", "--set", "parallel.context=2")
    assert out.returncode == 0, out.stderr
    assert "4 chunks of 64 tokens; CP rank r holds chunks r and 3-r" in out.stdout
    assert "halo of 31 tokens per chunk" in out.stdout
    # A CP layout needs its processes: refused before any process group starts.
    bad = _cli("check", "configs/tiny.yaml", "--set", "parallel.context=2")
    assert bad.returncode == 2
    assert "world size 1 is not divisible by tensor*pipeline*context = 2" in bad.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "hybrid_megatron.cli", "check", "configs/tiny.yaml", "--steps", "1",
           "--set", "parallel.context=2"]  # fmt: skip
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("check ok: device=cpu world=2 tp=1 pp=1 cp=2 dp=1") == 1


def test_config_error_exits_2_with_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pattern: 'M-X-'\n")
    out = _cli("info", str(bad))
    assert out.returncode == 2
    assert "Unknown symbol 'X'" in out.stderr


def test_moe_without_transformer_engine_is_a_clear_error():
    out = _cli(
        "check",
        "configs/tiny.yaml",
        "--steps",
        "1",
        "--set",
        "model.pattern=M-S*E",
        "--set",
        "model.num_moe_experts=4",
    )
    assert out.returncode != 0
    assert "MoE layers ('E') need Transformer Engine" in out.stderr


def test_help_imports_no_heavy_library():
    """`hybrid-megatron --help` builds every subcommand's parser without torch, transformers
    or Megatron (it took 12 s when every subcommand imported them)."""
    code = (
        "import sys; from hybrid_megatron.cli import build_parser; build_parser(); "
        "heavy = ('torch', 'transformers', 'megatron', 'numpy'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.cli", "--help"], capture_output=True, text=True
    ).stdout
    for command in ("train", "plot", "preprocess", "train-tokenizer", "convert", "eval"):
        assert command in help_text


def _torchrun_train(run_dir, *sets: str) -> subprocess.CompletedProcess:
    import os

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "hybrid_megatron.cli", "train", "configs/tiny_base.yaml", "--run-dir",
            str(run_dir)]  # fmt: skip
    for item in sets:
        args += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_torchrun_job_prints_errors_once_and_the_next_steps(tmp_path):
    """Under torchrun each rank sees the same config: one message, not one per rank; a
    finished launcher-owned job prints the pipeline's remaining steps as commands, once."""
    bad = _torchrun_train(tmp_path / "bad", "optimizer.lr=-1")
    assert bad.returncode != 0
    assert (bad.stdout + bad.stderr).count("config error: optimizer.lr=-1") == 1
    small = ["train.steps=2", "optimizer.warmup_steps=0", "model.seq_length=64",
             "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
             "data.synthetic.num_docs=200", "checkpoint.interval=0",
             "after_training.convert_to_hf=true"]  # fmt: skip
    ok = _torchrun_train(tmp_path / "ok", *small)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("Next steps") == 1
    assert f"hybrid-megatron plot {tmp_path / 'ok'}" in ok.stdout
    assert f"hybrid-megatron convert to-hf {tmp_path / 'ok'}" in ok.stdout
