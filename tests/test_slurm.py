"""Slurm launch scripts: syntax, launch commands (dry run), the signal -> requeue flow with
fake Slurm commands, and (marked `slurm`) end-to-end runs on a real cluster.

The end-to-end tests need `sbatch` and a cluster with an idle node; on one machine:
`slurm/local_cluster.sh start` (root, Debian), then `python -m pytest -m slurm tests/test_slurm.py`.
"""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
TRAIN = SLURM / "train.sbatch"
EVAL = SLURM / "eval_array.sbatch"
TINY = REPO / "configs" / "tiny_base.yaml"


def _env(**extra: str) -> dict:
    """The current environment without SLURM_* / HM_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HM_"))}
    for k in ("RUN_DIR", "TASKS", "LENGTHS", "OUT_ROOT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env.update(extra)
    return env


def _fake_bin(tmp_path: Path) -> Path:
    """A bin dir with fake `scontrol` and `srun` that log what they were asked to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.log"
[[ "$1 $2" == "show hostnames" ]] && printf 'node07\\nnode08\\n'
exit 0
"""
    # Fake srun: the "training step". Logs its args, records signals, exits $FAKE_SRUN_RC.
    srun = """#!/bin/bash
echo "$*" > "$FAKE_LOG/srun.args"
trap 'echo USR1 >> "$FAKE_LOG/srun.signals"; exit "${FAKE_SRUN_RC:-0}"' USR1
trap 'echo TERM >> "$FAKE_LOG/srun.signals"; exit 0' TERM
touch "$FAKE_LOG/srun.started"
for _ in $(seq "${FAKE_SRUN_TICKS:-300}"); do sleep 0.1; done
exit "${FAKE_SRUN_RC:-0}"
"""
    for name, body in (("scontrol", scontrol), ("srun", srun)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _fake_env(tmp_path: Path, **extra: str) -> dict:
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    slurm = dict(
        SLURM_JOB_ID="1234",
        SLURM_JOB_NAME="hm-train",
        SLURM_JOB_NODELIST="node[07-08]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_CPUS_PER_TASK="8",
        SLURM_SUBMIT_DIR="/shared/work",
    )
    env = _env(PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", FAKE_LOG=str(log))
    env.update({**slurm, **extra})
    return {k: v for k, v in env.items() if v != ""}  # "" in `extra` unsets a variable


def _dry_run(script: Path, env: dict, *args: str) -> tuple[dict[str, str], list[str]]:
    """(exported variables, command) that `script` prints with HM_DRY_RUN=1."""
    proc = subprocess.run(
        ["bash", str(script), *args],
        env={**env, "HM_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "sbatch:" not in ln]
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    command = [ln for ln in lines if not ln.startswith("export ")]
    assert len(command) == 1, proc.stdout
    return exports, shlex.split(command[0])


# --------------------------------------------------------------------------- always run


@pytest.mark.parametrize("script", sorted(SLURM.glob("*.sbatch")) + [SLURM / "local_cluster.sh"])
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_train_launch_command(tmp_path: Path) -> None:
    """Two nodes x 8 GPUs: rendezvous on the first node, one task per GPU, args passed on."""
    env = _fake_env(tmp_path)
    sets = ["--set", "train.steps=3", "--set", 'data.prefixes=["a b"]']
    exports, cmd = _dry_run(TRAIN, env, "configs/x.yaml", *sets)
    assert exports == {"MASTER_ADDR": "node07", "MASTER_PORT": "21234", "OMP_NUM_THREADS": "8"}
    assert (tmp_path / "log" / "scontrol.log").read_text() == "show hostnames node[07-08]\n"
    assert cmd == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--ntasks=16",
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "hybrid_megatron.cli",
        "train",
        "configs/x.yaml",
        "--run-dir",
        "/shared/work/runs/hm-train",
        *sets,
    ]


def test_train_launch_overrides(tmp_path: Path) -> None:
    env = _fake_env(
        tmp_path,
        RUN_DIR="/lustre/runs/s1",
        HM_PYTHON="/opt/venv/bin/python",
        HM_MASTER_PORT="29999",
        HM_SRUN_ARGS="--cpu-bind=none --label",
        OMP_NUM_THREADS="2",
    )
    exports, cmd = _dry_run(TRAIN, env, "c.yaml")
    assert exports["MASTER_PORT"] == "29999" and exports["OMP_NUM_THREADS"] == "2"
    assert cmd[5:8] == ["--cpu-bind=none", "--label", "/opt/venv/bin/python"]
    assert cmd[-3:] == ["c.yaml", "--run-dir", "/lustre/runs/s1"]


@pytest.mark.parametrize(
    "env, per_node",
    [
        ({"HM_TASKS_PER_NODE": "4"}, 4),
        ({"SLURM_NTASKS_PER_NODE": "8(x2)"}, 8),
        ({"SLURM_NTASKS_PER_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"}, 4),
        ({"SLURM_NTASKS_PER_NODE": "", "SLURM_NTASKS": "6"}, 3),
    ],
)
def test_train_tasks_per_node(tmp_path: Path, env: dict, per_node: int) -> None:
    _, cmd = _dry_run(TRAIN, _fake_env(tmp_path, **env), "c.yaml")
    assert cmd[2:4] == [f"--ntasks-per-node={per_node}", f"--ntasks={2 * per_node}"]


def test_train_needs_a_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(TRAIN)], env=_fake_env(tmp_path), capture_output=True, text=True
    )
    assert proc.returncode != 0 and "usage: sbatch slurm/train.sbatch CONFIG" in proc.stderr


def _start_batch(tmp_path: Path, **extra: str) -> subprocess.Popen:
    """Run train.sbatch with fake srun/scontrol; return once the fake step is running."""
    proc = subprocess.Popen(
        ["bash", str(TRAIN), "c.yaml"],
        env=_fake_env(tmp_path, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "log" / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    return proc


def _signals_and_requeues(tmp_path: Path) -> tuple[str, list[str]]:
    log = tmp_path / "log"
    sig = (log / "srun.signals").read_text() if (log / "srun.signals").exists() else ""
    calls = (log / "scontrol.log").read_text().splitlines()
    return sig, [c for c in calls if c.startswith("requeue")]


def test_usr1_stops_the_step_then_requeues(tmp_path: Path) -> None:
    """USR1 to the batch shell (B:) -> forwarded to the step -> step exits 0 -> requeue."""
    proc = _start_batch(tmp_path)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert _signals_and_requeues(tmp_path) == ("USR1\n", ["requeue 1234"])
    assert "requeueing job 1234" in out


def test_term_is_not_requeued(tmp_path: Path) -> None:
    proc = _start_batch(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert _signals_and_requeues(tmp_path) == ("TERM\n", [])


def test_failed_step_is_not_requeued(tmp_path: Path) -> None:
    """A step that fails after the signal (e.g. the checkpoint failed) must not loop."""
    proc = _start_batch(tmp_path, FAKE_SRUN_RC="3")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert _signals_and_requeues(tmp_path) == ("USR1\n", [])


def test_requeue_stops_at_max_restarts(tmp_path: Path) -> None:
    proc = _start_batch(tmp_path, SLURM_RESTART_COUNT="2", HM_MAX_RESTARTS="2")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "HM_MAX_RESTARTS" in out
    assert _signals_and_requeues(tmp_path)[1] == []


def test_finished_step_without_signal(tmp_path: Path) -> None:
    proc = _start_batch(tmp_path, FAKE_SRUN_TICKS="1")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "exited with 0" in out
    assert _signals_and_requeues(tmp_path) == ("", [])


def _ckpt_list(tmp_path: Path) -> Path:
    lst = tmp_path / "ckpts.txt"
    lst.write_text(
        "# checkpoints to evaluate\n"
        "/runs/s1_swa128/checkpoints/iter_0001000\n"
        "\n"
        "  /runs/s1_swa128/checkpoints/iter_0002000/  \n"
        "/models/hf/s1-nope\n"
    )
    return lst


@pytest.mark.parametrize(
    "index, model, label",
    [
        (0, "/runs/s1_swa128/checkpoints/iter_0001000", "s1_swa128__iter_0001000"),
        (1, "/runs/s1_swa128/checkpoints/iter_0002000/", "s1_swa128__iter_0002000"),
        (2, "/models/hf/s1-nope", "hf__s1-nope"),
    ],
)
def test_eval_array_command(tmp_path: Path, index: int, model: str, label: str) -> None:
    env = _env(SLURM_ARRAY_TASK_ID=str(index), SLURM_SUBMIT_DIR="/shared/work")
    _, cmd = _dry_run(EVAL, env, str(_ckpt_list(tmp_path)), "--batch-size", "4")
    assert cmd == [
        "hybrid-megatron",
        "eval",
        "--model",
        model,
        "--tasks",
        "niah_single_1,passkey",
        "--lengths",
        "4096,8192",
        "--output",
        f"/shared/work/eval/{label}",
        "--batch-size",
        "4",
    ]


def test_eval_array_variables(tmp_path: Path) -> None:
    env = _env(
        SLURM_ARRAY_TASK_ID="0",
        TASKS="vt,cwe",
        LENGTHS="16384",
        OUT_ROOT="/results",
        HM_EVAL_CMD="python -m hybrid_megatron.cli eval",
    )
    _, cmd = _dry_run(EVAL, env, str(_ckpt_list(tmp_path)))
    assert cmd[:4] == ["python", "-m", "hybrid_megatron.cli", "eval"]
    assert cmd[6:] == ["--tasks", "vt,cwe", "--lengths", "16384", "--output", cmd[-1]]
    assert cmd[-1] == "/results/s1_swa128__iter_0001000"


@pytest.mark.parametrize(
    "env, message",
    [({"SLURM_ARRAY_TASK_ID": "3"}, "has no entry 3"), ({}, "submit with --array")],
)
def test_eval_array_errors(tmp_path: Path, env: dict, message: str) -> None:
    proc = subprocess.run(
        ["bash", str(EVAL), str(_ckpt_list(tmp_path))],
        env=_env(HM_DRY_RUN="1", **env),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and message in proc.stderr


# --------------------------------------------------------------------------- real cluster


def _cluster_up() -> bool:
    if not all(shutil.which(c) for c in ("sbatch", "sinfo", "scontrol", "scancel", "squeue")):
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return False
    return any(s.startswith(("idle", "mixed")) for s in out.split())


@pytest.fixture
def slurm_cluster() -> None:
    if not _cluster_up():
        pytest.skip("needs sbatch and a Slurm cluster with an idle node (slurm/local_cluster.sh)")


def _sbatch(*args: str, env: dict) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` fields of one job (empty once Slurm has forgotten it)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _wait_ended(job_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(job_id)
        if job.get("JobState") in _ENDED:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {_job(job_id)}")


def _cancel(*job_ids: str) -> None:
    for j in job_ids:
        subprocess.run(["scancel", j], capture_output=True)


def _train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("split") == "train"]


E2E_SETS = [
    "train.steps=30",
    "model.seq_length=128",
    "data.synthetic.num_docs=300",
    "checkpoint.interval=5",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "train.eval_batches=1",
    "train.log_interval=5",
    "optimizer.warmup_steps=2",
    "train.device=cpu",
]


@pytest.mark.slurm
def test_preempt_requeue_resume(slurm_cluster, tmp_path: Path) -> None:
    """2 CPU ranks (gloo) under sbatch; USR1 mid-run -> checkpoint, requeue, resume, finish.

    An `afterok` job submitted alongside must start only after the requeued job completes."""
    run_dir = tmp_path / "run"
    env = _env(RUN_DIR=str(run_dir), HM_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    args = [f"--set={s}" for s in E2E_SETS]
    job = _sbatch(
        "--job-name=hm-e2e",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=30",
        f"--output={tmp_path}/train-%j.out",
        str(TRAIN),
        str(TINY),
        *args,
        env=env,
    )
    seen = tmp_path / "rows_seen_by_dependent.txt"
    dependent = _sbatch(
        f"--dependency=afterok:{job}",
        "--kill-on-invalid-dep=yes",
        "--ntasks=1",
        "--cpus-per-task=1",
        f"--output={tmp_path}/dep-%j.out",
        f'--wrap=grep -c \'"split": "train"\' {run_dir}/metrics.jsonl > {seen}',
        env=env,
    )
    log = tmp_path / f"train-{job}.out"
    try:
        deadline = time.monotonic() + 300
        while len(_train_rows(run_dir)) < 8:  # let it checkpoint at step 5 and go on
            state = _job(job).get("JobState")
            assert state not in _ENDED, log.read_text() if log.exists() else state
            assert time.monotonic() < deadline, "training did not reach step 8 in 300 s"
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        info = _wait_ended(job, timeout=600)
        dep = _wait_ended(dependent, timeout=60)
    finally:
        _cancel(job, dependent)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), text
    stopped = re.search(r"stopped at step (\d+) \(SIGUSR1\)", text)
    assert stopped, text
    n = int(stopped.group(1))
    assert 8 <= n < 30
    assert f"requeueing job {job}" in text and f"job {job} restart 1" in text
    assert re.search(rf"resumed from \S+iter_{n:07d} \(step {n},", text), text
    # every step logged exactly once across both runs
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(1, 31))
    # the afterok job waited through the requeue for the final completion
    assert dep["JobState"] == "COMPLETED" and seen.read_text().strip() == "30"


@pytest.mark.slurm
def test_eval_array_and_invalid_dependency(slurm_cluster, tmp_path: Path) -> None:
    """One array task per listed checkpoint (fake eval command); a job depending on a failed
    job is cancelled with --kill-on-invalid-dep=yes instead of pending forever."""
    fake_eval = tmp_path / "fake_eval.sh"
    fake_eval.write_text(
        "#!/bin/bash\nwhile (($#)); do [[ $1 == --output ]] && out=$2; shift; done\n"
        'mkdir -p "$out" && echo "$SLURM_ARRAY_TASK_ID" > "$out/done"\n'
    )
    lst = tmp_path / "ckpts.txt"
    lst.write_text("# three checkpoints\n/r/a/checkpoints/iter_1\n/r/a/checkpoints/iter_2\n/r/b\n")
    env = _env(OUT_ROOT=str(tmp_path / "eval"), HM_EVAL_CMD=f"bash {fake_eval}")
    array = _sbatch(
        "--array=0-2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={tmp_path}/eval-%A_%a.out",
        str(EVAL),
        str(lst),
        env=env,
    )
    failing = _sbatch("--ntasks=1", "--cpus-per-task=1", "--wrap=false", "-o", "/dev/null", env=env)
    orphan = _sbatch(
        f"--dependency=afterok:{failing}",
        "--kill-on-invalid-dep=yes",
        "--wrap=true",
        "-o",
        "/dev/null",
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["squeue", "-h", "-j", array], capture_output=True).stdout.strip():
            assert time.monotonic() < deadline, "array did not finish in 120 s"
            time.sleep(1)
        assert _wait_ended(orphan, timeout=60)["JobState"] == "CANCELLED"
    finally:
        _cancel(array, failing, orphan)
    done = {p.parent.name: p.read_text().strip() for p in (tmp_path / "eval").glob("*/done")}
    assert done == {"a__iter_1": "0", "a__iter_2": "1", "r__b": "2"}
