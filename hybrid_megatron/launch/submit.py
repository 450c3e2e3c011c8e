"""Submit planned jobs with sbatch (dependencies with --kill-on-invalid-dep=yes) and record
them; a chain that cannot be submitted whole is cancelled, not left half-submitted."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from hybrid_megatron.launch.plan import Job


class LaunchError(RuntimeError):
    """Slurm refused or could not take a submission; the message names the cause."""


def log_path(job: Job, job_id: str, task: str = "<task>") -> str:
    """sbatch's --output pattern with this job's name, id and array task filled in."""
    path = job.log.replace("%x", job.name).replace("%j", job_id)
    return path.replace("%A", job_id).replace("%a", task)


def dependency_args(job: Job, ids: list[str]) -> list[str]:
    if job.after is None:
        return []
    # Without --kill-on-invalid-dep a job whose parent failed stays PENDING forever.
    return [f"--dependency=afterok:{ids[job.after]}", "--kill-on-invalid-dep=yes"]


def submit(jobs: list[Job], script_dir: Path) -> list[dict]:
    """sbatch every job in order; returns one record per job (also appended to
    script_dir/submissions.jsonl)."""
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch is not on PATH: run this on a Slurm login node, or pass --dry-run to print "
            "the job script(s)."
        )
    script_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ids: list[str] = []
    records: list[dict] = []
    for job in jobs:
        path = script_dir / f"{job.name}-{stamp}.sbatch"
        path.write_text(job.script)
        cmd = ["sbatch", "--parsable", *dependency_args(job, ids), str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            for done in ids:
                subprocess.run(["scancel", done], capture_output=True)
            undone = f" (cancelled the jobs already submitted: {', '.join(ids)})" if ids else ""
            raise LaunchError(
                f"sbatch refused the {job.stage} job{undone}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        job_id = proc.stdout.strip().split(";")[0]
        ids.append(job_id)
        records.append(
            dict(
                stage=job.stage,
                name=job.name,
                job_id=job_id,
                after=ids[job.after] if job.after is not None else None,
                log=log_path(job, job_id),
                script=str(path),
                submitted=stamp,
            )
        )
    with open(script_dir / "submissions.jsonl", "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records
