"""Models by name and by Hub id: packaged GGUF files assembled from chunk packages, a Hub cache
laid out by the test, GGUF headers read without conversion, llama.cpp evaluation without torch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit import packaged
from slmkit.packaged import PACKAGED, Packaged


def write_gguf(path: Path, layers: int = 2, hidden: int = 8, vocab: int = 16) -> Path:
    """A small but well-formed llama GGUF: metadata, a tokenizer's tokens and f32 tensors."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_feed_forward_length(16)
    w.add_context_length(64)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_chat_template("{{ messages[0]['content'] }}")
    w.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((hidden, hidden), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def fake_packaged(tmp_path, monkeypatch):
    """A packaged model `tiny-test` split over three chunk packages importable from tmp_path
    (whose __init__ would fail if it ran: it is found, never imported)."""
    blob = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    site = tmp_path / "site"
    names = []
    for i in range(3):
        pkg = site / f"tiny_test_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('package code must never run')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob[cut[i]:cut[i + 1]])
        names.append(f"tiny-test-part{i + 1}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    p = Packaged("tiny-test", "a tiny test GGUF", tuple(names), "1.0", "tiny-test.gguf", len(blob),
                 hashlib.sha256(blob).hexdigest(), "Apache-2.0")
    monkeypatch.setitem(PACKAGED, p.name, p)
    return p


def test_table_is_complete():
    for p in PACKAGED.values():
        assert len(p.sha256) == 64 and p.size > 10**8 and p.packages and p.licence
    assert {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"} <= set(PACKAGED)
    assert "Gemma" in PACKAGED["gemma-3-270m"].licence


def test_assemble_checks_and_info_reads_the_header(fake_packaged, cli):
    code, _, err = cli("info", "tiny-test")
    assert code == 2 and "not installed" in err and "make models" in err
    path, = packaged.install(["tiny-test"], pip=False)
    assert path.read_bytes() == b"".join(f.read_bytes() for f in packaged.chunk_files(fake_packaged))
    code, out, err = cli("info", "tiny-test", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["bytes_on_disk"] == fake_packaged.size and info["layers"] == 2
    assert info["parameters"] == 16 * 8 + 2 * 8 * 8 and info["vocab_size"] == 16
    assert info["heads"] == 2 and info["kv_heads"] == 1 and info["chat_template"] is True
    assert not (Path(os.environ["SLMKIT_CACHE"]) / "gguf").exists()  # nothing converted
    code, out, _ = cli("models", "--json")
    row = next(r for r in json.loads(out) if r["name"] == "tiny-test")
    assert row["installed"] and row["path"] == str(path)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_file_is_refused_and_removed(fake_packaged, cli, damage):
    path, = packaged.install(["tiny-test"], pip=False)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[:-10])
    else:  # same size, one byte changed: only the hash can tell
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        os.utime(path, ns=(1, 1))  # and a modification time that differs from the verified one
    code, out, err = cli("info", "tiny-test")
    assert code == 2 and "was removed" in err and len(err.strip().splitlines()) == 1
    assert not path.exists()


def test_bad_chunks_never_leave_a_file(fake_packaged, monkeypatch, cli):
    bad = Packaged(**{**fake_packaged.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(PACKAGED, "tiny-test", bad)
    code, _, err = cli("models", "install", "tiny-test")
    assert code == 2 and "sha256" in err
    assert not list((Path(os.environ["SLMKIT_CACHE"]) / "models").iterdir())


def test_unknown_name_exits_2(cli):
    code, _, err = cli("models", "install", "no-such-model")
    assert code == 2 and "no-such-model" in err and "qwen2.5-coder-1.5b-instruct" in err


# --------------------------------------------------------------------------- Hub ids

def hub_cache(root: Path, repo: str, model: Path, revision: str = "main") -> Path:
    """A Hugging Face Hub cache as huggingface_hub lays it out, holding `model`'s files."""
    import shutil

    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    shutil.copytree(model, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / revision).write_text(commit)
    return snap


def slm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "slmkit", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_hub_id_from_the_cache_offline(tmp_path, tiny_llama):
    hub_cache(tmp_path / "hub", "TinyOrg/tiny-llama", tiny_llama)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = slm("info", "TinyOrg/tiny-llama", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "LlamaForCausalLM"
    r = slm("info", "TinyOrg/tiny-llama@main", "--json", env=env)
    assert r.returncode == 0, r.stderr
    r = slm("info", "TinyOrg/not-cached", env=env)
    assert r.returncode == 2 and "TinyOrg/not-cached" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- GGUF by header, llama.cpp eval

def test_info_of_a_gguf_converts_nothing(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    from slmkit.models import default_gguf

    code, out, err = cli("info", "default", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["bytes_on_disk"] == default_gguf().stat().st_size
    assert info["layers"] == 30 and info["hidden_size"] == 576 and info["chat_template"]
    assert 130e6 < info["parameters"] < 140e6
    assert not (tmp_path / "cache" / "gguf").exists()


def test_eval_with_llamacpp_never_loads_torch_weights(tmp_path, monkeypatch, cli):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    code, out, err = cli("eval", "default", "--engine", "llamacpp", "--task", "grammar", "--limit", "2",
                         "--max-new-tokens", "8", "--threads", "1", "--out", tmp_path / "rep")
    assert code == 0, err
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())["models"][0]
    assert m["engines"]["generation"] == "llamacpp" and m["prompt"] == "chat template"
    assert not (tmp_path / "cache" / "gguf").exists()  # no float copy was made


def test_model_without_chat_template_gets_the_plain_prompt(tmp_path, tiny_llama, cli):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    code, _, err = cli("eval", tiny_llama, base, "--task", "grammar", "--limit", "2",
                       "--max-new-tokens", "4", "--out", tmp_path / "rep")
    assert code == 0, err
    models = json.loads((tmp_path / "rep" / "metrics.json").read_text())["models"]
    assert [m["prompt"] for m in models] == ["chat template", "plain text"]
    assert "plain-text prompt (no chat template): base" in (tmp_path / "rep" / "report.md").read_text()
