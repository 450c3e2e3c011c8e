"""Long-context eval runner: Megatron checkpoint -> results.json + plots end to end; a stopped
sweep resumes to identical results; two sharded processes equal one; perplexity by position;
model resolution and loading; right-padded forwards and lm-evaluation-harness (when
installed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
# The byte tokenizer's 258 tokens (padded to 512 by Megatron); seq_length 128 < eval lengths.
MEGATRON_MODEL = dict(
    pattern="M-S*-",
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=258,
    seq_length=128,
    full_attention={"rope": False},
    swa={"window": 16, "rope": True, "rope_theta": 10000.0},
    mamba={"state_dim": 8, "head_dim": 16, "num_groups": 1, "expand": 2, "chunk_size": 32},
    tie_embeddings=True,
)
ITERATIONS = (10, 20)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # conversion and rank subprocesses
    yield
    torch.set_num_threads(threads)


def _save_checkpoints(run_dir: str) -> bool:
    """Two training-layout checkpoints of one small random model (weights differ)."""
    from hybrid_megatron import distributed
    from hybrid_megatron.config import RunConfig, from_dict
    from hybrid_megatron.hf.megatron_io import save_weights_checkpoint
    from hybrid_megatron.model.build import build_model

    cfg = from_dict(RunConfig, {"model": MEGATRON_MODEL, "data": {"tokenizer": "byte"}})
    cfg.validate()
    distributed.initialize(cfg.parallel, seed=1234)
    model = build_model(cfg).eval()
    for it in ITERATIONS:
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                g = torch.Generator().manual_seed(1000 * i + it)
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        save_weights_checkpoint([model], cfg, Path(run_dir), it)
    return True


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("evalrun") / "tiny_run"
    run_distributed(_save_checkpoints, 1, str(run))
    return run


def _byte_hf_model(path: Path) -> Path:
    """A tiny random HF hybrid for the byte tokenizer (peaked logits: no greedy near-ties)."""
    from hybrid_megatron.hf import HybridMegatronConfig, HybridMegatronForCausalLM

    torch.manual_seed(0)
    config = HybridMegatronConfig(
        vocab_size=258,
        hidden_size=32,
        intermediate_size=64,
        layer_types=["mamba", "mlp", "sliding_attention", "full_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        full_attention_use_rope=False,
        mamba_d_state=4,
        mamba_d_head=8,
        mamba_chunk_size=32,
        initializer_range=0.3,
        max_position_embeddings=128,
        eos_token_id=256,
        pad_token_id=257,
    )
    model = HybridMegatronForCausalLM(config).eval()
    model.generation_config.eos_token_id = 256
    model.generation_config.pad_token_id = 257
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _byte_hf_model(tmp_path_factory.mktemp("evalhf") / "tiny_hf")


def _settings(output: Path, models: list[str], **kw):
    from hybrid_megatron.eval.runner import EvalSettings

    base = dict(
        tasks=["niah_single_1", "passkey", "ppl"],
        lengths=[384, 512],
        num_samples=2,
        max_new_tokens=6,
        device="cpu",
        log_every=100,
        wait_timeout=120,
    )
    return EvalSettings(output=output, models=models, **{**base, **kw})


def _rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "samples").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def _without_timing(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def _tree_digest(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------ end to end


def test_end_to_end_megatron_checkpoints_to_results_and_plots(megatron_run, tmp_path, capsys):
    from hybrid_megatron.eval.models import load_eval_model, resolve_models
    from hybrid_megatron.eval.runner import run_eval

    before = _tree_digest(megatron_run)
    out = tmp_path / "eval"
    settings = _settings(
        out,
        [str(megatron_run / "checkpoints" / "iter_*")],
        tasks=["niah_single_1", "qa_1", "ppl"],
        lengths=[256, 512],
        num_samples=1,
        grid=True,
        depths=[0.0, 50.0, 100.0],
    )
    results = run_eval(settings)
    printed = capsys.readouterr()
    assert _tree_digest(megatron_run) == before  # the source checkpoints are only read

    names = [f"tiny_run/iter_{it:07d}" for it in ITERATIONS]
    assert list(results["models"]) == names
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    for name, it in zip(names, ITERATIONS):
        m = results["models"][name]
        assert m["iteration"] == it and m["run"] == "tiny_run"
        grid = m["grid"]["niah_single_1"]
        assert set(grid) == {"512"} and set(grid["512"]) == {"0", "50", "100"}
        assert all(0 <= c["score"] <= 100 and c["n"] == 1 for c in grid["512"].values())
        assert "too short" in m["skipped"]["niah_single_1@256"]  # the prompt does not fit
        assert set(m["ppl"]) == {"256", "512"} and m["ppl"]["512"]["tokens"] == 511
        assert [b["hi"] for b in m["ppl"]["512"]["bins"]] == [2, 4, 8, 16, 32, 64, 128, 256, 512]
        assert "squad" in m["skipped"]["qa_1"]  # missing data: skipped with the reason
    assert "skipping task qa_1" in printed.err
    assert "| ppl length | loss | ppl | sequences |" in printed.out  # results.md is printed
    assert (out / "results.md").read_text() in printed.out
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {f"heatmap_tiny_run_iter_{it:07d}_niah_single_1.png" for it in ITERATIONS} <= plots
    assert {"score_vs_step_tiny_run.png", "ppl_vs_step_tiny_run.png"} <= plots
    assert (out / "plots" / "heatmap_tiny_run_iter_0000010_niah_single_1.png").read_bytes()[
        :8
    ] == b"\x89PNG\r\n\x1a\n"
    rows = [r for r in _rows(out) if "score" in r]
    assert len(rows) == 2 * 3  # models x depths (one sample each; 256 does not fit)
    row = rows[0]
    assert row["input_tokens"] + row["max_new_tokens"] <= row["length"]
    assert row["grid"] is True and row["outputs"] and isinstance(row["prediction"], str)

    # Conversions are cached under the output and reused; loading gives the recorded info.
    converted = sorted(p.name for p in (out / "converted").iterdir() if p.is_dir())
    assert len(converted) == 2
    source = resolve_models([str(megatron_run / "checkpoints" / "iter_0000010")])[0]
    model, tok, info = load_eval_model(source, "cpu", cache_dir=out / "converted")
    assert not info.converted and info.iteration == 10 and info.tokenizer == "byte"
    assert tok.encode("ab") == [97, 98] and tok.eos_ids == (256,)
    # A byte-tokenizer run's HF directory ships a loadable tokenizer with the same ids, and its
    # weights are readable as the umask allows (transformers writes them 0600).
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(info.hf_path)
    assert hf_tok("pass key 7\n")["input_ids"] == list(b"pass key 7\n")
    assert hf_tok.eos_token_id == 256 and hf_tok.pad_token_id == 257
    umask = os.umask(0)
    os.umask(umask)
    for weights in Path(info.hf_path).glob("*.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask, weights

    # Re-running the finished sweep does no work and aggregates to the same results.
    assert run_eval(settings) == results
    assert "0 to run" in capsys.readouterr().out


# ------------------------------------------------------------------ resume and sharding


def _cli(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hybrid_megatron.cli",
        "eval",
        "--model",
        str(model),
        "--tasks",
        "niah_single_1,passkey,ppl",
        "--lengths",
        "384,512",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--wait-timeout",
        "120",
        *extra,
    ]


def test_stopped_sweep_resumes_with_identical_results_and_sharding_matches(hf_dir, tmp_path):
    from hybrid_megatron.eval.runner import run_eval

    # Reference: one process, uninterrupted.
    ref_dir = tmp_path / "ref"
    reference = run_eval(_settings(ref_dir, [str(hf_dir)]))
    ref_rows = _without_timing(_rows(ref_dir))
    assert len(ref_rows) == 3 * 2 * 2  # tasks x lengths x samples

    # Stopped after 5 samples (as if killed), a cut-off line appended, then resumed.
    part = tmp_path / "resumed"
    assert run_eval(_settings(part, [str(hf_dir)], stop_after=5)) is None
    assert len(_rows(part)) == 5 and not (part / "results.json").exists()
    with open(part / "samples" / "rank0-of-1.jsonl", "a") as f:
        f.write('{"key": "cut off by a ki')
    with pytest.warns(UserWarning, match="unreadable"):
        resumed = run_eval(_settings(part, [str(hf_dir)]))
    lines = (part / "samples" / "rank0-of-1.jsonl").read_text().splitlines()
    assert len(lines) == 13  # 5 + the broken line + only the 7 remaining samples
    assert resumed == reference
    assert _without_timing([json.loads(x) for x in lines if x.endswith("}")]) == ref_rows

    # Two processes (RANK / WORLD_SIZE) finish a sweep that one process started.
    sharded = tmp_path / "sharded"
    assert run_eval(_settings(sharded, [str(hf_dir)], stop_after=3)) is None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            _cli(sharded, hf_dir),
            env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    finished = [re.search(r"(\d+) already finished", out).group(1) for out, _ in outputs]
    assert sum(map(int, finished)) == 3
    files = sorted(p.name for p in (sharded / "samples").glob("*.jsonl"))
    assert files == ["rank0-of-1.jsonl", "rank0-of-2.jsonl", "rank1-of-2.jsonl"]
    assert _without_timing(_rows(sharded)) == ref_rows  # every sample once, identical
    assert json.loads((sharded / "results.json").read_text()) == reference
    assert "| **average** |" in outputs[0][0]  # rank 0 aggregated after rank 1 finished


def test_restart_with_other_settings_is_refused(hf_dir, tmp_path):
    from hybrid_megatron.errors import ConfigError
    from hybrid_megatron.eval.runner import run_eval

    out = tmp_path / "eval"
    kw = dict(tasks=["passkey"], lengths=[256], num_samples=1)
    run_eval(_settings(out, [str(hf_dir)], **kw))
    before = _tree_digest(out)
    with pytest.raises(ConfigError, match="seed: 42 -> 7"):
        run_eval(_settings(out, [str(hf_dir)], seed=7, **kw))
    assert _tree_digest(out) == before


def test_rows_are_keyed_by_model_identity_and_prediction_settings(hf_dir, tmp_path):
    """Another model in a folder of the same name reused the first one's rows ("1 already
    finished, 0 to run"); dtype/batch size/versions were not recorded; a corrupt settings file
    was silently replaced (issue 14, item 5)."""
    import shutil

    import transformers

    from hybrid_megatron.errors import ConfigError
    from hybrid_megatron.eval.runner import run_eval

    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(hf_dir, first)
    shutil.copytree(hf_dir, second)
    out = tmp_path / "eval"
    kw = dict(tasks=["passkey"], lengths=[256], num_samples=1)
    run_eval(_settings(out, [str(first)], **kw))
    rows = _rows(out)
    assert {r["model"] for r in rows} == {"model"} and len({r["model_id"] for r in rows}) == 1
    recorded = json.loads((out / "eval_config.json").read_text())
    assert recorded["dtype"] == "float32" and recorded["device"] == "cpu"
    assert recorded["batch_size"] == 1 and recorded["transformers"] == transformers.__version__
    before = _tree_digest(out)
    with pytest.raises(ConfigError, match="different model named 'model'"):
        run_eval(_settings(out, [str(second)], **kw))
    with pytest.raises(ConfigError, match="batch_size: 1 -> 2"):
        run_eval(_settings(out, [str(first)], batch_size=2, **kw))
    (out / "eval_config.json").write_text('{"seed": 4')  # cut off
    with pytest.raises(ConfigError, match="eval_config.json is unreadable"):
        run_eval(_settings(out, [str(first)], **kw))
    assert (out / "eval_config.json").read_text() == '{"seed": 4'
    (out / "eval_config.json").unlink()
    with pytest.raises(ConfigError, match="no eval_config.json"):
        run_eval(_settings(out, [str(first)], **kw))
    del before["eval_config.json"]
    assert _tree_digest(out) == before
    # The same folder rewritten with other weights is another model too.
    from hybrid_megatron.eval.models import describe_model

    old_id = describe_model(first).identity
    weights = first / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert describe_model(first).identity != old_id


def test_batched_generation_equals_one_by_one(hf_dir):
    from hybrid_megatron.eval.generation import greedy_generate, sorted_batches
    from hybrid_megatron.eval.models import load_eval_model
    from hybrid_megatron.eval.tasks import generate_samples

    assert sorted_batches([5, 3, 5, 5, 3], [9] * 5, 2) == [[0, 2], [3, 1], [4]]
    assert sorted_batches([5, 3, 5, 5, 3], [9, 9, 4, 9, 4], 8) == [[0, 3, 1], [2, 4]]
    model, tok, _ = load_eval_model(hf_dir, "cpu")
    prompts = [tok.encode(s.prompt) for s in generate_samples("passkey", tok, 300, 4)]
    prompts += [prompts[0][:250], prompts[1][:237], prompts[2][:40]]  # mixed lengths
    single = {g.index: g.text for b in greedy_generate(model, tok, prompts, 5, 1) for g in b}
    batches = list(greedy_generate(model, tok, prompts, 5, 4))
    assert [len(b) for b in batches] == [4, 3]  # left-padded: lengths mix within a batch
    assert {g.index: g.text for b in batches for g in b} == single


def test_sweep_stops_before_work_when_cached_decoding_is_broken(hf_dir, tmp_path, monkeypatch):
    """A cache that forgets past keys (as transformers 5.24 made ours do) stops the sweep on the
    first prompt, naming the model and the transformers version; nothing is recorded."""
    import transformers

    from hybrid_megatron.errors import GenerationCheckError
    from hybrid_megatron.eval.runner import run_eval
    from hybrid_megatron.hf.cache_hybrid_megatron import AttentionState, MambaState

    out = tmp_path / "eval"
    kw = dict(tasks=["passkey"], lengths=[256], num_samples=2)
    run_eval(_settings(tmp_path / "good", [str(hf_dir)], **kw))  # the intact model passes

    def forgetful(self, k, v):  # every step attends to its own tokens only
        self.seen += k.shape[2]
        return k, v

    monkeypatch.setattr(AttentionState, "update", forgetful)
    monkeypatch.setattr(MambaState, "has_previous", property(lambda self: False))
    with pytest.raises(GenerationCheckError) as err:
        run_eval(_settings(out, [str(hf_dir)], **kw))
    assert "tiny_hf" in str(err.value) and transformers.__version__ in str(err.value)
    assert _rows(out) == []
    # The check can be skipped on purpose (rows are then written, wrong as they are).
    run_eval(_settings(out, [str(hf_dir)], check_generation=False, **kw))
    assert len(_rows(out)) == 2


# ------------------------------------------------------------------ perplexity


def test_perplexity_bins_and_losses(hf_dir, tmp_path, monkeypatch):
    from hybrid_megatron.data.tokenizer import ByteTokenizer
    from hybrid_megatron.eval import perplexity as ppl
    from hybrid_megatron.eval.models import load_eval_model

    assert ppl.position_bins(10) == [(1, 2), (2, 4), (4, 8), (8, 10)]
    assert ppl.position_bins(10, width=4) == [(1, 4), (4, 8), (8, 10)]
    losses = torch.arange(1.0, 10.0)  # loss at position t is t
    assert ppl.bin_losses(losses, ppl.position_bins(10)) == [
        [1, 2, 1.0, 1],
        [2, 4, 5.0, 2],
        [4, 8, 22.0, 4],
        [8, 10, 17.0, 2],
    ]

    model, _, _ = load_eval_model(hf_dir, "cpu")
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ppl, "HEAD_CHUNK", 64)  # the chunked head equals one full forward
    per_token = ppl.token_losses(model, ids)
    with torch.no_grad():
        reference = model(ids[None], labels=ids[None], use_cache=False).loss
    assert per_token.shape == (299,)
    assert abs(float(per_token.mean()) - float(reference)) < 1e-5
    result = ppl.evaluate_sequence(model, ids.tolist())
    assert sum(b[3] for b in result["bins"]) == 299
    assert abs(sum(b[2] for b in result["bins"]) / 299 - result["loss"]) < 1e-9

    # Data: user documents (one per sequence, or packed) and held-out synthetic documents.
    tok = ByteTokenizer()
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["a" * 50, "b" * 10, "c" * 40]))
    unpacked = ppl.PplSequences(tok, data)
    assert unpacked.get(40, 0) == [97] * 40 and unpacked.get(40, 1) == [99] * 40
    assert unpacked.get(40, 2) is None and unpacked.available(40) == 2
    packed = ppl.PplSequences(tok, data, pack=True)
    assert packed.get(30, 1) == [97] * 20 + [256] + [98] * 9 and packed.available(30) == 3
    synthetic = ppl.PplSequences(tok, seed=1)
    assert len(synthetic.get(1000, 3)) == 1000
    assert synthetic.get(1000, 3) == ppl.PplSequences(tok, seed=1).get(1000, 3)
    assert synthetic.get(1000, 3) != ppl.PplSequences(tok, seed=2).get(1000, 3)
    with pytest.raises(ppl.EvalDataError, match="text"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"content": "x"}\n')
        ppl.load_texts(bad)

    rows = [
        {"length": 8, "bins": [[1, 2, 2.0, 1], [2, 4, 4.0, 2]]},
        {"length": 8, "bins": [[1, 2, 4.0, 1], [2, 4, 2.0, 2]]},
    ]
    agg = ppl.aggregate_ppl(rows)[8]
    assert agg["n"] == 2 and agg["tokens"] == 6 and agg["loss"] == 2.0
    assert [b["loss"] for b in agg["bins"]] == [3.0, 1.5]


# ------------------------------------------------------------------ models and shards


def _fake_checkpoint(run_dir: Path, iteration: int, complete: bool = True) -> Path:
    from hybrid_megatron.checkpoint.layout import write_complete_marker

    ckpt = run_dir / "checkpoints" / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 10)
    if complete:
        write_complete_marker(ckpt, iteration, {}, checksums=False)
    return ckpt


def test_model_resolution_and_shards(hf_dir, tmp_path):
    from hybrid_megatron.eval.models import ModelLoadError, describe_model, resolve_models
    from hybrid_megatron.eval.sharding import Shard, shard_from_env, take

    run = tmp_path / "run_a"
    for it in (100, 200):
        _fake_checkpoint(run, it)
    _fake_checkpoint(run, 300, complete=False)  # partial save: never evaluated
    newest = describe_model(run)
    assert (
        newest.kind == "megatron"
        and newest.iteration == 200
        and newest.name == "run_a/iter_0000200"
    )
    by_glob = resolve_models([f"{run}/checkpoints/iter_*,{hf_dir}"])  # partial one skipped
    assert [s.name for s in by_glob] == ["run_a/iter_0000100", "run_a/iter_0000200", "tiny_hf"]
    assert by_glob[0].path == run / "checkpoints" / "iter_0000100"
    assert by_glob[2].kind == "hf" and by_glob[2].iteration is None
    every = resolve_models([], [str(run)])
    assert [s.iteration for s in every] == [100, 200]
    with pytest.raises(ModelLoadError, match="partial"):
        describe_model(run / "checkpoints" / "iter_0000300")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_models([str(tmp_path / "nothing")])

    assert shard_from_env({}) == Shard(0, 1, 0)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"}
    assert shard_from_env(slurm | {"SLURM_STEP_ID": "0"}) == Shard(2, 3, 0)  # under srun
    assert shard_from_env(slurm) == Shard(0, 1, 0)  # a batch script itself is one process
    assert take(list(range(7)), Shard(1, 3)) == [1, 4]


def test_run_dir_model_is_the_newest_intact_checkpoint(tmp_path, capsys):
    """`eval --model RUN_DIR` picked a corrupt newest checkpoint (sizes only) where train and
    convert fall back to the newest intact one (issue 14, item 10)."""
    from hybrid_megatron.checkpoint.layout import resolve_checkpoint, write_complete_marker
    from hybrid_megatron.eval.models import describe_model, resolve_models

    run = tmp_path / "run"
    for it in (100, 200):
        ckpt = run / "checkpoints" / f"iter_{it:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "__0_0.distcp").write_bytes(bytes(range(200)))
        write_complete_marker(ckpt, it, {}, checksums=True)
    payload = run / "checkpoints" / "iter_0000200" / "__0_0.distcp"
    data = bytearray(payload.read_bytes())
    data[7] ^= 1  # one flipped bit, same size
    payload.write_bytes(bytes(data))
    capsys.readouterr()
    assert describe_model(run).iteration == 100
    assert describe_model(run / "checkpoints").iteration == 100
    assert resolve_checkpoint(run).iteration == 100  # what convert and train pick
    err = capsys.readouterr().err
    assert "Skipping checkpoint" in err and "iter_0000200" in err and "CRC32" in err
    # --all-checkpoints skips a damaged one with a warning instead of failing the sweep.
    with open(payload, "r+b") as f:
        f.truncate(100)
    assert [s.iteration for s in resolve_models([], [str(run)])] == [100]
    assert "has 100 bytes, expected 200" in capsys.readouterr().err


def test_output_inside_a_model_being_evaluated_is_refused(hf_dir, tmp_path):
    """Results written into a run's checkpoints dir (or a model dir) went with it when
    checkpoints were pruned or the model was converted again (issue 14, item 4)."""
    from hybrid_megatron.errors import ConfigError
    from hybrid_megatron.eval.runner import run_eval

    run = tmp_path / "run"
    _fake_checkpoint(run, 100)
    (tmp_path / "link").symlink_to(run / "checkpoints")
    for models, out in [
        ([str(run)], run / "checkpoints"),
        ([str(run)], run / "checkpoints" / "iter_0000100" / "eval"),
        ([str(run)], tmp_path / "link" / "eval"),
        ([str(hf_dir)], hf_dir / "eval"),
    ]:
        with pytest.raises(ConfigError, match="Write them to a separate directory"):
            run_eval(_settings(out, models))
        assert not (out / "samples").exists() and not (out / "eval_config.json").exists()


def test_cli_parses_sweeps(tmp_path):
    import argparse

    from hybrid_megatron.commands.eval import add_subcommands as add_eval_subcommands
    from hybrid_megatron.eval.runner import parse_task_options

    parser = argparse.ArgumentParser()
    add_eval_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["eval", "--model", "a,b", "--model", "c", "d", "--lengths", "512,1k,4K"]
        + ["--output", str(tmp_path), "--grid", "--depths", "0,50"]
        + ["--task-option", "num_needle_v=2", "--task-option", "qa_1.qa_path=x.json"]
    )
    assert args.model == [["a,b"], ["c", "d"]] and args.lengths == [512, 1024, 4096]
    assert args.depths == [0.0, 50.0]
    assert parse_task_options(args.task_option) == {"num_needle_v": 2, "qa_1.qa_path": "x.json"}
    assert parser.parse_args(["eval-report", "x", "y"]).dirs == ["x", "y"]


# ------------------------------------------------------------------ padding and lm-eval


@torch.no_grad()
def test_padded_forward_matches_unpadded(hf_dir):
    from hybrid_megatron.hf import HybridMegatronForCausalLM

    model = HybridMegatronForCausalLM.from_pretrained(hf_dir).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (40,), generator=g), torch.randint(0, 256, (25,), generator=g)
    batch = torch.full((2, 40), 257)
    batch[0], batch[1, :25] = a, b
    mask = (batch != 257).long()
    logits = model(batch, attention_mask=mask).logits
    assert (logits[0] - model(a[None]).logits[0]).abs().max() < 1e-5
    assert (logits[1, :25] - model(b[None]).logits[0]).abs().max() < 1e-5
    assert model(batch, attention_mask=mask).past_key_values is None
    with pytest.raises(ValueError, match="cache"):
        model(batch, attention_mask=mask, use_cache=True)
    left = torch.full((2, 40), 257)  # the same rows, padded on the left
    left[0], left[1, 15:] = a, b
    logits = model(left, attention_mask=(left != 257).long()).logits
    assert (logits[1, 15:] - model(b[None]).logits[0]).abs().max() < 1e-5


def test_lm_eval_harness_hf_model(hf_dir, tmp_path):
    import shutil

    import lm_eval  # a dev dependency (lm-eval[hf]): this test must run in CI, not skip
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from hybrid_megatron.eval.generation import greedy_generate
    from hybrid_megatron.eval.lm_eval_adapter import add_byte_tokenizer
    from hybrid_megatron.eval.models import load_eval_model

    assert lm_eval is not None
    model_dir = tmp_path / "with_tokenizer"
    shutil.copytree(hf_dir, model_dir)
    add_byte_tokenizer(model_dir)
    lm = HFLM(pretrained=str(model_dir), trust_remote_code=True, batch_size=2, device="cpu")
    ours, tok, _ = load_eval_model(model_dir, "cpu")
    assert tok.encode("pass key 12") == list(b"pass key 12")  # the HF tokenizer = bytes

    pairs = [("The pass key is", " 123"), ("Hello", " world!"), ("abc", "d")]
    requests = [
        Instance("loglikelihood", {}, pair, i, metadata=("t", i, 1)) for i, pair in enumerate(pairs)
    ]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    for (context, cont), value in zip(pairs, got):
        ids = torch.tensor([tok.encode(context + cont)])
        with torch.no_grad():
            logp = ours(ids).logits.float().log_softmax(-1)[0]
        n = len(cont.encode())
        target = ids[0, -n:]
        expected = float(logp[-n - 1 : -1].gather(1, target[:, None]).sum())
        assert abs(value - expected) < 1e-3

    prompts = ["What is the pass key? The pass key is", "Once upon a time"]
    gen_requests = [
        Instance("generate_until", {}, (p, {"until": ["\n\n\n"], "max_gen_toks": 5}), i)
        for i, p in enumerate(prompts)
    ]
    texts = HFLM(
        pretrained=str(model_dir), trust_remote_code=True, batch_size=2, device="cpu"
    ).generate_until(  # batched: prompts of different lengths, left-padded by lm-eval
        gen_requests
    )
    expected = {
        g.index: g.text
        for b in greedy_generate(ours, tok, [tok.encode(p) for p in prompts], 5)
        for g in b
    }
    assert texts == [expected[0], expected[1]]


def test_progress_eta_weights_samples_by_length(monkeypatch, capsys):
    """One 1000-token sample took 10 s; nine 100-token samples remain: ETA 9 s, not 90 s."""
    from hybrid_megatron.eval import runner

    clock = iter([0.0, 10.0, 10.0, 10.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    progress = runner.Progress([1000] + [100] * 9, every=1, prefix="[eval]")
    progress.update(1, 1000)
    line = capsys.readouterr().out.strip()
    assert line.startswith("[eval] 1/10 samples (10%)") and line.endswith("ETA 0m09s"), line


def test_cpu_threads_for_evaluation(monkeypatch):
    """One thread for small models (bench/bench_threads.py), the node's cores shared by its
    processes for large ones; an explicit request or OMP_NUM_THREADS wins."""
    from hybrid_megatron.eval import runner

    small = torch.nn.Linear(10, 10)
    large = torch.nn.Linear(6000, 6000, device="meta")  # 36M parameters, no memory
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner, "available_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runner.cpu_threads(small, None) == 1
    assert runner.cpu_threads(large, None) == 4
    assert runner.cpu_threads(small, 3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runner.cpu_threads(large, None) == torch.get_num_threads()
