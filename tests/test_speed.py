"""Cost measurement: the arithmetic of the reported figures by hand, and one real measurement of a
tiny model in its own process (no timed assertions: only that figures exist and add up)."""

import numpy as np
import pytest

from slmkit import speed

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """One tiny model (the shared fixture builds six architectures)."""
    from conftest import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("speed") / "llama")


KEYS = {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "latency_p50_s", "latency_p95_s",
        "energy_j_per_token", "peak_rss_bytes", "parameters", "bytes_on_disk"}


def test_percentile_matches_numpy():
    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 50, 95, 100):
        assert speed.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_summarize_hand_computed():
    # three requests with a 10-token prompt and 5 new tokens (first + 4 decode steps)
    out = speed.summarize([0.1, 0.2, 0.3], [[0.01] * 4, [0.02] * 4, [0.01, 0.01, 0.02, 0.02]], 10)
    assert out["ttft_s"] == pytest.approx(0.2)                  # median first-token time
    assert out["prefill_tokens_per_s"] == pytest.approx(50.0)   # 10 tokens / 0.2 s
    assert out["decode_tokens_per_s"] == pytest.approx(4 / 0.06)  # median of 100, 50, 66.7
    # latencies 0.14, 0.28, 0.36: p50 = 0.28, p95 = 0.28 + 0.9 * 0.08
    assert out["latency_p50_s"] == pytest.approx(0.28)
    assert out["latency_p95_s"] == pytest.approx(0.352)


def test_energy_estimate_counts_cpu_seconds(monkeypatch):
    meter = speed.EnergyMeter()
    meter.files, meter.estimated = [], True  # force the estimate, whatever this machine exposes
    meter.start()
    sum(i * i for i in range(300_000))
    assert meter.stop() > 0


def test_greedy_counts_steps(tiny_llama):
    import torch

    from slmkit import models

    model, tok = models.load_model(tiny_llama)
    ids = tok(["Can you send me the report before the meeting?", "Thanks for your message!"],
              return_tensors="pt", padding=True, padding_side="right")["input_ids"]
    ids[1][ids[1] == tok.pad_token_id] = ids[1, 0]  # two rows of real tokens, no mask needed
    # the token each forward pass picks (argmax of its last position): what _greedy decodes
    picked = []
    hook = model.register_forward_hook(lambda m, a, out: picked.append(out.logits[:, -1].argmax(-1)))
    try:
        first, steps = speed._greedy(model, ids, 6)
    finally:
        hook.remove()
    assert first > 0 and len(steps) == 5 and all(s > 0 for s in steps)
    # the same tokens as transformers' greedy generate, so each step really decodes with the cache
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                              pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert torch.stack(picked, 1).tolist() == expected.tolist()
    assert len(set(expected[0].tolist())) > 1  # a prompt whose continuation is not one token repeated


def test_measure_in_subprocess(tiny_llama, capsys):
    from slmkit import models

    out = speed.measure_in_subprocess(tiny_llama, prompt_tokens=16, new_tokens=4, requests=2, batch=2)
    # the child's progress bar (warm-up, 2 requests, the batch: 4 runs) is relayed to our
    # stderr; which frames it draws depends on the machine's speed, its total does not
    err = capsys.readouterr().err
    assert "speed:" in err and "/4 [" in err
    assert KEYS <= set(out) and out["engine"] == "torch"
    assert out["parameters"] == models.describe(tiny_llama)["parameters"]
    assert out["peak_rss_bytes"] >= out["baseline_rss_bytes"] > 0
    assert out["latency_p95_s"] >= out["latency_p50_s"] > out["ttft_s"] > 0
    assert out["batched_decode_tokens_per_s"] > 0 and out["batch"] == 2
    assert out["energy_estimated"] == (out["watts_per_core_assumed"] is not None)


def test_llamacpp_engine(tiny_llama, tmp_path):
    pytest.importorskip("llama_cpp")
    export = pytest.importorskip("slmkit.export")
    gguf = export.export_gguf(str(tiny_llama), tmp_path / "tiny.gguf", "f16")
    out = speed.measure(gguf, engine="llamacpp", prompt_tokens=16, new_tokens=4, requests=2)
    assert KEYS <= set(out) and out["decode_tokens_per_s"] > 0
    assert out["bytes_on_disk"] == gguf.stat().st_size
    # llama.cpp was given one thread per usable core, for prompt and decode alike, and says so
    assert out["threads"] == out["cores"] == speed.usable_cores()
    assert out["load_average"] >= 0


def test_llamacpp_threads_follow_the_usable_cores(tiny_llama, tmp_path, monkeypatch):
    """The count comes from usable_cores (a container's CPU set), not llama-cpp-python's default
    of half the host's CPUs for decoding: with 3 usable cores both its counts are 3."""
    pytest.importorskip("llama_cpp")
    export = pytest.importorskip("slmkit.export")
    gguf = export.export_gguf(str(tiny_llama), tmp_path / "tiny.gguf", "f16")
    monkeypatch.setattr(speed, "usable_cores", lambda: 3)
    out = speed.measure(gguf, engine="llamacpp", prompt_tokens=8, new_tokens=2, requests=1)
    assert out["threads"] == out["cores"] == 3


def test_llamacpp_missing_is_a_clear_error(monkeypatch):
    import builtins

    from slmkit.errors import UsageError

    real = builtins.__import__

    def no_llama(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(UsageError, match="llama-cpp-python"):
        speed.require_llamacpp()
