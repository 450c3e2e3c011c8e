"""The long-context evaluation sweep: models x tasks x lengths (x depths) x samples.

    settings = EvalSettings(models=["runs/a"], tasks=["niah_single_1", "passkey"],
                            lengths=[4096, 8192], num_samples=50, output=Path("eval/a"))
    run_eval(settings)           # this process's shard; rank 0 aggregates at the end

Every work item (`plan.WorkItem`) has a stable key. Each rank (`sharding.shard_from_env`)
takes items i % world == rank, skips keys already in the directory's sample files, generates
its prompts deterministically (seeded) with the model's tokenizer, decodes greedily and
appends one row per finished sample to its own file (`store`). A killed sweep, restarted with
the same settings (any world size), finishes only the remaining samples. Rank 0 then waits
for the other ranks' done markers, aggregates (`aggregate`) and draws the plots.

Rows are keyed by model identity (`models.model_identity`: resolved path + checkpoint marker
or HF weights fingerprint), never by folder name alone, so another model in a folder of the
same name is evaluated afresh; an output dir holding results of a different model under the
same name is refused. Every setting that changes predictions (dtype, device type, attention
implementation, batch size, tokenizer, seed, task options, transformers and torch versions)
is recorded in `eval_config.json`; a rerun with other settings is refused (write to a new
--output), and an unreadable settings file stops the run.

Notes: the aggregation covers every row in the directory (earlier invocations with other
models or tasks included; `n` says how many samples each number averages). With
`--batch-size` > 1 a re-sharded sweep may batch prompts differently, which in bf16 can flip a
rare near-tie greedy choice; `--batch-size 1` reruns are bit-identical.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval import store
from hybrid_megatron.eval.aggregate import aggregate_rows, format_markdown, write_results
from hybrid_megatron.eval.generation import check_cached_decoding, greedy_generate
from hybrid_megatron.eval.models import (
    CACHE_ENV,
    EvalModelInfo,
    EvalTokenizer,
    ModelSource,
    conversion_dtype,
    load_eval_model,
    prepare_conversions,
    resolve_device,
    resolve_dtype,
    resolve_models,
)
from hybrid_megatron.eval.output_checks import check_output_dir, check_same_models
from hybrid_megatron.eval.perplexity import PplSequences, evaluate_sequence
from hybrid_megatron.eval.plan import PPL_TASK, WorkItem, build_plan, plan_digest
from hybrid_megatron.eval.progress import Progress
from hybrid_megatron.eval.scoring import score_sample
from hybrid_megatron.eval.sharding import Shard, shard_from_env, take
from hybrid_megatron.eval.tasks import (
    TASKS,
    MissingTaskDataError,
    TargetLengthError,
    generate_samples,
    get_task,
)
from hybrid_megatron.procenv import available_cores


@dataclass
class EvalSettings:
    """Everything one `hybrid-megatron eval` invocation needs."""

    output: Path
    models: list[str] = field(default_factory=list)  # paths, comma lists or globs
    all_checkpoints: list[str] = field(default_factory=list)  # run dirs: every checkpoint
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    lengths: list[int] = field(default_factory=lambda: [4096])
    num_samples: int = 10
    seed: int = 42
    batch_size: int = 1
    device: str = "auto"
    dtype: str | None = None
    max_new_tokens: int | None = None  # overrides every task's generation budget
    task_options: dict[str, Any] = field(default_factory=dict)  # "key" or "task.key"
    grid: bool = False
    depths: list[float] | None = None
    model_template: str | None = None
    tokenizer: str | None = None
    attn_implementation: str | None = None
    ppl_data: str | None = None
    ppl_pack: bool = False
    ppl_bin_width: int | None = None
    log_every: int = 10
    stop_after: int | None = None  # stop after this many newly finished samples (this rank)
    aggregate: bool = True
    plots: bool = True
    wait_timeout: float = 600.0
    verify_conversion: bool = True
    check_generation: bool = True  # cached vs full-forward decoding on each model's 1st prompt
    threads: int | None = None  # CPU threads per process (None: see `cpu_threads`)

    def __post_init__(self) -> None:
        self.output = Path(self.output)

    def sample_settings(self, device: torch.device | None = None) -> dict[str, Any]:
        """What shapes the samples, the predictions and their scores (must match on restart);
        `device`: the resolved device (its type and the dtype it implies are recorded)."""
        import transformers

        device = device or resolve_device(self.device)
        return {
            "dtype": _dtype_label(resolve_dtype(self.dtype, device)),
            "device": device.type,
            "attn_implementation": self.attn_implementation,
            "batch_size": self.batch_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "seed": self.seed,
            "task_options": self.task_options,
            "max_new_tokens": self.max_new_tokens,
            "model_template": self.model_template,
            "tokenizer": self.tokenizer,
            "ppl": {
                "data": self.ppl_data,
                "pack": self.ppl_pack or self.ppl_data is None,
                "bin_width": self.ppl_bin_width,
            },
        }


# ----------------------------------------------------------------------------- tasks


def _accepted_options(task: str) -> set[str]:
    from hybrid_megatron.eval.tasks import registry

    cls = registry._SPECS[task][0]
    return set(inspect.signature(cls.__init__).parameters) - {"self", "name"}


def task_options_for(settings: EvalSettings, task: str) -> dict[str, Any]:
    """Options of one task: unscoped ones it accepts, `task.key` ones, --max-new-tokens."""
    from hybrid_megatron.eval.tasks.registry import SHARED_OPTIONS

    accepted = _accepted_options(task) | set(SHARED_OPTIONS)
    opts: dict[str, Any] = {}
    for key, value in settings.task_options.items():
        scope, _, name = key.rpartition(".")
        if scope == task or (not scope and name in accepted):
            opts[name] = value
    if settings.max_new_tokens is not None:
        opts["max_new_tokens"] = settings.max_new_tokens
    return opts


def check_tasks(settings: EvalSettings) -> None:
    """Unknown tasks, options no task takes and grid-incapable tasks fail before any work."""
    known = [*TASKS, PPL_TASK]
    for task in settings.tasks:
        if task not in known:
            raise ConfigError(f"unknown task '{task}'; choose from {', '.join(known)}.")
    gen_tasks = [t for t in settings.tasks if t != PPL_TASK]
    for key in settings.task_options:
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in gen_tasks:
                raise ConfigError(f"--task-option {key}: '{scope}' is not among --tasks.")
            if name not in _accepted_options(scope):
                raise ConfigError(
                    f"--task-option {key}: task '{scope}' has no option '{name}'; it accepts "
                    f"{', '.join(sorted(_accepted_options(scope)))}."
                )
        elif not any(name in _accepted_options(t) for t in gen_tasks):
            raise ConfigError(f"--task-option {key}: none of the tasks has an option '{name}'.")


def grid_tasks(settings: EvalSettings) -> list[str]:
    """Tasks evaluated at every grid depth: those with a needle depth (niah_*, passkey)."""
    if not settings.grid:
        return []
    return [t for t in settings.tasks if t != PPL_TASK and "depth" in _accepted_options(t)]


def missing_data(settings: EvalSettings) -> dict[str, str]:
    """task -> reason, for tasks whose data files are absent (they are skipped)."""
    skipped = {}
    for task in settings.tasks:
        if task == PPL_TASK:
            if settings.ppl_data is not None and not Path(settings.ppl_data).expanduser().exists():
                skipped[task] = (
                    f"perplexity data {settings.ppl_data} does not exist; pass --ppl-data with "
                    "a .jsonl/.txt file or directory, or leave it out for synthetic documents."
                )
            continue
        try:
            gen = get_task(task, **task_options_for(settings, task))
        except MissingTaskDataError as err:
            skipped[task] = str(err)
            continue
        except ValueError as err:
            raise ConfigError(f"task '{task}': {err}") from err
        gen.check_sample_count(settings.num_samples)
    return skipped


# ----------------------------------------------------------------------------- threads

# Below this many parameters a model's matrix products are too small to keep several CPU
# threads busy: one thread per process is fastest, and immune to an oversubscribed machine
# (measured with bench/bench_threads.py; the README has the figures).
SMALL_MODEL_PARAMS = 20_000_000


def cpu_threads(model: torch.nn.Module, requested: int | None) -> int:
    """Threads for CPU evaluation: `requested`, else OMP_NUM_THREADS if set, else one for a
    small model and the cores shared by this node's processes for a larger one."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    return max(1, available_cores() // max(1, local))


# ----------------------------------------------------------------------------- work


CHUNK_SAMPLES = 32  # samples of one group generated (and held in memory) at a time


class _Stop(Exception):
    """--stop-after reached."""


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(start, count) of consecutive runs in sorted `indices`."""
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            yield start, prev - start + 1
            start = prev = i
    if start is not None:
        yield start, prev - start + 1


def _groups(items: Sequence[WorkItem]) -> dict[tuple, list[WorkItem]]:
    groups: dict[tuple, list[WorkItem]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    return groups


def _dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _base_row(item: WorkItem, info: EvalModelInfo) -> dict[str, Any]:
    return {
        "key": item.key,
        "model": info.name,
        "model_id": info.model_id,
        "model_path": info.path,
        "iteration": info.iteration,
        "run": info.run,
        "task": item.task,
        "length": item.length,
    }


class _Worker:
    """Evaluates one rank's remaining items, writing a row per finished sample."""

    def __init__(self, settings: EvalSettings, shard: Shard, writer: store.RowWriter) -> None:
        self.s = settings
        self.shard = shard
        self.writer = writer
        self.new_rows = 0
        self.progress: Progress | None = None
        self.failed: dict[str, str] = {}
        self.generation_checked: set[str] = set()  # models whose cached decoding was checked

    def _emit(self, row: dict[str, Any], counts: bool = True) -> None:
        """Record a finished item; `counts=False` for skips (not samples for --stop-after)."""
        self.writer.write(row)
        if self.progress is not None:
            self.progress.update(1, int(row.get("length") or 0))
        if counts:
            self.new_rows += 1
            if self.s.stop_after is not None and self.new_rows >= self.s.stop_after:
                raise _Stop

    def run(self, sources: Sequence[ModelSource], todo: Sequence[WorkItem]) -> None:
        self.progress = Progress(
            [it.length for it in todo], self.s.log_every, f"[eval {self.shard.tag}]"
        )
        device = resolve_device(self.s.device, self.shard.local_rank)
        # Conversions of Megatron checkpoints: OUTPUT/converted, or one shared directory
        # (HYBRID_MEGATRON_EVAL_CACHE) that parallel jobs of a sweep convert into once.
        shared = os.environ.get(CACHE_ENV)
        cache = Path(shared) if shared else self.s.output / store.CONVERTED_DIR
        pending = [s for s in sources if any(it.model == s.key for it in todo)]
        prepare_conversions(
            pending,
            cache,
            conversion_dtype(resolve_dtype(self.s.dtype, device)),
            self.s.verify_conversion,
        )
        for source in pending:
            items = [it for it in todo if it.model == source.key]
            try:
                model, tok, info = load_eval_model(
                    source,
                    device,
                    self.s.dtype,
                    cache_dir=cache,
                    tokenizer=self.s.tokenizer,
                    attn_implementation=self.s.attn_implementation,
                    verify_conversion=self.s.verify_conversion,
                )
            except ConfigError as err:
                print(f"hybrid-megatron eval: skipping {source.name}: {err}", file=sys.stderr)
                self.failed[source.name] = str(err)
                continue
            threads = ""
            if device.type == "cpu":
                torch.set_num_threads(cpu_threads(model, self.s.threads))
                threads = f", {torch.get_num_threads()} thread(s)"
            print(
                f"[eval {self.shard.tag}] {info.name}: {len(items)} samples on {info.device} "
                f"({info.dtype}{threads}, tokenizer {info.tokenizer})",
                flush=True,
            )
            try:
                ppl_data: PplSequences | None = None
                for (_, task, length, depth), group in _groups(items).items():
                    if task == PPL_TASK:
                        if ppl_data is None:
                            ppl_data = PplSequences(
                                tok, self.s.ppl_data, self.s.ppl_pack, self.s.seed
                            )
                        self._ppl_group(model, info, ppl_data, group)
                    else:
                        self._task_group(model, tok, info, task, length, depth, group)
            finally:
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    def _ppl_group(
        self,
        model: torch.nn.Module,
        info: EvalModelInfo,
        data: PplSequences,
        group: Sequence[WorkItem],
    ) -> None:
        for item in group:
            ids = data.get(item.length, item.index)
            row = _base_row(item, info) | {"depth": None, "index": item.index}
            if ids is None:
                n = data.available(item.length)
                reason = f"{data.source} holds only {n} sequence(s) of {item.length} tokens" + (
                    "" if data.pack else "; pass --ppl-pack to join shorter documents"
                )
                self._emit(row | {"skipped": reason}, counts=False)
                continue
            result = evaluate_sequence(model, ids, self.s.ppl_bin_width)
            self._emit(row | {"source": data.source, **result})

    def _task_group(
        self,
        model: torch.nn.Module,
        tok: EvalTokenizer,
        info: EvalModelInfo,
        task: str,
        length: int,
        depth: float | None,
        group: Sequence[WorkItem],
    ) -> None:
        options = task_options_for(self.s, task)
        if depth is not None:
            options["depth"] = depth
        gen = get_task(task, **options)
        by_index = {it.index: it for it in group}
        order = sorted(by_index)
        step = max(CHUNK_SAMPLES, 4 * self.s.batch_size)  # bounds the prompts held at once
        for c in range(0, len(order), step):
            try:
                samples = [
                    s
                    for start, count in _runs(order[c : c + step])
                    for s in generate_samples(
                        gen,
                        tok,
                        length,
                        count,
                        self.s.seed,
                        start_index=start,
                        model_template=self.s.model_template,
                    )
                ]
            except TargetLengthError as err:
                for item in group:
                    row = _base_row(item, info) | {"depth": depth, "index": item.index}
                    self._emit(row | {"skipped": str(err)}, counts=False)
                return
            self._generate(model, tok, info, samples, by_index, depth)

    def _generate(
        self,
        model: torch.nn.Module,
        tok: EvalTokenizer,
        info: EvalModelInfo,
        samples: Sequence[Any],
        by_index: dict[int, WorkItem],
        depth: float | None,
    ) -> None:
        prompts = [tok.encode(s.prompt) for s in samples]
        budgets = [s.max_new_tokens for s in samples]
        if self.s.check_generation and info.name not in self.generation_checked and prompts:
            check_cached_decoding(model, tok, prompts[0], f"{info.name} ({info.hf_path})")
            self.generation_checked.add(info.name)
        for batch in greedy_generate(model, tok, prompts, budgets, self.s.batch_size):
            for g in batch:
                sample = samples[g.index]
                item = by_index[sample.index]
                self._emit(
                    _base_row(item, info)
                    | {
                        "depth": depth if depth is not None else sample.depth,
                        "grid": depth is not None,
                        "index": sample.index,
                        "input_tokens": len(prompts[g.index]),
                        "new_tokens": g.new_tokens,
                        "max_new_tokens": sample.max_new_tokens,
                        "prediction": g.text,
                        "outputs": list(sample.outputs),
                        "metric": sample.metric,
                        "score": score_sample(g.text, sample.outputs, sample.metric),
                        "seconds": round(g.seconds, 4),
                    }
                )


# ----------------------------------------------------------------------------- entry points


def write_report(
    out_dirs: Sequence[Path], output: Path | None = None, plots: bool = True, quiet: bool = False
) -> dict[str, Any]:
    """Aggregate the sample files of `out_dirs` into OUTPUT (default: the first dir)."""
    dirs = [Path(d) for d in out_dirs]
    for d in dirs:
        if not store.sample_files(d):
            raise ConfigError(
                f"{d} has no {store.SAMPLES_DIR}/*.jsonl files: pass a directory written by "
                "`hybrid-megatron eval --output DIR`."
            )
    output = Path(output) if output is not None else dirs[0]
    results = aggregate_rows(store.read_rows(dirs))
    json_path, md_path = write_results(output, results)
    written: list[Path] = []
    if plots:
        from hybrid_megatron.reports.eval_plots import write_plots

        written = write_plots(results, output / "plots")
    if not quiet:
        print(format_markdown(results), end="")
        print(f"wrote {json_path}, {md_path}" + (f" and {len(written)} plot(s)" if plots else ""))
    return results


def _wait_for_ranks(out: Path, world: int, digest: str, timeout: float) -> list[int]:
    """Ranks still missing after waiting up to `timeout` seconds for their done markers."""
    deadline = time.monotonic() + timeout
    while True:
        missing = sorted(set(range(world)) - set(store.ranks_done(out, world, digest)))
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


def run_eval(settings: EvalSettings, shard: Shard | None = None) -> dict[str, Any] | None:
    """Evaluate this process's shard; rank 0 returns the aggregated results (else None)."""
    shard = shard or shard_from_env()
    out = Path(settings.output)
    if settings.num_samples < 1 or not settings.lengths:
        raise ConfigError("--num-samples must be >= 1 and --lengths non-empty.")
    check_tasks(settings)
    sources = resolve_models(settings.models, settings.all_checkpoints)
    check_output_dir(out, sources)
    skipped = missing_data(settings)
    for task, reason in skipped.items():
        print(f"hybrid-megatron eval: skipping task {task}: {reason}", file=sys.stderr, flush=True)
    tasks = [t for t in settings.tasks if t not in skipped]
    depths = (settings.depths or [0, 25, 50, 75, 100]) if settings.grid else None
    plan = build_plan(
        [s.key for s in sources],
        tasks,
        settings.lengths,
        settings.num_samples,
        depths,
        grid_tasks(settings),
    )
    digest = plan_digest(plan)
    store.check_settings(out, settings.sample_settings(resolve_device(settings.device)))
    rows = store.read_rows(out)
    check_same_models(out, rows, sources)
    store.clear_done(out, shard)
    finished = {row["key"] for row in rows}
    mine = take(plan, shard)
    todo = [it for it in mine if it.key not in finished]
    print(
        f"[eval {shard.tag}] {len(plan)} work items in the sweep, {len(mine)} on this rank, "
        f"{len(mine) - len(todo)} already finished, {len(todo)} to run",
        flush=True,
    )
    stopped = False
    with store.RowWriter(store.sample_file(out, shard)) as writer:
        if shard.rank == 0:
            for source in sources:
                for task, reason in skipped.items():
                    key = f"{source.key}|{task}|skipped"
                    if key not in finished:
                        row = {"key": key, "model": source.name, "model_id": source.identity}
                        row["model_path"] = str(source.path)
                        row |= {"iteration": source.iteration, "run": source.run}
                        writer.write(row | {"task": task, "length": None, "skipped": reason})
        worker = _Worker(settings, shard, writer)
        try:
            worker.run(sources, todo)
        except _Stop:
            stopped = True
            print(
                f"[eval {shard.tag}] stopped after {worker.new_rows} new samples (--stop-after); "
                "run the same command again to continue.",
                flush=True,
            )
    if stopped:
        return None
    store.write_done(out, shard, digest, len(mine))
    results = None
    if shard.rank == 0 and settings.aggregate:
        results = _aggregate_when_done(out, shard.world, digest, settings)
    if worker.failed:
        names = ", ".join(worker.failed)
        raise ConfigError(
            f"could not evaluate {names} (see the messages above); the other "
            "models' results were written."
        )
    return results


def _aggregate_when_done(
    out: Path, world: int, digest: str, settings: EvalSettings
) -> dict[str, Any]:
    missing = _wait_for_ranks(out, world, digest, settings.wait_timeout)
    if missing:
        print(
            f"hybrid-megatron eval: ranks {missing} have not finished after "
            f"{settings.wait_timeout:.0f}s; the results below are partial. Run "
            f"`hybrid-megatron eval-report {out}` once they are done.",
            file=sys.stderr,
            flush=True,
        )
    return write_report([out], out, plots=settings.plots)


def parse_task_options(pairs: Sequence[str]) -> dict[str, Any]:
    """['key=value', 'task.key=value'] -> dict; values parsed as YAML scalars (1, 0.5, true)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--task-option '{pair}' is not KEY=VALUE (e.g. num_needle_v=2).")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
