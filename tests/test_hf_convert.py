"""Megatron <-> HF conversion: a TP=2 checkpoint -> HF -> Megatron is bit-exact on every
tensor (compared after loading both at TP=1); HF logits match the TP=2 Megatron model; the
converted directory loads with trust_remote_code where hybrid_megatron is not importable;
refusals leave existing outputs alone.

Megatron runs in spawned gloo processes (it patches torch for CPU); this process only loads
the HF model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests.dist_utils import run_distributed

MODEL = dict(
    # Mamba-2 (2 groups, split by TP), RoPE SWA right after the stage boundary, NoPE full
    # attention, GQA, SwiGLU, tied embeddings; the byte tokenizer's 258 tokens, padded to 512.
    pattern="M-S*-|S-M*-",
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=258,
    seq_length=48,
    full_attention={"rope": False},
    swa={"window": 8, "rope": True, "rope_theta": 10000.0},
    mamba={"state_dim": 8, "head_dim": 16, "num_groups": 2, "expand": 2, "chunk_size": 8},
    tie_embeddings=True,
)
ITERATION, PARTIAL_ITERATION = 5, 9


def _config(tp: int = 1, pp: int = 1, tokenizer: str = "byte", **model):
    from hybrid_megatron.config import RunConfig, from_dict

    data = {"model": {**MODEL, **model}, "parallel": {"tensor": tp, "pipeline": pp}}
    data["data"] = {"tokenizer": tokenizer}
    cfg = from_dict(RunConfig, data)
    if pp == 1:
        cfg.model = dataclasses.replace(cfg.model, pattern=cfg.model.pattern.replace("|", ""))
    cfg.validate()
    return cfg


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_length"]), generator=g)


# ------------------------------------------------------------------ workers (spawned ranks)


def _save_tp2_checkpoint(run_dir: str, tokenizer: str):
    """TP=2: perturb every weight, save a training-style checkpoint, return full logits."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from hybrid_megatron import distributed
    from hybrid_megatron.hf.megatron_io import save_weights_checkpoint
    from hybrid_megatron.model.build import build_model

    cfg = _config(tp=2, tokenizer=tokenizer)
    distributed.initialize(cfg.parallel, seed=1234)
    model = build_model(cfg).eval()
    rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():  # no constant tensors (all-ones norms...): a wrong mapping shows
        for i, p in enumerate(model.parameters()):
            sharded = getattr(p, "tensor_model_parallel", False)  # else replicated: same noise
            g = torch.Generator().manual_seed(1000 * i + (rank if sharded else 0))
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_weights_checkpoint([model], cfg, Path(run_dir), ITERATION)
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand(2, -1), None)
        logits = gather_from_tensor_model_parallel_region(logits.transpose(0, 1)).transpose(0, 1)
    if ps.get_tensor_model_parallel_rank() == 0:
        partial = Path(run_dir) / "checkpoints" / f"iter_{PARTIAL_ITERATION:07d}"
        partial.mkdir()
        (partial / "__0_0.distcp").write_bytes(b"interrupted save")
    return logits[..., : MODEL["vocab_size"]].clone()


def _flat_weights(cfg, ckpt: Path) -> dict[str, torch.Tensor]:
    from hybrid_megatron.hf import megatron_io

    model = megatron_io.build_single_model(cfg)
    megatron_io.load_weights(model, ckpt)
    return {k: v.clone() for k, v in megatron_io.float_state(model).items()}


def _convert_round_trip(root: str):
    """Megatron -> HF -> Megatron in one process, plus CLI verify and a broken mapping."""
    import contextlib
    import io
    import warnings

    from hybrid_megatron.commands.convert import add_subcommands as add_convert_subcommands
    from hybrid_megatron.hf import hf_to_megatron, megatron_io, megatron_to_hf
    from hybrid_megatron.hf import weight_mapping as wm
    from hybrid_megatron.hf.convert import ConversionError

    root = Path(root)
    out: dict = {}
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        out["to_hf"] = megatron_to_hf(
            root / "run", root / "hf", dtype="fp32", max_shard_size="40KB"
        )
    out["warnings"] = [str(w.message) for w in caught] + [stderr.getvalue()]
    out["from_hf"] = hf_to_megatron(root / "hf", root / "back")

    # A model made in HF (no Megatron provenance): untied head, GELU MLP.
    from tests.test_hf_model import tiny_model

    tiny_model(tie_word_embeddings=False, hidden_act="gelu", mlp_gated=False).save_pretrained(
        root / "native"
    )
    out["native"] = hf_to_megatron(root / "native", root / "native_megatron")
    with megatron_io.single_process_megatron():
        cfg = _config(tp=2)
        original = _flat_weights(cfg, Path(out["to_hf"]["checkpoint"]))
        back = _flat_weights(cfg, Path(out["from_hf"]["checkpoint"]))
        out["keys_equal"] = original.keys() == back.keys()
        out["num_tensors"] = len(original)
        out["not_bit_exact"] = [k for k in original if not torch.equal(original[k], back[k])]

        # The CLI's verify on the same pair.
        parser = argparse.ArgumentParser()
        add_convert_subcommands(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["convert", "verify", str(root / "hf"), str(root / "run")])
        out["cli_verify_rc"] = args.func(args)

        # Verification must catch a wrong mapping (k and v swapped) and write nothing.
        good = wm._split_qkv
        wm._split_qkv = lambda w, c: tuple(good(w, c)[i] for i in (0, 2, 1))
        try:
            megatron_to_hf(root / "run", root / "broken", dtype="fp32")
            out["broken_refused"] = False
        except ConversionError as e:
            out["broken_refused"] = "logits differ" in str(e)
        finally:
            wm._split_qkv = good
        out["broken_written"] = (root / "broken").exists()

        # The disk fills up while the weights are written: said so, the old output is kept.
        import errno

        import transformers.modeling_utils as modeling_utils

        def tree() -> dict:
            return {p.name: p.read_bytes() for p in (root / "hf").iterdir()}

        def full_disk(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"part of a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

        before, save = tree(), modeling_utils.safe_save_file
        modeling_utils.safe_save_file = full_disk
        try:
            megatron_to_hf(root / "run", root / "hf", dtype="fp32", overwrite=True)
            out["disk_full"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test checks the type and the message
            out["disk_full"] = f"{type(e).__name__}: {e}"
        finally:
            modeling_utils.safe_save_file = save
        out["disk_full_kept"] = tree() == before
        out["disk_full_leftovers"] = [p.name for p in root.iterdir() if p.name.startswith(".")]
    return out


# ------------------------------------------------------------------ fixtures


def _write_tokenizer(path: Path) -> None:
    """A tiny local word-level HF tokenizer (no download); <eos> is id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>", "<pad>"])
    tok.train_from_iterator(["the pass key is", "hello world"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfconv")
    _write_tokenizer(root / "tokenizer")
    tp2_logits = run_distributed(
        _save_tp2_checkpoint, 2, str(root / "run"), str(root / "tokenizer")
    )[0]
    result = run_distributed(_convert_round_trip, 1, str(root))[0]
    return root, tp2_logits, result


# ------------------------------------------------------------------ tests


def test_round_trip_is_bit_exact_and_verified(converted):
    root, _, r = converted
    assert r["keys_equal"] and r["num_tensors"] >= 30
    assert r["not_bit_exact"] == []
    for report in (r["to_hf"], r["from_hf"]):
        assert report["verify"]["ok"] and report["verify"]["max_abs_diff"] <= 1e-4
        assert report["verify"]["top1_agreement"] == 1.0
    assert r["cli_verify_rc"] == 0
    native = r["native"]["verify"]
    assert native["ok"] and native["max_abs_diff"] <= 1e-4 and native["top1_agreement"] == 1.0
    native_config = yaml.safe_load(
        (Path(r["native"]["checkpoint"]) / "run_config.yaml").read_text()
    )
    assert native_config["model"]["activation"] == "gelu"
    assert native_config["model"]["tie_embeddings"] is False
    assert r["broken_refused"] and not r["broken_written"]
    # Sharded safetensors with an index, config with the layer types, generation config.
    hf = root / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((hf / "config.json").read_text())
    assert config["layer_types"][:4] == ["mamba", "mlp", "sliding_attention", "full_attention"]
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_hybrid_megatron.")
    assert config["megatron"]["iteration"] == ITERATION
    assert config["vocab_size"] == 512
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == 1
    assert (hf / "tokenizer.json").is_file()  # the run's HF tokenizer ships with the model
    back = Path(r["from_hf"]["checkpoint"])
    assert back.name == f"iter_{ITERATION:07d}" and (back / "hm_complete.json").is_file()
    source = Path(r["to_hf"]["checkpoint"])
    run_config, source_config = (
        yaml.safe_load((d / "run_config.yaml").read_text()) for d in (back, source)
    )
    assert run_config["model"] == source_config["model"]
    assert run_config["parallel"] == source_config["parallel"]


def test_disk_full_during_conversion_says_so(converted):
    """A full disk (ENOSPC while writing the weights) gave a bare OSError saying nothing about
    what was kept or how much space was needed (issue 14, item 12)."""
    _, _, r = converted
    message = r["disk_full"]
    assert message.startswith("DiskFullError: ") and "no space left on device" in message
    assert re.search(r"about [\d.]+ (KB|MB) needed, [\d.]+ \w+ free there now", message)
    assert "the existing" in message and "was kept unchanged" in message
    assert r["disk_full_kept"] and r["disk_full_leftovers"] == []


def test_newest_partial_checkpoint_is_skipped_with_a_warning(converted):
    _, _, r = converted
    assert r["to_hf"]["iteration"] == ITERATION
    assert any(f"iter_{PARTIAL_ITERATION:07d}" in w for w in r["warnings"])


@torch.no_grad()
def test_hf_logits_match_tp2_megatron(converted):
    from hybrid_megatron.hf import HybridMegatronForCausalLM

    root, tp2_logits, _ = converted
    model = HybridMegatronForCausalLM.from_pretrained(root / "hf").eval()
    assert next(model.parameters()).dtype == torch.float32
    logits = model(_tokens()).logits[..., : MODEL["vocab_size"]]
    assert (logits - tp2_logits).abs().max() <= 1e-4


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
    sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != REPO]  # (a venv may live inside)
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("hybrid_megatron") is None, "package still importable"
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer
    from transformers import __version__ as transformers_version
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True).eval()
    eos = AutoTokenizer.from_pretrained(HF_DIR, trust_remote_code=True).eos_token_id
    tokens = torch.tensor(json.loads(TOKENS))
    config = model.generation_config

    def by_full_forwards(ids, steps, eos):
        # Greedy decoding with one uncached full forward per token; rows stop at EOS.
        seq, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, config.pad_token_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == eos
            if done.all():
                break
        return seq.tolist()

    checks = []
    with torch.no_grad():
        logits = model(tokens).logits
        for batch in (1, 2):
            for length in (WINDOW - 3, 3 * WINDOW + 2):  # shorter / longer than the window
                ids = tokens[:batch, :length]
                generated = model.generate(ids, max_new_tokens=10)  # default generation config
                # An EOS the model emits mid-way (row 0, 4th new token) must stop that row.
                early = generated[0, length + 3].item()
                stopped = model.generate(ids, max_new_tokens=10, eos_token_id=early)
                checks.append({
                    "batch": batch, "length": length,
                    "generated": generated.tolist(), "reference": by_full_forwards(ids, 10, eos),
                    "stopped": stopped.tolist(), "stopped_ref": by_full_forwards(ids, 10, early),
                })
    model.save_pretrained("resaved")  # a remote-code model ships its own sources again
    import os
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(),
                      "checks": checks, "eos": eos, "do_sample": config.do_sample,
                      "config_eos": config.eos_token_id, "transformers": transformers_version,
                      "resaved": sorted(f for f in os.listdir("resaved") if f.endswith(".py"))}))
    """
)


@torch.no_grad()
def test_converted_dir_loads_with_remote_code_without_the_package(converted, tmp_path):
    from hybrid_megatron.hf import HybridMegatronForCausalLM

    root, tp2_logits, _ = converted
    repo = str(Path(__file__).resolve().parents[1])
    tokens = _tokens()
    header = f"REPO = {repo!r}\nHF_DIR = {str(root / 'hf')!r}\nWINDOW = {MODEL['swa']['window']}\n"
    header += f"TOKENS = {json.dumps(tokens.tolist())!r}\n"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", header + REMOTE_SCRIPT],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["eos"] == 1
    assert result["resaved"] == sorted(p.name for p in (root / "hf").glob("*.py"))
    assert (tmp_path / "resaved" / "ssd.py").read_text() == (root / "hf" / "ssd.py").read_text()
    logits = torch.tensor(result["logits"])[..., : MODEL["vocab_size"]]
    assert (logits - tp2_logits).abs().max() <= 1e-4
    # Greedy generate() under the default generation config (greedy, EOS 1) equals decoding
    # by repeated full forwards, for prompts shorter and longer than the window, batch 1 and 2.
    assert not result["do_sample"] and result["config_eos"] == 1
    assert len(result["checks"]) == 4
    for check in result["checks"]:
        assert check["generated"] == check["reference"], (check["batch"], check["length"])
        assert check["stopped"] == check["stopped_ref"], (check["batch"], check["length"])
        assert check["stopped"][0] != check["generated"][0]  # row 0 stopped at the early EOS
    local = HybridMegatronForCausalLM.from_pretrained(root / "hf").eval()
    expected = local.generate(tokens[:2, : result["checks"][-1]["length"]], max_new_tokens=10)
    assert result["checks"][-1]["generated"] == expected.tolist()


# ------------------------------------------------------------------ refusals


def _fake_checkpoint(run_dir: Path, pattern: str = "M-*-", **model) -> Path:
    """A complete-looking checkpoint directory (marker, config, one payload file)."""
    from hybrid_megatron.checkpoint.layout import write_complete_marker
    from hybrid_megatron.config import RunConfig, from_dict, to_dict

    ckpt = run_dir / "checkpoints" / "iter_0000003"
    ckpt.mkdir(parents=True)
    cfg = from_dict(RunConfig, {"model": {**MODEL, "pattern": pattern, **model}})
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 200)
    (ckpt / "run_config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    write_complete_marker(ckpt, 3, {}, checksums=False)
    return ckpt


@pytest.fixture
def existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def _untouched(out: Path) -> bool:
    names = [p.name for p in out.iterdir()]
    return names == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def _no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_refuses_partial_and_truncated_checkpoints(tmp_path, existing_output):
    from hybrid_megatron.checkpoint.layout import CheckpointError
    from hybrid_megatron.hf import megatron_to_hf

    ckpt = _fake_checkpoint(tmp_path / "run")
    with open(ckpt / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp has 100 bytes, expected 200"):
        megatron_to_hf(ckpt, existing_output, overwrite=True)
    (ckpt / "hm_complete.json").unlink()
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        megatron_to_hf(ckpt, existing_output, overwrite=True)
    with pytest.raises(CheckpointError, match="No complete checkpoint"):
        megatron_to_hf(tmp_path / "run", existing_output, overwrite=True)
    assert _untouched(existing_output) and _no_leftovers(tmp_path)


def test_refuses_moe_and_existing_output(tmp_path, existing_output):
    from hybrid_megatron.errors import ConfigError
    from hybrid_megatron.hf import hf_to_megatron, megatron_to_hf
    from hybrid_megatron.hf.staging import OutputExistsError

    moe = _fake_checkpoint(tmp_path / "moe", pattern="M-S*E", num_moe_experts=4)
    with pytest.raises(ConfigError, match=r"MoE \('E'\) layers \(layer numbers \[5\]\)"):
        megatron_to_hf(moe, tmp_path / "new")
    dense = _fake_checkpoint(tmp_path / "dense")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        megatron_to_hf(dense, existing_output)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "hybrid_megatron"}))
    with pytest.raises(OutputExistsError):
        hf_to_megatron(hf_dir, existing_output)
    (hf_dir / "config.json").write_text(
        json.dumps({"model_type": "hybrid_megatron", "layer_types": ["mamba", "moe"]})
    )
    with pytest.raises(ConfigError, match="moe"):
        hf_to_megatron(hf_dir, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert _untouched(existing_output) and _no_leftovers(tmp_path)


def test_cli_reports_refusals(tmp_path, existing_output):
    from hybrid_megatron.commands.convert import add_subcommands as add_convert_subcommands
    from hybrid_megatron.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_convert_subcommands(parser.add_subparsers(dest="command", required=True))
    dense = _fake_checkpoint(tmp_path / "dense")
    for argv in (
        ["convert", "to-hf", str(dense), str(existing_output), "--dtype", "fp32"],
        ["convert", "from-hf", str(tmp_path / "nothing"), str(tmp_path / "new")],
        ["convert", "verify", str(tmp_path / "nothing"), str(tmp_path / "run")],
    ):
        args = parser.parse_args(argv)
        with pytest.raises(ConfigError):
            args.func(args)
    assert _untouched(existing_output)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_refuses_output_that_is_contains_or_lies_inside_its_source(tmp_path):
    """`convert to-hf runs/X runs/X --overwrite` used to replace the whole run, and converting
    an iter dir into its checkpoints/ dir deleted every checkpoint (issue 14, item 4)."""
    from hybrid_megatron.hf import hf_to_megatron, megatron_to_hf
    from hybrid_megatron.hf.convert import _check_separate_from_checkpoints
    from hybrid_megatron.hf.staging import OutputOverlapsSourceError

    run = tmp_path / "run"
    ckpt = _fake_checkpoint(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "data").mkdir()
    (run / "data" / "train.bin").write_bytes(b"tokens")
    (tmp_path / "link").symlink_to(run / "checkpoints")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "hybrid_megatron"}))
    before = _tree(tmp_path)
    for source, output in [
        (run, run),  # is the run dir
        (run, tmp_path),  # contains it
        (run, run / "data"),  # an existing non-HF dir inside the run
        (run / "checkpoints", run / "checkpoints"),
        (ckpt, run / "checkpoints"),  # contains the checkpoint
        (ckpt, ckpt),
        (ckpt, ckpt / "hf"),  # inside it
        (ckpt, run / "checkpoints" / "iter_0000009"),  # inside the checkpoints dir
        (run, tmp_path / "link"),  # a symlink to the checkpoints dir
        (tmp_path / "link" / ckpt.name, run / "checkpoints" / "new"),  # source via a symlink
        (run, tmp_path / "link" / ".."),  # `..` after a symlink: the run dir
    ]:
        with pytest.raises(OutputOverlapsSourceError, match="--overwrite does not lift"):
            megatron_to_hf(source, output, overwrite=True)
    with pytest.raises(OutputOverlapsSourceError, match="the source Hugging Face directory"):
        hf_to_megatron(hf_dir, hf_dir, overwrite=True)
    with pytest.raises(OutputOverlapsSourceError, match="lies inside"):
        hf_to_megatron(hf_dir, hf_dir / "megatron", overwrite=True)
    assert _tree(tmp_path) == before
    # Allowed: a new dir, or an earlier HF output, beside the checkpoints in the run dir.
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    for output in (run / "hf", run / "hf2", tmp_path / "elsewhere"):
        _check_separate_from_checkpoints(output, run, ckpt.parent)


_KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from hybrid_megatron.hf.staging import staged_output

with staged_output(Path(sys.argv[1])) as tmp:
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_rerun_removes_staging_dirs_of_killed_conversions_only(tmp_path, capsys):
    """A SIGKILLed `convert` left its temp dir beside the output and reruns never removed it
    (issue 14, item 6)."""
    import socket

    from hybrid_megatron.hf.staging import staged_output

    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_CONVERSION, str(out)], env=env)
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    assert len(left) == 1 and (left[0] / "model-00001-of-00002.safetensors").is_file()
    dead = int(left[0].name.split("-")[-2])  # the killed process's pid
    host = socket.gethostname()
    kept = [  # everything a rerun must leave alone
        tmp_path / f".hf.tmp-{host}-{os.getpid()}-0123abcd",  # a live conversion's
        tmp_path / f".hf.tmp-otherhost-{dead}-0123abcd",  # another host's
        tmp_path / ".hf.tmp-0123abcd",  # an unknown format
        tmp_path / f".hf2.tmp-{host}-{dead}-0123abcd",  # another output's
        tmp_path / "hf.tmp-data",
    ]
    for path in kept:
        path.mkdir()
        (path / "keep").write_text("x")
    (tmp_path / f".hf.tmp-{host}-{dead}-0123abcf").write_text("a file, not a staging dir")
    kept.append(tmp_path / f".hf.tmp-{host}-{dead}-0123abcf")
    # A previous output moved aside by a conversion killed while replacing it comes back.
    moved = tmp_path / f".hf.old-{host}-{dead}-0123abce"
    moved.mkdir()
    (moved / "config.json").write_text("{}")
    capsys.readouterr()
    with staged_output(out, overwrite=True) as tmp:
        assert not left[0].exists() and (out / "config.json").is_file()
        (tmp / "config.json").write_text('{"new": 1}')
    assert (out / "config.json").read_text() == '{"new": 1}'
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")) == sorted(
        p.name for p in kept if p.name.startswith(".hf.")
    )
    err = capsys.readouterr().err
    assert f"Removed {left[0]}" in err and "killed conversion" in err and "Restored" in err


def test_disk_full_is_recognised_through_wrapping_writers(tmp_path):
    """torch's distributed checkpoint writer (from-hf) wraps the OSError of a full disk."""
    import errno

    from hybrid_megatron.errors import DiskFullError
    from hybrid_megatron.hf.staging import staged_output

    full = r"about 2\.0 MB needed, .* free there now"
    with (
        pytest.raises(DiskFullError, match=full),
        staged_output(tmp_path / "out", needed_bytes=2_000_000) as tmp,
    ):
        (tmp / "part").write_bytes(b"x")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            raise RuntimeError("saving the checkpoint failed") from err
    assert list(tmp_path.iterdir()) == []  # nothing at the target, no staging dir left
