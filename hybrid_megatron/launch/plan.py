"""The Slurm jobs of one launch request, validated and rendered before anything is submitted.

`plan_training` checks the run config against the job layout (TP*PP*CP dividing the ranks,
batch sizes fitting data parallelism), the run and log directories, and the requested
follow-up stages, then renders the training job and its `--then` chain (convert, eval).
`plan_sweep` renders an eval sweep: a job array over models x lengths plus the job that
aggregates every part into one report.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.launch.options import SlurmOptions
from hybrid_megatron.launch.render import Raw, render

STAGES = ("convert", "eval")
CLI = ["-m", "hybrid_megatron.cli"]


@dataclass
class Job:
    """One sbatch submission; `after` is the index of the job it waits for (afterok)."""

    stage: str
    name: str
    script: str
    log: str  # with %j (or %A_%a for arrays), as sbatch --output has it
    after: int | None = None


@dataclass
class EvalRequest:
    """Tasks, lengths and sample count of an eval stage or sweep (None: the run config's
    after_training values, for `--then eval`)."""

    tasks: list[str] | None = None
    lengths: list[int] | None = None
    num_samples: int | None = None
    extra_args: list[str] = field(default_factory=list)

    def with_defaults(self, after) -> EvalRequest:
        return EvalRequest(
            list(after.eval_tasks) if self.tasks is None else self.tasks,
            list(after.eval_lengths) if self.lengths is None else self.lengths,
            after.eval_samples if self.num_samples is None else self.num_samples,
            self.extra_args,
        )


def _version() -> str:
    try:
        return metadata.version("hybrid-megatron")
    except metadata.PackageNotFoundError:
        return "unknown"


def writable_dir(path: Path, what: str, create: bool) -> None:
    """Check (and with `create`, make) a directory this user can write."""
    probe = path
    while not probe.exists():  # the nearest existing directory decides
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"Cannot use {path} as the {what}: {probe} is a file.")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"Cannot create the {what} {path}: {err}.") from err
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"The {what} {path} is not writable ({probe} belongs to someone else or is "
            "read-only); choose a directory you can write on a file system every node sees."
        )


def check_eval_request(req: EvalRequest) -> None:
    from hybrid_megatron.eval.plan import PPL_TASK
    from hybrid_megatron.eval.tasks.registry import TASKS

    known = [*TASKS, PPL_TASK]
    unknown = [t for t in req.tasks if t not in known]
    if unknown:
        raise ConfigError(f"Unknown eval task(s) {unknown}; choose from {', '.join(known)}.")
    if not req.tasks or not req.lengths:
        raise ConfigError(
            "The eval stage needs tasks and lengths: pass --eval-tasks and --eval-lengths, or "
            "set after_training.eval_tasks / eval_lengths in the config."
        )
    if req.num_samples < 1:
        raise ConfigError(f"--eval-samples must be >= 1, got {req.num_samples}.")


# --------------------------------------------------------------------------- shared pieces


class _Common:
    """What every job of one request shares: options, python, environment, log directory."""

    def __init__(self, o: SlurmOptions, log_dir: Path, command: str, env: dict[str, str]):
        self.o = o
        self.log_dir = log_dir
        self.command = command
        self.python = o.python or ("python" if o.container_image else sys.executable)
        self.env = dict(env)
        for key, value in o.env.items():  # user values win; KEY= drops a default
            if value == "":
                self.env.pop(key, None)
            else:
                self.env[key] = value

    def sbatch(self, name: str, nodes: int, tasks_per_node: int, cpus: int | None, gpus: int):
        o = self.o
        lines = [f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}"]
        if cpus:
            lines.append(f"--cpus-per-task={cpus}")
        if gpus:
            lines.append(f"--gpus-per-node={gpus}")
        lines.append(f"--time={o.time}")
        for key in ("partition", "account", "qos", "reservation"):
            if getattr(o, key):
                lines.append(f"--{key}={getattr(o, key)}")
        return lines

    def srun(self, nodes: int, tasks_per_node: int, cpus: int | None) -> list[str]:
        """srun with the step's layout; one failing task ends the whole step."""
        o = self.o
        cmd = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}"]
        cmd += [f"--ntasks={nodes * tasks_per_node}", "--kill-on-bad-exit=1"]
        if cpus:
            cmd.append(f"--cpus-per-task={cpus}")
        if o.container_image:
            cmd.append(f"--container-image={o.container_image}")
            if o.container_mounts:
                cmd.append(f"--container-mounts={','.join(o.container_mounts)}")
        return cmd + list(o.srun_args)

    def context(self, description: str, sbatch: list[str], notes: list[str] = ()) -> dict:
        return dict(
            description=description,
            version=_version(),
            command=self.command,
            notes=list(notes),
            sbatch=sbatch,
            env=self.env,
            setup=list(self.o.setup),
        )

    def step_job(
        self, stage: str, name: str, argv: list[str], after: int | None, gpu: bool = True
    ) -> Job:
        """A one-task job (conversion, evaluation, report) on one node, one GPU if any."""
        o = self.o
        gpus = 1 if o.gpus_per_node and gpu else 0
        sbatch = self.sbatch(name, 1, 1, o.cpus_per_task, gpus)
        log = str(self.log_dir / "%x-%j.out")
        sbatch += [f"--output={log}", *o.sbatch_args]
        notes = []
        if after is not None:
            notes = ["sbatch it with --dependency=afterok:<parent> --kill-on-invalid-dep=yes"]
        launch = [self.srun(1, 1, o.cpus_per_task), [self.python, *CLI, *argv]]
        script = render(
            "step.sbatch.j2",
            stage=stage,
            launch=launch,
            **self.context(f"hybrid-megatron {stage} job", sbatch, notes),
        )
        return Job(stage, name, script, log, after)


def _base_env(o: SlurmOptions, log_dir: Path, tp_or_cp: bool) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(o.cpus_per_task or 1)}
    if o.gpus_per_node:
        env.update(
            TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
            # flight recorder: on a collective timeout every rank dumps its last collectives
            TORCH_NCCL_TRACE_BUFFER_SIZE="2000",
            TORCH_NCCL_DUMP_ON_TIMEOUT="1",
            TORCH_NCCL_DEBUG_INFO_TEMP_FILE=f"{log_dir}/nccl_trace_${{SLURM_JOB_ID}}_rank_",
        )
        if tp_or_cp:  # TP/CP comm/compute overlap needs kernels to start in issue order
            env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


# --------------------------------------------------------------------------- training


def _check_layout(cfg, o: SlurmOptions) -> None:
    from hybrid_megatron.config import validate_batch_layout

    world = o.world_size
    try:
        cfg.validate(world_size=world)
        validate_batch_layout(cfg, world)
    except ConfigError as err:
        raise ConfigError(
            f"{o.nodes} node(s) x {o.ranks_per_node} rank(s) per node = {world} ranks: {err}"
        ) from None


def plan_training(
    config: str,
    sets: list[str],
    o: SlurmOptions,
    *,
    run_dir: str | None = None,
    then: list[str] = (),
    eval_request: EvalRequest | None = None,
    hf_dir: str | None = None,
    command: str = "",
    create_dirs: bool = True,
) -> list[Job]:
    """The training job (and its `then` chain), every check done before submission."""
    from hybrid_megatron.config import load_config

    unknown = [s for s in then if s not in STAGES]
    if unknown:
        raise ConfigError(f"--then {','.join(then)}: unknown stage(s) {unknown}; use {STAGES}.")
    cfg = load_config(config, list(sets))
    _check_layout(cfg, o)
    if o.requeue and not cfg.checkpoint.save_on_signal:
        raise ConfigError(
            "checkpoint.save_on_signal is false, so the job could not checkpoint before its "
            "time limit and requeue; set it to true or pass --no-requeue."
        )
    run = Path(run_dir or cfg.resolved_run_dir).expanduser().absolute()
    log_dir = Path(o.log_dir).expanduser().absolute() if o.log_dir else run / "logs"
    writable_dir(run, "run directory", create_dirs)
    writable_dir(log_dir, "log directory", create_dirs)
    hf = Path(hf_dir).expanduser().absolute() if hf_dir else run / "hf"
    if "convert" in then and hf.exists():
        raise ConfigError(
            f"--then convert would write {hf}, which exists; pass --hf-dir NEW_DIR or move it."
        )
    eval_request = (eval_request or EvalRequest()).with_defaults(cfg.after_training)
    if "eval" in then:
        check_eval_request(eval_request)

    p = cfg.parallel
    tp_or_cp = p.tensor > 1 or getattr(p, "context", 1) > 1
    common = _Common(o, log_dir, command, _base_env(o, log_dir, tp_or_cp))
    name = o.job_name or f"hm-{cfg.name}"
    train_args = ["train", str(Path(config).absolute()), "--run-dir", str(run)]
    train_args += [a for s in sets for a in ("--set", s)]
    if o.world_size == 1 and "convert" in then:  # the chain converts; not the run itself
        train_args += ["--set", "after_training.convert_to_hf=false"]
    if o.world_size == 1 and "eval" in then:
        train_args += ["--set", "after_training.eval_tasks=[]"]

    T, C = o.ranks_per_node, o.cpus_per_task
    if o.mode == "torchrun":
        per_task_cpus = C * T if C else None
        sbatch = common.sbatch(name, o.nodes, 1, per_task_cpus, o.gpus_per_node)
        launch = [
            common.srun(o.nodes, 1, per_task_cpus),
            [common.python, "-m", "torch.distributed.run", f"--nnodes={o.nodes}"],
            [f"--nproc-per-node={T}", "--rdzv-backend=c10d", "--max-restarts=0"],
            [Raw('"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"'), Raw('"--rdzv-id=$SLURM_JOB_ID"')],
            [*CLI, *train_args],
        ]
    else:
        sbatch = common.sbatch(name, o.nodes, T, C, o.gpus_per_node)
        launch = [common.srun(o.nodes, T, C), [common.python, *CLI], train_args]
    if o.exclusive:
        sbatch.append("--exclusive")
    if o.requeue:
        sbatch += [f"--signal=B:USR1@{o.signal_seconds}", "--requeue"]
    else:
        sbatch.append("--no-requeue")
    log = str(log_dir / "%x-%j.out")
    sbatch += ["--open-mode=append", f"--output={log}", *o.sbatch_args]
    ranks = f"{o.nodes} node(s) x {T} rank(s) ({o.mode}), {o.gpus_per_node} GPU(s) per node"
    script = render(
        "train.sbatch.j2",
        mode=o.mode,
        ranks_per_node=T,
        launch=launch,
        run_dir=str(run),
        requeue=o.requeue,
        signal_seconds=o.signal_seconds,
        max_restarts=o.max_restarts,
        stop_file=str(run / "slurm" / "stop-request"),
        status_file=str(run / "slurm" / "train-status.json"),
        **common.context(f"hybrid-megatron training job: {ranks}", sbatch),
    )
    jobs = [Job("train", name, script, log)]
    if "convert" in then:
        argv = ["convert", "to-hf", str(run / "checkpoints"), str(hf)]
        jobs.append(common.step_job("convert", f"{name}-convert", argv, len(jobs) - 1))
    if "eval" in then:
        model = hf if "convert" in then else run / "checkpoints"
        r = eval_request
        argv = ["eval", "--model", str(model), "--tasks", ",".join(r.tasks)]
        argv += ["--lengths", ",".join(map(str, r.lengths)), "--num-samples", str(r.num_samples)]
        argv += ["--output", str(run / "eval"), *r.extra_args]
        jobs.append(common.step_job("eval", f"{name}-eval", argv, len(jobs) - 1))
    return jobs


# --------------------------------------------------------------------------- eval sweep


def _label(name: str) -> str:
    """A directory-safe label of a model name ("s1/iter_0002000" -> "s1__iter_0002000")."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name.replace("/", "__"))


def plan_sweep(
    models: list[str],
    all_checkpoints: list[str],
    request: EvalRequest,
    output: str,
    o: SlurmOptions,
    *,
    command: str = "",
    create_dirs: bool = True,
) -> list[Job]:
    """A job array over models x lengths, then one job writing the combined report."""
    from hybrid_megatron.eval.models import ModelLoadError, resolve_models

    check_eval_request(request)
    try:
        sources = resolve_models(models, all_checkpoints)
    except ModelLoadError as err:
        raise ConfigError(str(err)) from None
    out = Path(output).expanduser().absolute()
    log_dir = Path(o.log_dir).expanduser().absolute() if o.log_dir else out / "logs"
    writable_dir(out, "sweep output directory", create_dirs)
    writable_dir(log_dir, "log directory", create_dirs)
    env = _base_env(o, log_dir, False)
    # Each Megatron checkpoint is converted once, by the first array task that needs it.
    env["HYBRID_MEGATRON_EVAL_CACHE"] = str(out / "converted")
    common = _Common(o, log_dir, command, env)
    name = o.job_name or f"hm-eval-{out.name}"
    labels = [_label(s.name) for s in sources]
    n = len(sources) * len(request.lengths)
    array = f"0-{n - 1}" + (f"%{o.array_parallel}" if o.array_parallel else "")
    gpus = 1 if o.gpus_per_node else 0
    sbatch = common.sbatch(name, 1, 1, o.cpus_per_task, gpus)
    log = str(log_dir / "%x-%A_%a.out")
    sbatch += [f"--array={array}", f"--output={log}", *o.sbatch_args]
    argv = ["eval", "--model", Raw('"$MODEL"'), "--tasks", ",".join(request.tasks)]
    argv += ["--lengths", Raw('"$LENGTH"'), "--num-samples", str(request.num_samples)]
    argv += ["--output", Raw('"$OUT"'), "--no-plots", *request.extra_args]
    script = render(
        "sweep.sbatch.j2",
        models=[str(s.path.absolute()) for s in sources],
        labels=labels,
        lengths=[str(n) for n in request.lengths],
        parts_dir=str(out / "parts"),
        launch=[common.srun(1, 1, o.cpus_per_task), [common.python, *CLI, *argv]],
        **common.context(
            f"hybrid-megatron eval sweep: {len(sources)} model(s) x {len(request.lengths)} "
            f"length(s) = {n} array tasks",
            sbatch,
        ),
    )
    parts = [
        str(out / "parts" / f"{label}__len{length}")
        for label in labels
        for length in request.lengths
    ]
    jobs = [Job("sweep", name, script, log)]
    report = ["eval-report", *parts, "--output", str(out)]
    jobs.append(common.step_job("report", f"{name}-report", report, 0, gpu=False))
    return jobs


def describe_command(argv: list[str]) -> str:
    """The launch command as one shell line (recorded in every script's header)."""
    return shlex.join(["hybrid-megatron", *argv])
