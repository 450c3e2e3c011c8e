"""Models to evaluate: resolve paths, convert Megatron checkpoints on the fly, load for eval.

A model path is either
- a Hugging Face directory (`config.json`): ours (`HybridMegatronForCausalLM`, registered on
  `import hybrid_megatron.hf`) or any causal LM transformers can load locally;
- a Megatron checkpoint: a run directory, its `checkpoints/` directory (newest complete
  iteration) or one `iter_NNNNNNN` directory. It is converted with `megatron_to_hf` into a
  cache directory (`CACHE/RUN__iter_NNNNNNN-DTYPE-HASH`), in a separate process (Megatron
  patches torch for CPU and refuses to run inside a torchrun group), once: later loads and
  concurrent ranks reuse it. The source is only read.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval.identity import TOKENIZER_FILES, model_identity
from hybrid_megatron.eval.locks import LockHeld, file_lock

CACHE_ENV = "HYBRID_MEGATRON_EVAL_CACHE"
# Launcher variables a conversion subprocess must not inherit (it runs as a world of one).
_DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "TORCHELASTIC_RUN_ID",
)
_WILDCARDS = "*?["


class ModelLoadError(ConfigError):
    """A model path that cannot be evaluated; the message names the path and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """One model of a sweep: where it is, what it is, and its stable display name."""

    name: str
    path: Path
    kind: Literal["hf", "megatron"]
    iteration: int | None = None
    run: str | None = None  # the training run it belongs to (groups score-vs-step curves)
    identity: str = ""  # `model_identity`: what the weights are, not what the folder is called

    @property
    def key(self) -> str:
        """Names the model in work-item keys: display name and identity."""
        return f"{self.name}@{self.identity}" if self.identity else self.name

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass
class EvalModelInfo:
    """What was loaded: recorded in every result row."""

    name: str
    path: str
    hf_path: str
    iteration: int | None
    run: str | None
    tokenizer: str
    dtype: str
    device: str
    converted: bool = False
    model_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- resolving


def _run_name(iter_dir: Path) -> str:
    parent = iter_dir.absolute().parent
    if parent.name == "checkpoints":
        parent = parent.parent
    return parent.name or str(parent)


def _identity(path: Path, kind: str) -> str:
    try:
        return model_identity(path, kind)
    except OSError as err:
        raise ModelLoadError(f"Cannot read model {path} ({err}).") from err


def _hf_source(path: Path) -> ModelSource:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}/config.json is unreadable ({err}).") from err
    meta = config.get("megatron") or {}
    iteration = meta.get("iteration")
    source = meta.get("source_checkpoint")
    run = _run_name(Path(source)) if source else None
    # Converted from a training run: named by run and step, not by the folder ("hf").
    name = f"{run} step {iteration}" if run and iteration is not None else path.absolute().name
    return ModelSource(name, path, "hf", iteration, run, _identity(path, "hf"))


def describe_model(path: str | os.PathLike) -> ModelSource:
    """Classify one model path (HF dir or Megatron checkpoint) without loading weights."""
    from hybrid_megatron.checkpoint.layout import CheckpointError, is_iter_dir, resolve_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"Model path {path} does not exist. Pass a Hugging Face directory (with "
            "config.json), a run directory, its checkpoints/ directory or an iter_NNNNNNN "
            "directory."
        )
    if (path / "config.json").is_file():
        return _hf_source(path)
    # A run or checkpoints dir: the newest intact checkpoint, as train and convert pick it
    # (checksums verified, newer corrupt/partial ones skipped with a warning). One iter dir:
    # size checks here; its conversion verifies the checksums before reading anything.
    try:
        info = resolve_checkpoint(path, verify_checksums=not is_iter_dir(path))
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    run = _run_name(info.path)
    identity = _identity(info.path, "megatron")
    return ModelSource(
        f"{run}/{info.path.name}", info.path, "megatron", info.iteration, run, identity
    )


def _expand(spec: str) -> list[ModelSource]:
    """Models of a comma list of paths and globs; glob matches that are no usable model
    (partial checkpoints, other files) are skipped with a warning."""
    from hybrid_megatron.checkpoint.layout import warn

    out: list[ModelSource] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if not any(c in part for c in _WILDCARDS):
            out.append(describe_model(part))
            continue
        matches = sorted(glob.glob(os.path.expanduser(part)))
        if not matches:
            raise ModelLoadError(f"--model pattern '{part}' matches no path.")
        for match in matches:
            try:
                out.append(describe_model(match))
            except ModelLoadError as err:
                warn(f"Skipping {match} (matched by '{part}'): {err}")
    return out


def all_checkpoints(run_dir: str | os.PathLike) -> list[ModelSource]:
    """Every complete iter_* checkpoint of a run (oldest first); partial ones are skipped."""
    from hybrid_megatron.checkpoint.layout import checkpoint_problem, list_checkpoint_dirs, warn

    run_dir = Path(run_dir).expanduser()
    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    complete = []
    for info in list_checkpoint_dirs(root):
        problem = checkpoint_problem(info.path, verify_checksums=False)  # conversion: CRCs
        if problem is None:
            complete.append(info)
        else:
            warn(f"Skipping checkpoint {info.path}: {problem}.")
    if not complete:
        raise ModelLoadError(
            f"No complete checkpoint under {root}: --all-checkpoints needs a run directory "
            "with checkpoints/iter_NNNNNNN directories written by training."
        )
    return [describe_model(info.path) for info in complete]


def resolve_models(
    specs: Sequence[str] = (), all_checkpoint_runs: Sequence[str] = ()
) -> list[ModelSource]:
    """Models of a sweep from comma lists / globs and whole runs; names made unique."""
    sources: list[ModelSource] = []
    for spec in specs:
        sources.extend(_expand(spec))
    for run in all_checkpoint_runs:
        sources.extend(all_checkpoints(run))
    seen: dict[Path, ModelSource] = {}
    for s in sources:
        seen.setdefault(s.path.absolute(), s)
    unique = list(seen.values())
    if not unique:
        raise ModelLoadError("No model given: pass --model PATH or --all-checkpoints RUN_DIR.")
    names = [s.name for s in unique]
    return [
        dataclasses.replace(s, name=str(s.path.absolute())) if names.count(s.name) > 1 else s
        for s in unique
    ]


# ----------------------------------------------------------------------------- conversion


def default_cache_dir() -> Path:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else Path.home() / ".cache" / "hybrid_megatron" / "converted"


def converted_path(source: ModelSource, cache_dir: str | os.PathLike, dtype: str) -> Path:
    """Where `source` converted at `dtype` lives in `cache_dir` (same source -> same dir; a
    checkpoint rewritten at the same path has another identity, so another dir)."""
    digest = hashlib.sha1(f"{source.path.absolute()}\0{source.identity}".encode()).hexdigest()[:8]
    label = source.name.replace("/", "__").replace(os.sep, "__").strip("_") or "model"
    return Path(cache_dir) / f"{label[-80:]}-{dtype}-{digest}"


def _matches(hf_dir: Path, source: ModelSource) -> bool:
    try:
        meta = json.loads((hf_dir / "config.json").read_text()).get("megatron") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("iteration") == source.iteration


def _converted(target: Path, source: ModelSource) -> bool:
    return target.is_dir() and _matches(target, source)


def _lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _convert_main(argv: Sequence[str]) -> int:
    """Conversion subprocess: argv[0] is a JSON list of {source, name, iteration, target,
    dtype, verify, wait}. Jobs locked by another process are left to it unless `wait`."""
    from hybrid_megatron.hf.convert import megatron_to_hf

    failed = 0
    for job in json.loads(argv[0]):
        source = ModelSource(job["name"], Path(job["source"]), "megatron", job["iteration"])
        target = Path(job["target"])
        try:
            with file_lock(_lock_path(target), wait=job["wait"]):
                if _converted(target, source):
                    continue
                print(f"hybrid-megatron eval: converting {source.path} -> {target}", flush=True)
                megatron_to_hf(source.path, target, dtype=job["dtype"], verify=job["verify"])
        except LockHeld:
            continue
        except Exception as err:  # noqa: BLE001 - report and go on with the other checkpoints
            failed += 1
            print(f"hybrid-megatron eval: cannot convert {source.path}: {err}", file=sys.stderr)
    return 1 if failed else 0


def _run_conversions(jobs: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    code = (
        "import sys\nfrom hybrid_megatron.eval.models import _convert_main\n"
        "sys.exit(_convert_main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(jobs)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("hybrid-megatron eval:"):
            print(line, flush=True)
    return proc


def _job(source: ModelSource, target: Path, dtype: str, verify: bool, wait: bool) -> dict:
    return {
        "source": str(source.path),
        "name": source.name,
        "iteration": source.iteration,
        "target": str(target),
        "dtype": dtype,
        "verify": verify,
        "wait": wait,
    }


def prepare_conversions(
    sources: Sequence[ModelSource],
    cache_dir: str | os.PathLike,
    dtype: str = "fp32",
    verify: bool = True,
) -> None:
    """Convert every Megatron source not yet in `cache_dir`, in one subprocess (one Megatron
    start-up for a whole sweep). Checkpoints another process is converting are left to it;
    failures surface when the model is loaded (`ensure_converted`)."""
    jobs = []
    for source in sources:
        if source.kind != "megatron":
            continue
        target = converted_path(source, cache_dir, dtype)
        if not _converted(target, source) and not _lock_path(target).exists():
            jobs.append(_job(source, target, dtype, verify, wait=False))
    if jobs:
        _run_conversions(jobs)


def ensure_converted(
    source: ModelSource, cache_dir: str | os.PathLike, dtype: str = "fp32", verify: bool = True
) -> tuple[Path, bool]:
    """The HF directory of a Megatron `source` (converted now unless cached); (dir, converted).

    Waits while another process holds the conversion lock of the same target.
    """
    target = converted_path(source, cache_dir, dtype)
    if _converted(target, source):
        return target, False
    if _lock_path(target).exists():  # another job converts it (a sweep): wait here, not in
        with file_lock(_lock_path(target)):  # a Megatron subprocess started only to wait
            pass
        if _converted(target, source):
            return target, False
    proc = _run_conversions([_job(source, target, dtype, verify, wait=True)])
    if proc.returncode != 0 or not _converted(target, source):
        raise ModelLoadError(
            f"Converting {source.path} to Hugging Face format failed (exit {proc.returncode}); "
            f"the checkpoint was not changed. Last output:\n{proc.stderr[-3000:]}"
        )
    return target, True


# ----------------------------------------------------------------------------- tokenizer


class EvalTokenizer:
    """The tokenizer as the model is fed: `encode` adds exactly what training added.

    Wraps the data layer's `ByteTokenizer` / `HFTokenizer` (no special tokens), optionally
    prefixed with BOS (models whose tokenizer adds one by default, e.g. Llama).
    """

    def __init__(self, base: Any, eos_ids: Sequence[int], pad_id: int, bos_id: int | None):
        self.base = base
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.pad_id = int(pad_id)
        self.bos_id = bos_id
        self.spec = getattr(base, "spec", repr(base))

    @property
    def eod(self) -> int:
        return int(self.base.eod)

    def encode(self, text: str) -> list[int]:
        ids = self.base.encode(text)
        return [self.bos_id, *ids] if self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids: up to the first EOS, without padding or special tokens."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.eos_ids:
                break
            if i != self.pad_id:
                out.append(i)
        hf = getattr(self.base, "hf_tokenizer", None)
        if hf is not None:
            return hf.decode(out, skip_special_tokens=True)
        return self.base.decode(out)

    def __repr__(self) -> str:
        return f"EvalTokenizer({self.spec!r})"


_TOKENIZER_FILES = TOKENIZER_FILES


def load_tokenizer(
    hf_dir: Path, config: Any, generation_config: Any, tokenizer: str | None = None
) -> EvalTokenizer:
    """The model's tokenizer: `tokenizer` if given, the dir's own, else the run's recorded one."""
    from hybrid_megatron.data.tokenizer import ByteTokenizer, HFTokenizer

    run_config = (getattr(config, "megatron", None) or {}).get("run_config") or {}
    recorded = (run_config.get("data") or {}).get("tokenizer")
    ours = getattr(config, "model_type", None) == "hybrid_megatron"
    if tokenizer is not None:
        base = ByteTokenizer() if tokenizer == "byte" else HFTokenizer(tokenizer)
    elif recorded == "byte":  # the dir's tokenizer.json, if any, is its HF equivalent
        base = ByteTokenizer()
    elif any((hf_dir / f).is_file() for f in _TOKENIZER_FILES):
        base = HFTokenizer(hf_dir)
    elif ours and recorded is None:
        base = ByteTokenizer()
    elif recorded and Path(recorded).is_dir():
        base = HFTokenizer(recorded)
    else:
        raise ModelLoadError(
            f"No tokenizer for {hf_dir}: the directory has none and its run's tokenizer "
            f"({recorded!r}) is not a local directory here. Save one into the model directory "
            "with `tokenizer.save_pretrained(DIR)` or pass --tokenizer PATH."
        )
    vocab = getattr(config, "vocab_size", None)
    if isinstance(base, ByteTokenizer) and vocab is not None and vocab < base.vocab_size:
        raise ModelLoadError(
            f"{hf_dir} has {vocab} token embeddings, fewer than the byte tokenizer's "
            f"{base.vocab_size}: it was not trained with it. Pass --tokenizer PATH."
        )
    eos = getattr(generation_config, "eos_token_id", None)
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    eos_ids.append(base.eod)
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = base.pad if base.pad is not None else base.eod
    bos_id = None
    hf = getattr(base, "hf_tokenizer", None)
    if not ours and hf is not None and hf.bos_token_id is not None:
        probe = hf("a")["input_ids"]
        bos_id = hf.bos_token_id if probe[:1] == [hf.bos_token_id] else None
    return EvalTokenizer(base, eos_ids, pad, bos_id)


# ----------------------------------------------------------------------------- loading

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu; 'cuda' -> cuda:LOCAL_RANK."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but CUDA is not available here.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto' -> bf16 on CUDA, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    key = aliases.get(dtype, dtype)
    if key not in DTYPES:
        raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}.")
    return DTYPES[key]


def conversion_dtype(dtype: torch.dtype) -> str:
    """The dtype converted checkpoints are stored in for evaluation at `dtype`."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def load_eval_model(
    path: str | os.PathLike | ModelSource,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    attn_implementation: str | None = None,
    verify_conversion: bool = True,
) -> tuple[torch.nn.Module, EvalTokenizer, EvalModelInfo]:
    """(model in eval mode on `device`, its tokenizer, what was loaded) for an HF dir or a
    Megatron checkpoint (converted into `cache_dir`, default `$HYBRID_MEGATRON_EVAL_CACHE`
    or ~/.cache/hybrid_megatron/converted)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    import hybrid_megatron.hf  # noqa: F401  (registers our model with the Auto classes)

    source = path if isinstance(path, ModelSource) else describe_model(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    converted = False
    hf_dir = source.path
    if source.kind == "megatron":
        hf_dir, converted = ensure_converted(
            source,
            cache_dir or default_cache_dir(),
            conversion_dtype(torch_dtype),
            verify_conversion,
        )
    try:
        config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot load a causal LM from {hf_dir}: {err}") from err
    model.to(device).eval()
    try:
        generation_config = GenerationConfig.from_pretrained(hf_dir, local_files_only=True)
    except OSError:
        generation_config = model.generation_config
    tok = load_tokenizer(Path(hf_dir), config, generation_config, tokenizer)
    info = EvalModelInfo(
        name=source.name,
        path=str(source.path),
        hf_path=str(hf_dir),
        iteration=source.iteration,
        run=source.run,
        tokenizer=str(tok.spec),
        dtype=_dtype_name(torch_dtype),
        device=str(device),
        converted=converted,
        model_id=source.identity,
    )
    return model, tok, info
