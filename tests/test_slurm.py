"""`hybrid-megatron launch`: rendered Slurm scripts (dry runs, fake srun/scontrol/sbatch),
validation before submission, and (marked `slurm`) jobs on a real two-node cluster.

The cluster tests need `slurm/local_cluster.sh start` (root, Debian). They skip with a reason
when no cluster answers, except when HM_REQUIRE_SLURM=1 (set by .ci/run): then they fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_megatron.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_base.yaml")


@pytest.fixture(autouse=True)
def _no_user_profile(monkeypatch, tmp_path_factory):
    """Tests never read the machine's own Slurm profile."""
    monkeypatch.delenv("HYBRID_MEGATRON_SLURM_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


def _launch(*args: str) -> tuple[int, str, str]:
    """Run `hybrid-megatron launch ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["launch", *args])
    return code, out.getvalue(), err.getvalue()


def _scripts(*args: str) -> list[str]:
    """The job scripts a --dry-run prints (one per job of a chain)."""
    code, out, err = _launch(*args, "--dry-run")
    assert code == 0, err
    return [s for s in re.split(r"^# ===== job \d+/\d+: .*\n", out, flags=re.M) if s.strip()]


def _sbatch_lines(script: str) -> list[str]:
    return [ln.split(" ", 1)[1] for ln in script.splitlines() if ln.startswith("#SBATCH ")]


def _fake_bin(tmp_path: Path) -> Path:
    """Fake Slurm commands that log their calls to $FAKE_LOG.

    scontrol: node names gpu01.. / nodes of any list; NodeAddr 10.1.0.N (names do not resolve).
    srun: the training step; records its args, stops when $HM_STOP_FILE appears (writing the
    status file as rank 0 of `hybrid-megatron train` does), exits $FAKE_SRUN_RC.
    sbatch: prints ids 101, 102, ...; fails on call number $FAKE_SBATCH_FAIL.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "scontrol": r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu01\ngpu02\ngpu03\ngpu04\n'; fi
if [[ "$1 $2" == "show node" ]]; then
    n=${4#gpu}; echo "NodeName=$4 Arch=x86_64 NodeAddr=10.1.0.$((10#$n)) NodeHostName=$4 State=IDLE"
fi
exit 0
""",
        "srun": r"""#!/bin/bash
printf '%s\n' "$@" > "$FAKE_LOG/srun.args"
[[ -e $HM_STOP_FILE ]] && echo stale > "$FAKE_LOG/stale-stop-file"
trap 'echo TERM >> "$FAKE_LOG/srun.signals"; exit 0' TERM
touch "$FAKE_LOG/srun.started"
for _ in $(seq "${FAKE_SRUN_TICKS:-300}"); do
    if [[ -e $HM_STOP_FILE ]]; then
        cp "$HM_STOP_FILE" "$FAKE_LOG/stop-request"
        break
    fi
    sleep 0.1
done
printf '{"finished": %s, "iteration": 7}\n' "${FAKE_FINISHED:-false}" > "$HM_TRAIN_STATUS"
exit "${FAKE_SRUN_RC:-0}"
""",
        "sbatch": r"""#!/bin/bash
n=$(( $(cat "$FAKE_LOG/sbatch.count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_LOG/sbatch.count"
echo "$*" >> "$FAKE_LOG/sbatch.log"
if [[ $n == "${FAKE_SBATCH_FAIL:-0}" ]]; then
    echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1
fi
echo "$((100 + n))"
""",
        "scancel": '#!/bin/bash\necho "$*" >> "$FAKE_LOG/scancel.log"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "log").mkdir(exist_ok=True)
    return bin_dir


def _job_env(tmp_path: Path, **extra: str) -> dict:
    """A batch job's environment: 4 nodes gpu[01-04], fake Slurm commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HM_"))}
    env.update(
        PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "log"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="hm-tiny_base",
        SLURM_JOB_NODELIST="gpu[01-04]",
        SLURM_JOB_NUM_NODES="4",
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def _dry_run(script: str, tmp_path: Path, **env: str) -> tuple[dict[str, str], list[str]]:
    """(exports, command) a rendered script prints with HM_DRY_RUN=1."""
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(
        ["bash", str(path)],
        env=_job_env(tmp_path, HM_DRY_RUN="1", **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("[")]
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    command = [ln for ln in lines if not ln.startswith("export ")]
    assert len(command) == 1, proc.stdout
    return exports, shlex.split(command[0])


# 4 nodes x 8 GPUs: batch sizes that fit 32 ranks at TP=2 (16-way data parallelism).
BIG = ["--set", "train.global_batch_size=256", "--set", "parallel.tensor=2"]
CLUSTER = [
    "--partition", "gpu", "--account", "lab", "--qos", "high", "--reservation", "res1",
    "--time", "2-00:00:00", "--exclusive", "--cpus-per-task", "8",
    "--container-image", "/images/hm.sqsh", "--container-mounts", "/lustre:/lustre,/home:/home",
    "--env", "NCCL_IB_HCA=mlx5", "--env", "TORCH_NCCL_TRACE_BUFFER_SIZE=",
    "--setup", "export HM_SETUP_RAN=yes",
]  # fmt: skip


def _big_script(tmp_path: Path, *extra: str) -> str:
    (script,) = _scripts(
        "slurm", TINY, "--nodes", "4", "--gpus-per-node", "8", "--run-dir",
        str(tmp_path / "run"), *BIG, *CLUSTER, *extra,
    )  # fmt: skip
    return script


# --------------------------------------------------------------------------- dry runs


def test_dry_run_4_nodes_x_8_gpus_srun(tmp_path: Path) -> None:
    """The rendered script: resources, rendezvous on the first node's NodeAddr, one task per
    GPU (ranks 0..31, local ranks 0..7 on each node), NCCL defaults and user overrides."""
    from hybrid_megatron.procenv import launch_ranks

    script = _big_script(tmp_path)
    run, logs = tmp_path / "run", tmp_path / "run" / "logs"
    assert _sbatch_lines(script) == [
        "--job-name=hm-tiny_base", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=8",
        "--gpus-per-node=8", "--time=2-00:00:00", "--partition=gpu", "--account=lab",
        "--qos=high", "--reservation=res1", "--exclusive", "--signal=B:USR1@180", "--requeue",
        "--open-mode=append", f"--output={logs}/%x-%j.out",
    ]  # fmt: skip
    assert not run.exists(), "a dry run writes nothing"
    exports, cmd = _dry_run(script, tmp_path)
    assert exports["MASTER_ADDR"] == "10.1.0.1"  # scontrol's NodeAddr of gpu01, not its name
    assert exports["MASTER_PORT"] == str(20000 + 4242 % 12000)
    assert exports["OMP_NUM_THREADS"] == "8"
    assert exports["NCCL_IB_HCA"] == "mlx5"
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # TP=2
    assert exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert exports["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert exports["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{logs}/nccl_trace_4242_rank_"
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in exports  # dropped by --env KEY=
    assert exports["HM_STOP_FILE"] == f"{run}/slurm/stop-request"
    assert "show node -o gpu01" in (tmp_path / "log" / "scontrol.log").read_text()
    assert cmd == [
        "srun", "--nodes=4", "--ntasks-per-node=8", "--ntasks=32", "--kill-on-bad-exit=1",
        "--cpus-per-task=8", "--container-image=/images/hm.sqsh",
        "--container-mounts=/lustre:/lustre,/home:/home",
        "python", "-m", "hybrid_megatron.cli", "train", TINY, "--run-dir", str(run),
        *BIG,
    ]  # fmt: skip
    # srun starts 8 tasks per node in blocks; each reads its rank from the task variables.
    ranks = [
        launch_ranks(
            {"SLURM_STEP_ID": "0", "SLURM_PROCID": str(p), "SLURM_NTASKS": "32",
             "SLURM_LOCALID": str(p % 8), "SLURM_NODEID": str(p // 8)}
        )
        for p in range(32)
    ]  # fmt: skip
    assert ranks == [(p, 32, p % 8) for p in range(32)]
    # outside an srun step (the batch shell) Slurm's variables do not make a rank
    assert launch_ranks({"SLURM_PROCID": "3", "SLURM_NTASKS": "32"}) == (0, 1, 0)


def test_dry_run_4_nodes_x_8_gpus_torchrun(tmp_path: Path) -> None:
    script = _big_script(tmp_path, "--mode", "torchrun")
    lines = _sbatch_lines(script)
    assert lines[1:5] == [
        "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--gpus-per-node=8"
    ]  # fmt: skip
    exports, cmd = _dry_run(script, tmp_path)
    i = cmd.index("torch.distributed.run")
    assert cmd[:i] == [
        "srun", "--nodes=4", "--ntasks-per-node=1", "--ntasks=4", "--kill-on-bad-exit=1",
        "--cpus-per-task=64", "--container-image=/images/hm.sqsh",
        "--container-mounts=/lustre:/lustre,/home:/home", "python", "-m",
    ]  # fmt: skip
    assert cmd[i + 1 : i + 10] == [
        "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--max-restarts=0",
        f"--rdzv-endpoint=10.1.0.1:{20000 + 4242 % 12000}", "--rdzv-id=4242",
        "-m", "hybrid_megatron.cli", "train",
    ]  # fmt: skip
    assert exports["OMP_NUM_THREADS"] == "8"


def test_dry_run_cpu_cluster_has_no_gpu_requests(tmp_path: Path) -> None:
    """--gpus-per-node 0: no GPU request (a CPU cluster refuses one), no NCCL settings."""
    (script,) = _scripts(
        "slurm", TINY, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2",
        "--run-dir", str(tmp_path / "run"), "--set", "train.global_batch_size=16",
        "--set", "train.micro_batch_size=4",
    )  # fmt: skip
    assert not any("gpu" in line for line in _sbatch_lines(script))
    exports, cmd = _dry_run(script, tmp_path)
    assert not any(k.startswith(("TORCH_NCCL", "CUDA_")) for k in exports)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=2", "--ntasks=4"]
    assert cmd[cmd.index("-m") - 1] == sys.executable  # this Python, no container


def test_profile_supplies_defaults_and_command_line_wins(tmp_path: Path) -> None:
    profile = tmp_path / "slurm.yaml"
    profile.write_text(
        "partition: cpu\naccount: lab\ngpus_per_node: 0\ncpus_per_task: 2\n"
        "env: {FOO: from-profile, BAR: kept}\nsetup: ['echo profile-setup']\n"
        "sbatch_args: ['--mem=8G']\n"
    )
    args = ["slurm", TINY, "--run-dir", str(tmp_path / "run"), "--profile", str(profile)]
    (script,) = _scripts(*args, "--partition", "debug", "--env", "FOO=cli")
    lines = _sbatch_lines(script)
    assert "--partition=debug" in lines and "--account=lab" in lines
    assert "--cpus-per-task=2" in lines and lines[-1] == "--mem=8G"
    assert 'export FOO="cli"' in script and 'export BAR="kept"' in script
    assert "\necho profile-setup\n" in script
    # the default location, $XDG_CONFIG_HOME/hybrid-megatron/slurm.yaml
    default = Path(os.environ["XDG_CONFIG_HOME"]) / "hybrid-megatron" / "slurm.yaml"
    default.parent.mkdir(parents=True)
    default.write_text("gpus_per_node: 0\nqos: low\n")
    (script,) = _scripts("slurm", TINY, "--run-dir", str(tmp_path / "run"))
    assert "--qos=low" in _sbatch_lines(script)


def test_launch_local_command(tmp_path: Path) -> None:
    code, out, err = _launch(
        "local", TINY, "--nproc", "2", "--run-dir", str(tmp_path), "--set", "train.steps=30",
        "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    assert shlex.split(out.strip()) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "hybrid_megatron.cli", "train", TINY, "--run-dir", str(tmp_path),
        "--set", "train.steps=30",
    ]  # fmt: skip


# --------------------------------------------------------------------------- validation


def _with_fake_slurm(tmp_path: Path, monkeypatch, **extra: str) -> Path:
    env = _job_env(tmp_path, **extra)
    for key in ("PATH", "FAKE_LOG", *extra):
        monkeypatch.setenv(key, env[key])
    return tmp_path / "log"


GOOD = ["--gpus-per-node", "0"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "3", *GOOD, "--set", "parallel.tensor=2"],
         "3 node(s) x 1 rank(s) per node = 3 ranks: world size 3 is not divisible by "
         "tensor*pipeline*context = 2"),
        (["--nodes", "4", "--gpus-per-node", "2"],
         "8 ranks: train.global_batch_size=16 is not divisible by micro_batch_size*data_parallel"),
        (["--gpus-per-node", "8", "--tasks-per-node", "4"],
         "--tasks-per-node 4 differs from --gpus-per-node 8"),
        ([], "Pass --gpus-per-node G (0 for a CPU cluster)"),
        ([*GOOD, "--time", "3"], "--time 3 (180 s) leaves no room for the checkpoint warning"),
        ([*GOOD, "--time", "1:2:3:4"], "is not a Slurm time limit"),
        ([*GOOD, "--then", "convert,plot"], "unknown stage(s) ['plot']"),
        ([*GOOD, "--then", "eval"], "The eval stage needs tasks and lengths"),
        ([*GOOD, "--then", "eval", "--eval-tasks", "passkey,nope", "--eval-lengths", "4k"],
         "Unknown eval task(s) ['nope']"),
        ([*GOOD, "--set", "checkpoint.save_on_signal=false"],
         "checkpoint.save_on_signal is false"),
        ([*GOOD, "--set", "model.pattern=M-X"], "Unknown symbol 'X'"),
        ([*GOOD, "--env", "1BAD=x"], "'1BAD' is not a valid environment variable name"),
        ([*GOOD, "--container-mounts", "/a:/a"], "--container-mounts needs --container-image"),
        ([*GOOD, "--profile", "/nonexistent/slurm.yaml"], "does not exist"),
    ],
)  # fmt: skip
def test_invalid_requests_fail_before_submission(tmp_path, monkeypatch, args, message) -> None:
    log = _with_fake_slurm(tmp_path, monkeypatch)
    code, out, err = _launch("slurm", TINY, "--run-dir", str(tmp_path / "run"), *args)
    assert code == 2 and message in err, err
    assert not (log / "sbatch.log").exists(), "nothing may be submitted"


def test_unwritable_run_dir_and_existing_hf_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _launch("slurm", TINY, *GOOD, "--run-dir", str(blocker / "run"))
    assert code == 2 and f"{blocker} is a file" in err
    (tmp_path / "run" / "hf").mkdir(parents=True)
    code, _, err = _launch("slurm", TINY, *GOOD, "--run-dir", str(tmp_path / "run"),
                           "--then", "convert")  # fmt: skip
    assert code == 2 and "--then convert would write" in err and "--hf-dir" in err


def test_unknown_profile_key(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("partiton: gpu\n")
    code, _, err = _launch("slurm", TINY, *GOOD, "--profile", str(profile), "--dry-run")
    assert code == 2 and "unknown key(s) ['partiton']" in err


@pytest.mark.parametrize(
    "text, seconds",
    [("30", 1800), ("5:30", 330), ("2:00:00", 7200), ("1-12", 129600), ("1-0:30", 88200),
     ("2-00:00:10", 172810), ("UNLIMITED", None)],
)  # fmt: skip
def test_parse_time(text: str, seconds: int | None) -> None:
    from hybrid_megatron.launch.options import parse_time

    assert parse_time(text) == seconds


# --------------------------------------------------------------------------- submission


def test_chain_submission_uses_afterok_and_kill_on_invalid_dep(tmp_path, monkeypatch) -> None:
    log = _with_fake_slurm(tmp_path, monkeypatch)
    run = tmp_path / "run"
    code, out, err = _launch(
        "slurm", TINY, *GOOD, "--run-dir", str(run), "--then", "convert,eval",
        "--eval-tasks", "passkey", "--eval-lengths", "4k,8k", "--eval-arg=--batch-size 2",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    records = json.loads(out)
    assert [(r["stage"], r["job_id"], r["after"]) for r in records] == [
        ("train", "101", None), ("convert", "102", "101"), ("eval", "103", "102")
    ]  # fmt: skip
    assert records[0]["log"] == f"{run}/logs/hm-tiny_base-101.out"
    calls = (log / "sbatch.log").read_text().splitlines()
    assert calls[0].startswith("--parsable ") and "--dependency" not in calls[0]
    assert calls[1].startswith("--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes")
    assert calls[2].startswith("--parsable --dependency=afterok:102 --kill-on-invalid-dep=yes")
    scripts = [Path(r["script"]).read_text() for r in records]
    assert f"convert to-hf {run}/checkpoints {run}/hf" in scripts[1]
    assert f"eval --model {run}/hf --tasks passkey --lengths 4096,8192" in scripts[2]
    assert f"--output {run}/eval --batch-size 2\n" in scripts[2]
    assert len((run / "logs" / "submissions.jsonl").read_text().splitlines()) == 3


def test_failed_submission_cancels_the_submitted_part(tmp_path, monkeypatch) -> None:
    log = _with_fake_slurm(tmp_path, monkeypatch, FAKE_SBATCH_FAIL="2")
    code, _, err = _launch(
        "slurm", TINY, *GOOD, "--run-dir", str(tmp_path / "run"), "--then", "convert"
    )
    assert code == 2 and "sbatch refused the convert job" in err and "Invalid account" in err
    assert (log / "scancel.log").read_text() == "101\n"


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = _launch("slurm", TINY, *GOOD, "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "sbatch is not on PATH" in err and "--dry-run" in err


# --------------------------------------------------------------------------- requeue logic


def _cpu_script(tmp_path: Path, *extra: str) -> Path:
    (script,) = _scripts(
        "slurm", TINY, *GOOD, "--tasks-per-node", "2", "--run-dir", str(tmp_path / "run"),
        *extra,
    )  # fmt: skip
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    return path


def _start(tmp_path: Path, script: Path, **env: str) -> subprocess.Popen:
    """Run the job script with fake srun/scontrol; return once the fake step runs."""
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=_job_env(tmp_path, SLURM_JOB_ID="1234", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "log" / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    return proc


def _requeues(tmp_path: Path) -> list[str]:
    calls = (tmp_path / "log" / "scontrol.log").read_text().splitlines()
    return [c for c in calls if c.startswith("requeue")]


@pytest.mark.parametrize(
    "env, rc, requeued, message",
    [
        ({}, 0, True, "requeueing job 1234"),
        ({"FAKE_FINISHED": "true"}, 0, False, "the run is finished: not requeueing"),
        ({"FAKE_SRUN_RC": "3"}, 3, False, "the step failed (exit 3): not requeueing"),
        ({"SLURM_RESTART_COUNT": "2"}, 1, False, "2 restarts reached the cap (2)"),
    ],
)
def test_usr1_asks_ranks_to_stop_then_requeues_only_an_unfinished_run(
    tmp_path, env, rc, requeued, message
) -> None:
    """USR1 (the time-limit warning, B: = batch shell) -> stop file for the ranks -> the step
    exits -> requeue only if it exited 0, the run is unfinished and restarts remain."""
    script = _cpu_script(tmp_path, "--max-restarts", "2")
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "stop-request").write_text("left by an earlier attempt")
    proc = _start(tmp_path, script, **env)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == rc, out
    assert message in out
    assert _requeues(tmp_path) == (["requeue 1234"] if requeued else [])
    log = tmp_path / "log"
    assert (log / "stop-request").read_text() == "SIGUSR1 before the time limit\n"
    assert not (log / "stale-stop-file").exists(), "an earlier attempt's request is removed"


def test_term_is_forwarded_and_never_requeued(tmp_path: Path) -> None:
    proc = _start(tmp_path, _cpu_script(tmp_path))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "not requeueing" in out
    assert (tmp_path / "log" / "srun.signals").read_text() == "TERM\n"
    assert _requeues(tmp_path) == []


def test_finished_step_without_signal_and_no_requeue_option(tmp_path: Path) -> None:
    script = _cpu_script(tmp_path, "--no-requeue")
    assert "--no-requeue" in _sbatch_lines(script.read_text())
    assert not any(s.startswith("--signal") for s in _sbatch_lines(script.read_text()))
    proc = _start(tmp_path, script, FAKE_SRUN_TICKS="1")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "training step exited with 0" in out
    assert _requeues(tmp_path) == []


def test_stop_file_stops_training_at_a_step_boundary(tmp_path, monkeypatch) -> None:
    """What the job script relies on: rank 0 sees $HM_STOP_FILE and every rank agrees."""
    import torch

    from hybrid_megatron.training.signals import StopRequest

    stop_file = tmp_path / "stop-request"
    monkeypatch.setenv("HM_STOP_FILE", str(stop_file))
    stop = StopRequest()
    try:
        assert not stop.agreed(torch.device("cpu"))
        stop_file.write_text("SIGUSR1 before the time limit\n")
        assert stop.agreed(torch.device("cpu"))
        assert stop.name == "stop file: SIGUSR1 before the time limit"
    finally:
        stop.restore()
    assert not StopRequest(enabled=False).agreed(torch.device("cpu"))


# --------------------------------------------------------------------------- eval sweep


def _models(tmp_path: Path) -> list[str]:
    paths = []
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        paths.append(str(tmp_path / name))
    return paths


def test_sweep_array_maps_tasks_to_model_and_length(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep, report = _scripts(
        "sweep", "--model", ",".join(_models(tmp_path)), "--tasks", "passkey",
        "--lengths", "4k,8k", "--num-samples", "3", "--output", str(out), *GOOD,
        "--array-parallel", "2",
    )  # fmt: skip
    assert "--array=0-3%2" in _sbatch_lines(sweep)
    seen = []
    for i in range(4):
        exports, cmd = _dry_run(sweep, tmp_path, SLURM_ARRAY_TASK_ID=str(i))
        tail = cmd[cmd.index("eval") + 1 :]
        args = dict(zip(tail[::2], tail[1::2]))
        seen.append((Path(args["--model"]).name, args["--lengths"], args["--output"]))
        assert args["--tasks"] == "passkey" and args["--num-samples"] == "3"
        assert exports["HYBRID_MEGATRON_EVAL_CACHE"] == f"{out}/converted"
    assert seen == [
        ("m1", "4096", f"{out}/parts/m1__len4096"), ("m1", "8192", f"{out}/parts/m1__len8192"),
        ("m2", "4096", f"{out}/parts/m2__len4096"), ("m2", "8192", f"{out}/parts/m2__len8192"),
    ]  # fmt: skip
    path = tmp_path / "job.sbatch"
    proc = subprocess.run(
        ["bash", str(path)], env=_job_env(tmp_path, SLURM_ARRAY_TASK_ID="4"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1 and "array index 4 is out of range" in proc.stderr
    _, cmd = _dry_run(report, tmp_path)
    assert cmd[cmd.index("eval-report") :] == [
        "eval-report", *(s[2] for s in seen), "--output", str(out)
    ]  # fmt: skip


def test_sweep_tasks_wait_for_a_conversion_in_progress(tmp_path, monkeypatch) -> None:
    """Array tasks of one checkpoint share HYBRID_MEGATRON_EVAL_CACHE: while one converts,
    the others wait for its lock and reuse the result (no second conversion process)."""
    import socket
    import threading

    from hybrid_megatron.eval import models

    source = models.ModelSource("run/iter_0000010", tmp_path / "iter", "megatron", 10, "run")
    target = models.converted_path(source, tmp_path / "cache", "fp32")
    lock = models._lock_path(target)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))  # a live holder

    def other_job_finishes() -> None:
        time.sleep(1.0)
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"megatron": {"iteration": 10}}))
        lock.unlink()

    def no_subprocess(jobs):
        raise AssertionError(f"started a conversion process for {jobs}")

    monkeypatch.setattr(models, "_run_conversions", no_subprocess)
    models.prepare_conversions([source], tmp_path / "cache")  # leaves it to the holder
    threading.Thread(target=other_job_finishes).start()
    assert models.ensure_converted(source, tmp_path / "cache") == (target, False)


def test_rendered_scripts_are_valid_bash(tmp_path: Path) -> None:
    scripts = _scripts(
        "slurm",
        TINY,
        *GOOD,
        "--run-dir",
        str(tmp_path / "r"),
        "--then",
        "convert,eval",
        "--eval-tasks",
        "passkey",
        "--eval-lengths",
        "4k",
    )
    scripts += [_big_script(tmp_path, "--mode", "torchrun")]
    scripts += _scripts(
        "sweep",
        "--model",
        ",".join(_models(tmp_path)),
        "--tasks",
        "vt",
        "--lengths",
        "4k",
        "--output",
        str(tmp_path / "o"),
        *GOOD,
    )
    for i, text in enumerate(scripts):
        path = tmp_path / f"s{i}.sbatch"
        path.write_text(text)
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        ["bash", "-n", str(REPO / "slurm" / "local_cluster.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- real cluster
#
# One module fixture submits every job at once (they run side by side on the two nodes), runs
# the single-node reference with `launch local` meanwhile, then submits the eval sweep over
# the reference's checkpoints; each test waits for its own jobs.

STEPS = 20
E2E_SETS = [
    f"train.steps={STEPS}",
    "model.seq_length=64",
    "data.synthetic.num_docs=200",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "train.eval_batches=1",
    "train.log_interval=1",
    "optimizer.warmup_steps=2",
    "checkpoint.interval=10",
    "after_training.recall_probe=false",
]
SETS = [a for s in E2E_SETS for a in ("--set", s)]
EVAL_LENGTH = "300"  # passkey's shortest prompt is 263 tokens


def _cluster_problem() -> str | None:
    """Why the cluster tests cannot run here (None: a two-node cluster answers)."""
    missing = [c for c in ("sbatch", "sinfo", "scontrol", "scancel") if not shutil.which(c)]
    if missing:
        return f"Slurm commands {missing} are not installed"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20
        )
    except (subprocess.SubprocessError, OSError) as err:
        return f"sinfo failed: {err}"
    up = ("idle", "mixed", "allocated", "completing")
    nodes = {ln.split()[0] for ln in out.stdout.splitlines() if ln.split()[-1] in up}
    if len(nodes) < 2:
        return f"needs two nodes up; sinfo says {out.stdout.strip() or out.stderr.strip()!r}"
    return None


def _require_cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    hint = "start one with `slurm/local_cluster.sh start` (root, Debian)"
    if os.environ.get("HM_REQUIRE_SLURM") == "1":
        pytest.fail(f"HM_REQUIRE_SLURM=1 but no Slurm cluster: {problem}; {hint}")
    pytest.skip(f"no two-node Slurm cluster ({problem}); {hint}")


def _launch_json(*args: str) -> dict[str, dict]:
    code, out, err = _launch(*args, "--json")
    assert code == 0, err
    return {r["stage"]: r for r in json.loads(out)}


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _wait(job_id: str, timeout: float = 420) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(job_id)
        if job.get("JobState") in _ENDED:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {_job(job_id)}")


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _text(path: str | Path) -> str:
    return Path(path).read_text() if Path(path).exists() else f"({path} missing)"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    _require_cluster()
    base = tmp_path_factory.mktemp("slurm-e2e")
    cpu = ["--gpus-per-node", "0", "--time", "10"]
    jobs = {}
    with pytest.MonkeyPatch.context() as mp:  # sbatch exports this environment to the jobs
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("XDG_CONFIG_HOME", str(base / "xdg"))
        mp.delenv("HYBRID_MEGATRON_SLURM_PROFILE", raising=False)
        mp.delenv("HYBRID_MEGATRON_FAULT", raising=False)
        yield from _submit_all(base, cpu, jobs)


def _submit_all(base: Path, cpu: list[str], jobs: dict):
    try:
        jobs["srun"] = _launch_json(
            "slurm", TINY, *SETS, "--nodes", "2", *cpu, "--run-dir", str(base / "srun"),
            "--then", "convert,eval", "--eval-tasks", "passkey", "--eval-lengths", EVAL_LENGTH,
            "--eval-samples", "1", "--job-name", "e2e-srun",
        )  # fmt: skip
        # Time limit 4 min, warning 60 s before. Slurm checks limits every 30 s and sends
        # the warning once at most 60 + 30 s remain: 150-180 s after the start; it ends the
        # job 90 s later. The first attempt sleeps 10 s per step so that it still runs then;
        # the second has >= 150 s to finish the rest.
        jobs["requeue"] = _launch_json(
            "slurm", TINY, *SETS, "--nodes", "2", "--gpus-per-node", "0", "--time", "4",
            "--signal-seconds", "60", "--mode", "torchrun", "--run-dir", str(base / "requeue"),
            "--setup", "[[ -n ${SLURM_RESTART_COUNT:-} ]] || "
            "export HYBRID_MEGATRON_FAULT=slow_steps:10",
            "--job-name", "e2e-requeue",
        )  # fmt: skip
        # Rank 0 is killed while it saves at step 10: a real failure.
        jobs["fail"] = _launch_json(
            "slurm", TINY, *SETS, "--nodes", "1", *cpu, "--run-dir", str(base / "fail"),
            "--env", "HYBRID_MEGATRON_FAULT=kill_during_save:10", "--then", "convert,eval",
            "--eval-tasks", "passkey", "--eval-lengths", EVAL_LENGTH, "--job-name", "e2e-fail",
        )  # fmt: skip
        # The same layout on one machine, meanwhile: the reference losses and checkpoints.
        local = subprocess.run(
            [sys.executable, "-m", "hybrid_megatron.cli", "launch", "local", TINY, *SETS,
             "--nproc", "2", "--run-dir", str(base / "local")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert local.returncode == 0, local.stderr[-3000:]
        ckpts = base / "local" / "checkpoints"
        jobs["sweep"] = _launch_json(
            "sweep", "--model", f"{ckpts}/iter_0000010,{ckpts}/iter_0000020",
            "--tasks", "passkey", "--lengths", f"{EVAL_LENGTH},320", "--num-samples", "1",
            "--output", str(base / "sweep"), *cpu, "--job-name", "e2e-sweep",
        )  # fmt: skip
        yield base, jobs
    finally:
        ids = [r["job_id"] for chain in jobs.values() for r in chain.values()]
        subprocess.run(["scancel", *ids], capture_output=True)


@pytest.mark.slurm
def test_two_node_srun_job_matches_single_node_run(e2e) -> None:
    """2 nodes x 1 rank, srun task per rank, gloo across the nodes: the same per-step losses
    as `launch local --nproc 2` on one machine."""
    base, jobs = e2e
    train = jobs["srun"]["train"]
    info = _wait(train["job_id"])
    log = _text(train["log"])
    state = (info["JobState"], info["NodeList"], info["NumTasks"])
    assert state == ("COMPLETED", "n[1-2]", "2"), log
    assert "rendezvous 127.0.0.1:" in log  # n1's NodeAddr: the node names do not resolve
    assert _losses(base / "srun") == _losses(base / "local")
    assert [s for s, _ in _losses(base / "local")] == list(range(1, STEPS + 1))


@pytest.mark.slurm
def test_train_convert_eval_chain(e2e) -> None:
    base, jobs = e2e
    chain = jobs["srun"]
    assert chain["convert"]["after"] == chain["train"]["job_id"]
    assert chain["eval"]["after"] == chain["convert"]["job_id"]
    for stage in ("convert", "eval"):
        info = _wait(chain[stage]["job_id"])
        assert info["JobState"] == "COMPLETED", _text(chain[stage]["log"])
    hf = json.loads((base / "srun" / "hf" / "config.json").read_text())
    assert hf["megatron"]["iteration"] == STEPS
    results = json.loads((base / "srun" / "eval" / "results.json").read_text())["models"]
    model = results[f"srun step {STEPS}"]  # converted models are named by run and step
    assert model["iteration"] == STEPS
    assert model["tasks"]["passkey"][EVAL_LENGTH]["n"] == 1


@pytest.mark.slurm
def test_failing_job_is_not_requeued_and_cancels_its_chain(e2e) -> None:
    _, jobs = e2e
    chain = jobs["fail"]
    info = _wait(chain["train"]["job_id"])
    log = _text(chain["train"]["log"])
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log
    assert "training step exited with" in log and "requeueing" not in log
    for stage in ("convert", "eval"):  # --kill-on-invalid-dep=yes: not PENDING forever
        assert _wait(chain[stage]["job_id"], timeout=60)["JobState"] == "CANCELLED"


@pytest.mark.slurm
def test_eval_sweep_array_writes_one_combined_report(e2e) -> None:
    """2 checkpoints x 2 lengths = 4 array tasks, then one report over all of them."""
    base, jobs = e2e
    sweep, report = jobs["sweep"]["sweep"], jobs["sweep"]["report"]
    _wait(sweep["job_id"])
    info = _wait(report["job_id"])
    logs = "\n".join(_text(p) for p in sorted((base / "sweep" / "logs").glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    models = json.loads((base / "sweep" / "results.json").read_text())["models"]
    assert sorted(models) == ["local/iter_0000010", "local/iter_0000020"], models
    for result in models.values():  # both lengths of each checkpoint in one table
        assert sorted(result["tasks"]["passkey"]) == [EVAL_LENGTH, "320"]
        assert all(cell["n"] == 1 for cell in result["tasks"]["passkey"].values())
    assert (base / "sweep" / "results.md").is_file()
    parts = sorted(p.name for p in (base / "sweep" / "parts").iterdir())
    assert len(parts) == 4 and all(p.endswith(("__len300", "__len320")) for p in parts)


@pytest.mark.slurm
def test_time_limit_checkpoints_requeues_and_finishes_on_second_attempt(e2e) -> None:
    """torchrun per node, c10d rendezvous: Slurm's USR1 before the time limit -> every rank
    checkpoints and stops -> requeue -> resume; per-step losses equal the uninterrupted run."""
    base, jobs = e2e
    train = jobs["requeue"]["train"]
    info = _wait(train["job_id"], timeout=480)
    log = _text(train["log"])
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
    stopped = re.search(r"stopped at step (\d+) \(stop file: SIGUSR1 before the time limit\)", log)
    assert stopped and 1 <= int(stopped.group(1)) < STEPS, log
    assert "attempt 1 (restart 0)" in log and "attempt 2 (restart 1)" in log  # both kept
    assert f"requeueing job {train['job_id']}" in log
    assert "the run is finished" not in log
    assert _losses(base / "requeue") == _losses(base / "local")
