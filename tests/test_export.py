"""`slm export`: GGUF files that llama.cpp and transformers read back as the same model.

llama.cpp parity runs on copies of the tiny fixtures (llama, mistral, qwen2, qwen3, phi, phi3)
trained for a few steps to continue one text: a random model's top-2 logits are often within
0.001 of each other, so any rounding flips its greedy path, while a trained model makes decisions
with a margin (here > 1), as real models do.
Tolerances, llama.cpp against transformers in f32 (what the fixtures gave when written):
- f32: cosine >= 0.999 between the logit vectors at every position (measured >= 0.999998);
  max |logit diff| < 0.05 (measured 0.005-0.013, logits spanning about -8..13).
- f16: the same 32 greedy tokens; max |logit diff| < 0.1 (measured 0.013-0.021; 0.03-0.04 on
  the first fixtures).
- q8_0: the same 32 greedy tokens; max |logit diff| < 2.0 and mean < 0.15 (measured 0.8-1.1 and
  0.05-0.06).
- f32 read back by transformers' GGUF loader: max |logit diff| < 1e-4.
"""

import json

import numpy as np
import pytest
import torch

from slmkit import archs, models
from slmkit.export import export_gguf, rotary_permute

ARCHS = archs.EXPORTABLE
TEXTS = ["Summarize the conversation between the two friends.",
         "numbers 0 1 22 333 and punctuation , . ! ? \"quoted\" (x) - #",
         "  two spaces\nnew line\n\n tabs\tend",
         "Grammar correction: he have three cat."]
CPP_F32_TOL, MIN_COSINE = 0.05, 0.999
F16_TOL, Q8_TOL, Q8_MEAN_TOL, F32_TOL = 0.1, 2.0, 0.15, 1e-4
N_NEW = 32


@pytest.fixture(scope="module")
def gguf_files(tiny_models, tmp_path_factory):
    """(arch, quant) -> exported file, made on first use."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(arch, quant):
        if (arch, quant) not in made:
            made[arch, quant] = export_gguf(tiny_models[arch], root / arch / f"{arch}.{quant}.gguf", quant)
        return made[arch, quant]
    return get


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """arch -> (folder, prompt ids): the fixture trained to continue its prompt with CORPUS text."""
    pytest.importorskip("llama_cpp")
    from conftest import CORPUS

    root = tmp_path_factory.mktemp("trained")
    made = {}

    def get(arch):
        if arch not in made:
            model, tok = models.load_model(tiny_models[arch])
            ids = prompt_ids(tok)
            x = torch.tensor([ids + tok(" ".join(CORPUS)).input_ids[:N_NEW + 4]])
            torch.manual_seed(0)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            model.train()
            for _ in range(30):
                model(x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
            made[arch] = models.save_model(model.eval(), tok, root / arch), ids
        return made[arch]
    return get


def prompt_ids(tok) -> list[int]:
    chat = tok.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(chat).input_ids


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


# --------------------------------------------------------------------------- without llama.cpp

def test_rotary_permute_turns_rotate_half_into_adjacent_pairs():
    """HF rope rotates (i, i + d/2); llama.cpp's llama graph rotates (2i, 2i + 1). Permuting the
    projection rows must commute with rope: permute(rope_hf(q)) == rope_pairs(permute(q))."""
    heads, d, pos = 3, 8, 5.0
    theta = pos / 10000.0 ** (np.arange(d // 2) * 2 / d)
    cos, sin = np.cos(theta), np.sin(theta)
    q = np.random.default_rng(0).normal(size=(heads * d, 7))  # a projection weight [rows, in]

    def rope_hf(x):
        x = x.reshape(heads, d, -1)
        a, b = x[:, : d // 2], x[:, d // 2:]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=1).reshape(heads * d, -1)

    def rope_pairs(x):
        x = x.reshape(heads, d // 2, 2, -1)
        a, b = x[:, :, 0], x[:, :, 1]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.stack([a * c - b * s, b * c + a * s], axis=2).reshape(heads * d, -1)

    assert np.allclose(rotary_permute(rope_hf(q), heads), rope_pairs(rotary_permute(q, heads)))
    assert not np.allclose(rotary_permute(q, heads), q)


def test_metadata_tensors_and_modelfile(gguf_files, tiny_models, tokenizer):
    from gguf import GGMLQuantizationType as Q, GGUFReader

    from conftest import CHAT_TEMPLATE

    path = gguf_files("llama", "q8_0")
    r = GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    assert (f["general.architecture"], f["llama.block_count"], f["llama.embedding_length"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"],
            f["llama.attention.head_count_kv"], f["llama.context_length"], f["llama.vocab_size"],
            f["general.file_type"]) == ("llama", 4, 32, 64, 4, 2, 128, cfg["vocab_size"], 7)
    assert f["llama.rope.freq_base"] == 10000.0 and f["llama.rope.dimension_count"] == 8
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"] and f["tokenizer.ggml.merges"]
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False  # the fixture tokenizer adds no BOS
    assert f["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == 3  # CONTROL
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE

    types = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert len(types) == 1 + 4 * 9 + 1
    assert types["blk.3.attn_norm.weight"] == Q.F32 and types["output_norm.weight"] == Q.F32
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q8_0

    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{ .Content }}<|im_end|>" in modelfile
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", path.name]  # no temp files


def test_q4_0_keeps_output_q8_0_and_qwen2_biases(gguf_files):
    from gguf import GGMLQuantizationType as Q, GGUFReader

    pytest.importorskip("llama_cpp")
    types = {t.name: t.tensor_type for t in GGUFReader(str(gguf_files("mistral", "q4_0"))).tensors}
    # 32-wide rows are not whole 256-value super-blocks, so llama.cpp keeps the output in Q8_0
    assert types["output.weight"] == Q.Q8_0 and types["blk.2.ffn_down.weight"] == Q.Q4_0
    assert types["token_embd.weight"] == Q.Q4_0
    r = GGUFReader(str(gguf_files("qwen2", "f16")))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert types["blk.0.attn_q.bias"] == Q.F32 and types["blk.0.attn_v.weight"] == Q.F16


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3"])
def test_transformers_reads_f32_back(arch, gguf_files, tiny_models, tmp_path, monkeypatch):
    """transformers' GGUF loader undoes our permutation (and splits phi3's fused tensors)
    independently; the logits must agree (the llama case is
    tests/test_models.py::test_gguf_converted_once_and_cached). Not qwen3: transformers' qwen3
    loader ignores attention.key_length and assumes head_dim 128, real Qwen3's, not the
    fixture's 8; phi2: it has no phi2 loader."""
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    ref, tok = models.load_model(tiny_models[arch])
    back, tok_back = models.load_model(gguf_files(arch, "f32"))
    ids = prompt_ids(tok)
    assert tok_back(TEXTS[1]).input_ids == tok(TEXTS[1]).input_ids
    assert np.abs(hf_logits(ref, ids) - hf_logits(back, ids)).max() < F32_TOL


def test_unsupported_arch_exits_2(cli, tmp_path):
    """GPT-2 stays unsupported (its own llama.cpp graph, Conv1D weights): one line, nothing written."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from conftest import make_tokenizer

    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=128)
    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out" / "gpt2.gguf"
    code, _, err = cli("export", folder, "--quant", "q4_k_m", "--out", out)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "gpt2" in err and f"supported: {', '.join(archs.EXPORTABLE)}" in err
    assert not (tmp_path / "out").exists()


def test_every_architecture_prune_makes_exports():
    assert set(archs.PRUNABLE) <= set(archs.EXPORTABLE)


def test_phi_and_phi3_layout(gguf_files, tiny_models):
    """Phi-2: LayerNorm with biases, an lm_head bias, partial rotary; Phi-3: its fused qkv and
    gate_up kept fused, as llama.cpp's phi3 graph reads them; Qwen3: per-head q/k norms."""
    from gguf import GGMLQuantizationType as Q, GGUFReader

    r = GGUFReader(str(gguf_files("phi", "f16")))
    f = {k: v.contents() for k, v in r.fields.items()}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # ggml order: row first
    assert f["general.architecture"] == "phi2" and f["phi2.rope.dimension_count"] == 4  # 0.5 x 8
    assert abs(f["phi2.attention.layer_norm_epsilon"] - 1e-5) < 1e-9
    assert {"output.bias", "output_norm.bias", "blk.0.attn_norm.bias", "blk.0.attn_q.bias",
            "blk.0.attn_output.bias", "blk.0.ffn_up.bias", "blk.0.ffn_down.bias"} <= set(shapes)
    assert shapes["blk.0.ffn_up.weight"] == (32, 64) and "blk.0.ffn_norm.weight" not in shapes

    r = GGUFReader(str(gguf_files("phi3", "f16")))
    f = {k: v.contents() for k, v in r.fields.items()}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}
    assert f["general.architecture"] == "phi3" and f["phi3.feed_forward_length"] == 64
    assert f["general.name"] == "phi 3"  # "phi3" would switch on llama.cpp's SentencePiece quirks
    assert shapes["blk.0.attn_qkv.weight"] == (32, 32 + 2 * 16)  # q, then 2 kv heads of 8 each
    assert shapes["blk.0.ffn_up.weight"] == (32, 2 * 64)  # gate and up, fused
    assert not any(n.endswith(".bias") for n in shapes)

    types = {t.name: t.tensor_type for t in GGUFReader(str(gguf_files("qwen3", "f16"))).tensors}
    assert types["blk.0.attn_q_norm.weight"] == Q.F32 and types["blk.3.attn_k_norm.weight"] == Q.F32
    assert types["output.weight"] == Q.F16


def test_bad_out_name_exits_2(cli, tiny_models, tmp_path):
    code, _, err = cli("export", tiny_models["llama"], "--out", tmp_path / "model.bin")
    assert code == 2 and ".gguf" in err


# --------------------------------------------------------------------------- with llama.cpp

def test_llamacpp_tokenizes_like_transformers(gguf_files, tokenizer):
    llm = llama(gguf_files("llama", "f16"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text).input_ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer(chat).input_ids
    llm.close()


def parity(folder, ids, quant, tmp_path):
    """(llama.cpp greedy, transformers greedy, llama.cpp logits, transformers logits), the logits
    over the transformers greedy sequence."""
    model, tok = models.load_model(folder)
    llm = llama(export_gguf(folder, tmp_path / f"m.{quant}.gguf", quant))
    try:
        for text in TEXTS:  # every family's file tokenises as transformers does
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids
        new = hf_greedy(model, ids, N_NEW)
        got = cpp_greedy(llm, ids, N_NEW)
        logits = cpp_logits(llm, ids + new), hf_logits(model, ids + new)
    finally:
        llm.close()
    return got, new, *logits


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_f32_logits_match_transformers(arch, trained, tmp_path):
    _, _, cpp, hf = parity(*trained(arch), "f32", tmp_path)
    cosine = (cpp * hf).sum(-1) / np.linalg.norm(cpp, axis=-1) / np.linalg.norm(hf, axis=-1)
    assert cosine.min() >= MIN_COSINE, f"{arch}: cosine {cosine.min():.6f} at {cosine.argmin()}"
    assert np.abs(cpp - hf).max() < CPP_F32_TOL, f"{arch}: max |logit diff| {np.abs(cpp - hf).max():.4f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_f16_matches_transformers(arch, trained, tmp_path):
    got, new, cpp, hf = parity(*trained(arch), "f16", tmp_path)
    assert got == new
    assert np.abs(cpp - hf).max() < F16_TOL, f"{arch}: max |logit diff| {np.abs(cpp - hf).max():.4f}"


def test_llamacpp_q8_0_stays_close(trained, tmp_path):
    got, new, cpp, hf = parity(*trained("llama"), "q8_0", tmp_path)
    diff = np.abs(cpp - hf)
    assert got == new
    assert diff.max() < Q8_TOL and diff.mean() < Q8_MEAN_TOL, (diff.max(), diff.mean())


def llamacpp_quantize(src, dst, ftype: int) -> None:
    """Quantise `src` with llama.cpp's own quantizer (what `llama-quantize` runs)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                          ctypes.byref(params)) == 0


def test_q8_0_bytes_equal_llamacpp_quantizer(gguf_files, tmp_path):
    # The strongest check of our Q8_0 writer: llama.cpp, quantising our f32 export itself, writes
    # the very same bytes for every tensor. (So where q8_0 greedy output drifts from transformers,
    # that is llama.cpp's 8-bit arithmetic, not our file.)
    from gguf import GGUFReader

    theirs = tmp_path / "cpp.q8_0.gguf"
    llamacpp_quantize(gguf_files("llama", "f32"), theirs, ftype=7)  # LLAMA_FTYPE_MOSTLY_Q8_0
    ours = {t.name: t for t in GGUFReader(str(gguf_files("llama", "q8_0"))).tensors}
    cpp = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    assert set(ours) == set(cpp)
    quantised = [n for n, t in ours.items() if t.tensor_type.name == "Q8_0"]
    assert len(quantised) >= 7  # every 2-D weight of the fixture's layers
    for name, t in ours.items():
        assert t.tensor_type == cpp[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(cpp[name].data)), name


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A 1-layer llama whose rows are 256 wide: whole K-quant super-blocks, as in real models."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("wide") / "llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_q4_0_and_k_quants_follow_llamacpp_rules(wide_llama, tmp_path):
    # llama-quantize stores the output projection of a q4_0 model in Q6_K when its rows are
    # whole 256-value blocks; our own q4_0 writer kept Q8_0 there, so its bytes differed
    from gguf import GGMLQuantizationType as Q, GGUFReader

    pytest.importorskip("llama_cpp")
    types = {}
    for quant in ("q4_0", "q4_k_m", "q6_k"):
        path = export_gguf(wide_llama, tmp_path / quant / f"m.{quant}.gguf", quant)
        types[quant] = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
        assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", path.name]
    assert types["q4_0"]["output.weight"] == Q.Q6_K
    assert types["q4_0"]["blk.0.attn_q.weight"] == Q.Q4_0
    assert types["q4_k_m"]["blk.0.attn_q.weight"] == Q.Q4_K
    assert types["q4_k_m"]["blk.0.ffn_down.weight"] == Q.Q6_K  # the _m mix: some layers one up
    assert types["q6_k"]["blk.0.attn_q.weight"] == Q.Q6_K
    assert types["q6_k"]["blk.0.attn_norm.weight"] == Q.F32


def test_llamacpp_quants_need_llama_cpp(tiny_llama, tmp_path, monkeypatch, cli):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    code, _, err = cli("export", tiny_llama, "--quant", "q4_k_m", "--out", tmp_path / "m.gguf")
    assert code == 2 and "llama-cpp-python" in err and not list(tmp_path.iterdir())


def test_k_quant_fallbacks_are_summarised(cli, tiny_models, wide_llama, tmp_path):
    # 32- and 64-value rows are not whole 256-value super-blocks: llama.cpp keeps every matrix of
    # the tiny mistral (4 layers x 7, embedding, output) in a legacy type, and we say so
    pytest.importorskip("llama_cpp")
    code, out, _ = cli("export", tiny_models["mistral"], "--quant", "q4_k_m", "--out", tmp_path / "a" / "m.gguf")
    assert code == 0
    line = [s for s in out.splitlines() if "kept in" in s]
    assert line and "30 tensors kept in" in line[0] and "rows of 32, 64 values" in line[0], out
    code, out, _ = cli("export", wide_llama, "--quant", "q5_k_m", "--out", tmp_path / "b" / "m.gguf")
    assert code == 0 and "kept in" not in out


@pytest.mark.slow  # 13 s on a quiet 2-core machine, 29 s on a busy one
def test_default_q4_k_m_generates_in_llamacpp(cli, tmp_path):
    """The embedded SmolLM2-135M in Q4_K_M: llama.cpp's file type 15, K-quant tensors where the
    rows allow (its 576-wide ones fall back, and the summary says so), and it generates."""
    from gguf import GGMLQuantizationType as Q, GGUFReader

    pytest.importorskip("llama_cpp")
    path = tmp_path / "smollm2.q4_k_m.gguf"
    code, out, err = cli("export", "default", "--quant", "q4_k_m", "--out", path)
    assert code == 0, err
    assert "rows of 576 values are not whole 256-value K-quant blocks" in out
    r = GGUFReader(str(path))
    assert r.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] in (Q.Q4_K, Q.Q6_K)  # 1536-wide rows: whole blocks
    assert sum(t == Q.Q4_K for t in types.values()) >= 10
    llm = llama(path)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": "Name a colour."}],
                                           max_tokens=12, temperature=0.0)
    finally:
        llm.close()
    # a 135M model at 4-5 bits is not an oracle (it answers France's capital wrongly); the
    # checks are that the chat template, tokenizer and weights load and produce words
    text = reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] >= 2 and any(c.isalpha() for c in text), reply


def test_a_killed_export_is_cleaned_and_exports_share_a_folder(tiny_models, tmp_path, cli):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / ".a.gguf.x1y2z3").write_bytes(b"half a file")  # what a killed export leaves
    code, out, _ = cli("export", tiny_models["llama"], "--quant", "f16", "--out", folder / "a.gguf")
    assert code == 0 and not (folder / ".a.gguf.x1y2z3").exists()
    code, out, _ = cli("export", tiny_models["qwen2"], "--quant", "f16", "--out", folder / "b.gguf")
    assert code == 0 and "b.Modelfile" in out
    assert "FROM ./a.gguf" in (folder / "Modelfile").read_text()  # the first export's, kept
    assert "FROM ./b.gguf" in (folder / "b.Modelfile").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "a.gguf", "b.Modelfile", "b.gguf"]


# --------------------------------------------------------------------------- width-pruned hidden

HIDDEN_PRUNED = [a for a in ARCHS if archs.TABLE[a].head_dim_arch]


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory):
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return path


@pytest.mark.parametrize("arch", HIDDEN_PRUNED)
def test_hidden_pruned_model_exports_loads_and_evaluates(arch, trained, calib_txt, tmp_path, cli,
                                                         monkeypatch):
    """`slm prune --hidden 24 --heads 2`: 2 heads x head_dim 8 = 16 is not the hidden size 24,
    which real width-pruned models hit (Qwen2.5-1.5B at half: hidden 1120, 10 heads of 128).
    The export carries head_dim (key_length) in a graph that sizes q by it (Qwen2: llama), so
    llama.cpp loads it and computes what transformers does; `slm eval` reads the file back."""
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    from gguf import GGUFReader

    folder, ids = trained(arch)
    pruned, out = tmp_path / "pruned", tmp_path / "m.f32.gguf"
    code, _, err = cli("prune", folder, "--hidden", "24", "--heads", "2", "--calib", calib_txt,
                       "--out", pruned, "--num-samples", "4", "--seq-len", "16")
    assert code == 0, err
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg["hidden_size"] == 24 and cfg["num_attention_heads"] * cfg["head_dim"] == 16
    code, _, err = cli("export", pruned, "--quant", "f32", "--out", out)
    assert code == 0, err
    f = {k: v.contents() for k, v in GGUFReader(str(out)).fields.items() if "length" in k}
    name = archs.TABLE[arch].head_dim_arch
    assert f[f"{name}.attention.key_length"] == f[f"{name}.attention.value_length"] == 8

    model, tok = models.load_model(pruned)
    llm = llama(out)
    try:
        text = TEXTS[1]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids
        cpp = cpp_logits(llm, ids)
    finally:
        llm.close()
    hf = hf_logits(model, ids)
    cosine = (cpp * hf).sum(-1) / np.linalg.norm(cpp, axis=-1) / np.linalg.norm(hf, axis=-1)
    assert cosine.min() >= MIN_COSINE, f"{arch}: cosine {cosine.min():.6f}"

    back, _ = models.load_model(out)  # what `slm eval FILE.gguf` loads
    assert np.abs(hf_logits(back, ids) - hf).max() < F32_TOL
    code, _, err = cli("eval", out, "--ppl", calib_txt, "--out", tmp_path / "report")
    assert code == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("arch", [a for a in ARCHS if not archs.TABLE[a].head_dim_arch])
def test_hidden_pruned_shape_llamacpp_cannot_load_is_refused(arch, tiny_models, calib_txt,
                                                              tmp_path, cli):
    """phi2 and phi3: llama.cpp sizes q by hidden. `slm prune` keeps hidden = heads x head_dim
    for them, and `slm export` refuses a model that does not (one line, exit 2, nothing written)."""
    code, _, err = cli("prune", tiny_models[arch], "--hidden", "24", "--heads", "2", "--calib",
                       calib_txt, "--out", tmp_path / "p")
    assert code == 2 and "--hidden 16" in err and not (tmp_path / "p").exists()
    code, out, err = cli("prune", tiny_models[arch], "--target", "0.5", "--method", "width",
                         "--calib", calib_txt, "--out", tmp_path / "w", "--num-samples", "2",
                         "--seq-len", "16")
    assert code == 0, err
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["num_attention_heads"] * cfg["head_dim"] == cfg["hidden_size"] < 32

    from slmkit import prune as P
    from test_prune import random_keep

    model, tok = models.load_model(tiny_models[arch])
    dst = P.Shape(layers=2, hidden=24, ffn=32, heads=2, kv_heads=2)
    models.save_model(P.apply_plan(model, random_keep(model, dst), dst), tok, tmp_path / "odd")
    code, _, err = cli("export", tmp_path / "odd", "--quant", "f16", "--out", tmp_path / "x" / "m.gguf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "would not load" in err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- SentencePiece, Llama 3 rope

HARD = ("Naïve café, 東京 😀 — résumé!\n\n  numbers 0 12 345 6789 and   three spaces\t\ttabs  end "
        "Summarize the conversation between the two friends.")


REL_F32_TOL = 0.01
"""max |logit diff| / max |logit|, llama.cpp f32 against transformers: measured 0.0008 (Llama 3
rope) to 0.006 (Gemma 3, 13 -> 7 layers: there from position 0 and the same without a sliding
window, so rounding, not attention)."""


def f32_parity(path, model, ids):
    """(min cosine, max |diff| / max |logit|) of llama.cpp's f32 logits against transformers'
    on `ids`."""
    llm = llama(path)
    try:
        cpp = cpp_logits(llm, ids)
    finally:
        llm.close()
    hf = hf_logits(model, ids)
    cosine = (cpp * hf).sum(-1) / np.linalg.norm(cpp, axis=-1) / np.linalg.norm(hf, axis=-1)
    return cosine.min(), np.abs(cpp - hf).max() / np.abs(hf).max()


@pytest.mark.parametrize("style", ["llama2", "metaspace", "gemma"])
def test_sentencepiece_tokenizers_export_as_llamacpp_reads_them(style, tmp_path):
    """Byte-fallback BPE (Llama 2, Mistral, Phi-3, Gemma) as llama.cpp's `llama` tokenizer:
    scores that merge like HF's merges, byte and unknown token types, the space prefix (none for
    Gemma). llama.cpp's tokens equal transformers' on unicode, digits and whitespace runs."""
    from gguf import GGUFReader

    from conftest import make_sp_tokenizer, make_tiny_model

    tok = make_sp_tokenizer(style)
    arch = "gemma3_text" if style == "gemma" else "llama"
    folder = make_tiny_model(arch, tmp_path / "m", tokenizer=tok)
    path = export_gguf(folder, tmp_path / "m.f32.gguf", "f32")
    f = {k: v.contents() for k, v in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.scores"]) == len(tok)
    assert f["tokenizer.ggml.token_type"][0] == 2 and f["tokenizer.ggml.token_type"][3] == 6  # unk, <0x00>
    assert f["tokenizer.ggml.add_space_prefix"] is (style != "gemma")
    assert f["tokenizer.ggml.add_bos_token"] is True
    llm = llama(path)
    try:
        for text in TEXTS + [HARD, HARD.upper(), "x"]:
            if style == "metaspace" and text[0].isspace():
                # transformers' Metaspace skips the prefix when the text starts with a space;
                # SentencePiece and llama.cpp add it always (so do Mistral's own files)
                continue
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text).input_ids, text
    finally:
        llm.close()
    model, _ = models.load_model(folder)
    cosine, _ = f32_parity(path, model, tok(HARD).input_ids)
    assert cosine >= MIN_COSINE, cosine


def test_unigram_tokenizer_is_refused_before_any_work(tiny_llama, tmp_path, cli):
    import shutil

    folder = tmp_path / "uni"
    shutil.copytree(tiny_llama, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items()}
    spec["model"] = {"type": "Unigram", "unk_id": 0, "byte_fallback": False,
                     "vocab": [[t, -1.0] for t in sorted(vocab, key=vocab.get)]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    code, _, err = cli("export", folder, "--quant", "f16", "--out", tmp_path / "x" / "m.gguf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Unigram" in err
    assert not (tmp_path / "x").exists()


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def test_llama3_rope_exports_as_rope_freqs(tmp_path, monkeypatch):
    """Llama 3.x rope scaling: one factor per frequency in `rope_freqs.weight`. With an original
    context of 16, three of the fixture's four frequencies are divided by 8 and one is smoothed,
    so over 40+ positions the logits differ without the tensor (checked: the test can fail)."""
    from gguf import GGUFReader

    from slmkit import export
    from conftest import make_tiny_model, make_tokenizer

    tok = make_tokenizer()
    folder = make_tiny_model("llama", tmp_path / "m", rope_parameters=dict(LLAMA3_ROPE))
    model, _ = models.load_model(folder)
    ids = tok(" ".join(TEXTS)).input_ids
    assert len(ids) > 40
    path = export_gguf(folder, tmp_path / "m.f32.gguf", "f32")
    r = GGUFReader(str(path))
    factors = {t.name: np.asarray(t.data) for t in r.tensors}["rope_freqs.weight"]
    assert factors.shape == (4,) and factors[1:].tolist() == [8.0, 8.0, 8.0] and 1 < factors[0] < 8
    cosine, diff = f32_parity(path, model, ids)
    print(f"llama3 rope: cosine {cosine:.6f}, relative max diff {diff:.5f}")
    assert cosine >= MIN_COSINE and diff < REL_F32_TOL, (cosine, diff)

    monkeypatch.setattr(export, "rope_freqs", lambda cfg: np.ones(4, dtype=np.float32))
    plain = export_gguf(folder, tmp_path / "plain.f32.gguf", "f32")
    _, diff_plain = f32_parity(plain, model, ids)
    assert diff_plain > 10 * REL_F32_TOL, diff_plain


def test_unexportable_rope_is_refused(tmp_path, cli):
    from conftest import make_tiny_model

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 32}
    folder = make_tiny_model("qwen2", tmp_path / "m", layers=1, rope_parameters=rope)
    code, _, err = cli("export", folder, "--quant", "f16", "--out", tmp_path / "x" / "m.gguf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "yarn" in err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- Gemma 3

def test_gemma3_depth_cut_keeps_the_pattern_llamacpp_runs(calib_txt, tmp_path, cli):
    """13 layers (5 sliding, 1 global, 5 sliding, 1 global, 1 sliding) cut to 7 by measured
    importance: the kept layers read as llama.cpp's fixed pattern, so llama.cpp's graph (window 8,
    shorter than the text) computes what transformers does. A model whose layers do not follow
    the pattern is refused by export and prune, one line each."""
    from conftest import make_tiny_model

    folder = make_tiny_model("gemma3_text", tmp_path / "g", layers=13)
    pruned, out = tmp_path / "pruned", tmp_path / "g.f32.gguf"
    code, _, err = cli("prune", folder, "--layers", "7", "--ffn", "48", "--calib", calib_txt,
                       "--out", pruned, "--num-samples", "4", "--seq-len", "16")
    assert code == 0, err
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    plan = json.loads((pruned / "prune_plan.json").read_text())
    gemma3 = archs.TABLE["gemma3_text"]
    assert plan["kept"]["layers"] == archs.keep_layers(  # the best-scoring pattern subsequence
        gemma3, plan["importance"]["block_influence"], archs.layer_types(gemma3, 13), 7)
    model, tok = models.load_model(pruned)
    ids = tok(" ".join(TEXTS)).input_ids
    assert len(ids) > 3 * cfg["sliding_window"]
    cosine, diff = f32_parity(export_gguf(pruned, out, "f32"), model, ids)
    print(f"gemma3 depth cut: cosine {cosine:.6f}, relative max diff {diff:.5f}")
    assert cosine >= MIN_COSINE and diff < REL_F32_TOL, (cosine, diff)

    cfg["layer_types"] = cfg["layer_types"][::-1]  # global layer first: not llama.cpp's pattern
    (pruned / "config.json").write_text(json.dumps(cfg))
    for args in (("export", pruned, "--out", tmp_path / "x" / "m.gguf"),
                 ("prune", pruned, "--layers", "3", "--calib", calib_txt, "--out", tmp_path / "x")):
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "layer_types" in err, err
    assert not (tmp_path / "x").exists()


def test_phi3_sentencepiece_special_tokens_strip_as_in_transformers(tmp_path, capsys):
    """Phi-3-mini's tokenizer: SentencePiece with special tokens that eat the whitespace after
    them (rstrip on all but <unk>, <s>, <|endoftext|>). llama.cpp applies exactly that when
    general.name says phi3, so the file says it, and chat text tokenises as in transformers.
    Other stripping llama.cpp cannot express: the file loads, and a note says so."""
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from conftest import make_sp_tokenizer, make_tiny_model

    tok = make_sp_tokenizer("llama2")
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, rstrip=t != "<|endoftext|>", special=True, normalized=False)
        for t in ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>")]})
    folder = make_tiny_model("phi3", tmp_path / "phi3", tokenizer=tok, layers=1)
    spec = json.loads((folder / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        added["rstrip"] = added["content"] not in ("<unk>", "<s>", "<|endoftext|>")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(folder)
    chat = "<|user|>\nHello there<|end|>\n<|assistant|>\n  Hi</s> \n"
    path = export_gguf(folder, tmp_path / "m.f16.gguf", "f16")
    assert "phi3" in GGUFReader(str(path)).fields["general.name"].contents()
    llm = llama(path)
    try:
        assert llm.tokenize(chat.encode(), add_bos=True, special=True) == tok(chat).input_ids
    finally:
        llm.close()

    for added in spec["added_tokens"]:
        added["lstrip"] = added["content"] == "<|user|>"  # no llama.cpp rule does that
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    capsys.readouterr()
    path = export_gguf(folder, tmp_path / "n.f16.gguf", "f16")
    assert "strip" in capsys.readouterr().err
    assert "phi3" not in GGUFReader(str(path)).fields["general.name"].contents()
    llama(path).close()  # loads
