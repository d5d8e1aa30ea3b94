"""Shared fixtures: a tokenizer trained in the test and tiny random models built from the real
config classes of every architecture slmkit supports. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slmkit.archs import TABLE

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# every family slmkit prunes or exports (archs.TABLE); TINY gives each its test shape
ARCHS = tuple(t for t, a in TABLE.items() if a.prune or a.gguf_arch)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The patient should take one tablet twice a day with food.",
    "Summarize the conversation between the two friends about their weekend plans.",
    "She don't like going to the dentist, but she goes every year anyway.",
    "Can you send me the report before the meeting tomorrow morning?",
    "Person1: Hi, are you coming to the party tonight? Person2: Yes, I will bring some snacks.",
    "Grammar correction: he have three cat and two dogs at home.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Answer the question only from the passage. If the passage does not say, reply that it does not.",
    "Thanks for your message! I will call you back after lunch.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? : ; ' \" ( ) - #",
]


# The GGUF cache is shared with the user's on purpose: converting `default` takes ~40 s and the
# converted folder is a pure function of the GGUF file. Tests of the cache itself use their own.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# family -> the config keys of its tiny test model beyond the common ones
TINY = {
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    # Phi-2's architecture: LayerNorm, biases, partial rotary, parallel block
    "phi": dict(num_key_value_heads=4, partial_rotary_factor=0.5, tie_word_embeddings=False),
    "phi3": dict(num_key_value_heads=2, tie_word_embeddings=False),  # fused qkv and gate_up
    # Gemma 3: (1 + w) norms, sqrt(hidden) embedding scale, tied, 7 layers so one is global
    # (5 sliding, 1 global, 1 sliding), a window shorter than the test texts
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                        sliding_window=8, tie_word_embeddings=True, layers=7),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0),
    "cohere": dict(num_key_value_heads=2, logit_scale=0.5),
}


SP_STYLES = ("llama2", "metaspace", "gemma")
SP_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                    "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def make_sp_tokenizer(style: str = "llama2"):
    """A SentencePiece-style tokenizer as transformers holds one (Llama 2, Mistral, Phi-3, Gemma):
    BPE over "\u2581"-for-space text with byte fallback, <unk> <s> </s> then the 256 byte tokens
    <0x00>..<0xFF> at ids 3..258, BOS added. `style`: llama2 (normalizer Prepend + Replace),
    metaspace (Metaspace pre-tokenizer, prefix on the first piece; Mistral v0.3, Llama 2 non-legacy)
    or gemma (spaces replaced, no prefix)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = "\u2581"
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=sp, prepend_scheme="always")
    trainer_tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=420, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(sp), normalizers.Replace(" ", sp)])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=sp, prepend_scheme="first", split=False)
    else:  # as transformers' GemmaTokenizer builds it
        tok.normalizer = normalizers.Replace(" ", sp)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    steps = [decoders.Replace(sp, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if style != "gemma" else []))
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")
    fast.chat_template = SP_CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, layers: int | None = None, **overrides):
    import transformers as tf

    extra = dict(TINY[arch]) | overrides
    layers = layers or extra.pop("layers", 4)
    extra.pop("layers", None)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return getattr(tf, TABLE[arch].config_class)(**common, **extra)


def make_tiny_model(arch: str, out: Path, layers: int | None = None, seed: int = 0, tokenizer=None,
                    **overrides) -> Path:
    """A tiny random `arch` model with `tokenizer` (default: make_tokenizer()) saved at `out`;
    `overrides` are config keys (rope_parameters=...)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(arch, len(tok), layers=layers, **overrides)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (tok.bos_token_id, tok.eos_token_id,
                                                            tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init has tiny weights; scale up so heads and channels differ measurably
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            elif "norm" in name and "weight" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: extra threads only wait on each other.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch -> folder of a tiny random model (4 layers, hidden 32, 4 heads, 2 KV heads; Gemma 3:
    7 layers)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(params=ARCHS)
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def run_cli(*args) -> tuple[int, str, str]:
    """Run `slm ARGS` in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from slmkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli


# --------------------------------------------------------------------------- precision

# Both precision paths run on every CPU: `bf16` forces the bf16 autocast that bf16 CPUs and GPUs
# take by default (slmkit.precision), `off` the float32 path this kind of CPU takes.
AUTOCAST_MODES = ("off", "bf16")
# relative tolerance of a figure against its float32 reference, per path: bf16 keeps ~3
# significant digits per matmul
REL_TOL = {"off": 1e-5, "bf16": 2e-2}


@pytest.fixture(params=AUTOCAST_MODES)
def autocast_mode(request, monkeypatch) -> str:
    """Runs the test once per precision path, with SLMKIT_AUTOCAST set (inherited by subprocesses)."""
    monkeypatch.setenv("SLMKIT_AUTOCAST", request.param)
    return request.param


def path_tol(float32_tol: float) -> float:
    """The relative tolerance of a test that runs whichever precision path this machine takes
    (bf16 CPUs and GPUs: bf16 autocast): `float32_tol` in float32, REL_TOL["bf16"] under bf16."""
    from slmkit import precision

    return REL_TOL["bf16"] if precision.autocast_dtype("cpu") is not None else float32_tol


# --------------------------------------------------------------------------- another tokenizer

def make_chat_sp_tokenizer():
    """A SentencePiece-style tokenizer with the chat markers (Metaspace `▁` for spaces, byte fallback `<0xNN>`, as
    Llama 2 and Gemma spell their vocabularies), trained here on the same corpus to a smaller
    vocabulary than `make_tokenizer`'s byte-level BPE: the two split most words differently."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trained = Tokenizer(models.BPE(unk_token=None))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=330, special_tokens=specials))
    spec = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token=None))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_with(tokenizer, arch: str, out: Path, layers: int = 4, seed: int = 0) -> Path:
    """make_tiny_model with another tokenizer (e.g. make_chat_sp_tokenizer())."""
    return make_tiny_model(arch, out, layers=layers, seed=seed, tokenizer=tokenizer)
