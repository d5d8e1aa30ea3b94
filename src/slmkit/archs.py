"""One record per model family: what load, prune, distill and export need to know about it.

Everything slmkit knows about a transformers `model_type` is here, in `TABLE`; prune.py,
export.py, distill.py, scoring.py and the tests read it, and nothing else branches on the model
type. `docs/architectures.md` is generated from this table:

    python -m slmkit.archs docs/architectures.md     # rewrite the support matrix
    python -m slmkit.archs --check docs/architectures.md   # exit 1 when it is stale

A record names, per family:
  - prune: the module that takes each prunable axis (the heads' output projection, the MLP's
    down projection), the norms that feed each branch (hidden-channel importance), the norms that
    normalise a branch's output (Gemma 3), the norm kind and so its rescale rule, the embedding
    scale, the axes of every parameter, and the layer-type pattern depth cuts must keep;
  - export: the GGUF architecture, the activations and rope types llama.cpp's graph computes,
    whether q/k rows are permuted, the offset llama.cpp's graph expects on norm weights, and the
    config keys no llama.cpp graph has;
  - distill / eval: the logit post-processing after lm_head (soft-capping, scaling).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import UsageError

# What the rows (output) and columns (input) of each module's weight index; 1-D parameters
# (biases, norm weights) follow the rows. q = query heads x head_dim, kv = KV groups x head_dim,
# qkv = Phi-3's fused [q; k; v], ffn2 = Phi-3's fused [gate; up]; None = not pruned.
LLAMA_AXES = {
    "embed_tokens": (None, "hidden"), "lm_head": (None, "hidden"),
    "q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"),
    "o_proj": ("hidden", "q"), "gate_proj": ("ffn", "hidden"), "up_proj": ("ffn", "hidden"),
    "down_proj": ("hidden", "ffn"), "input_layernorm": ("hidden",),
    "post_attention_layernorm": ("hidden",), "norm": ("hidden",),
}
QK_NORM_AXES = {"q_norm": (None,), "k_norm": (None,)}  # per head_dim, shared by all heads
PHI_AXES = {
    "embed_tokens": (None, "hidden"), "lm_head": (None, "hidden"),
    "q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"),
    "dense": ("hidden", "q"), "fc1": ("ffn", "hidden"), "fc2": ("hidden", "ffn"),
    "input_layernorm": ("hidden",), "final_layernorm": ("hidden",),
}
PHI3_AXES = {
    "embed_tokens": (None, "hidden"), "lm_head": (None, "hidden"),
    "qkv_proj": ("qkv", "hidden"), "o_proj": ("hidden", "q"),
    "gate_up_proj": ("ffn2", "hidden"), "down_proj": ("hidden", "ffn"),
    "input_layernorm": ("hidden",), "post_attention_layernorm": ("hidden",), "norm": ("hidden",),
}
GEMMA3_AXES = LLAMA_AXES | QK_NORM_AXES | {
    "pre_feedforward_layernorm": ("hidden",), "post_feedforward_layernorm": ("hidden",)}

# config keys that change the logits after lm_head: a family's record names those it applies
# (logit_post); one no record names is refused (Granite's logits_scaling among them)
LOGIT_POST = ("final_logit_softcapping", "logit_scale", "logits_scaling")
NORMS = ("rms", "rms+1", "layer")
SP_TOKENIZER = "SentencePiece (BPE with byte fallback)"
BPE_TOKENIZER = "byte-level BPE"


@dataclass(frozen=True)
class Arch:
    """What slmkit knows about one transformers `model_type`."""

    model_type: str
    name: str
    """the family as people call it, with the models it covers"""
    config_class: str
    """the transformers config class (tests build tiny models from it)"""
    axes: dict = field(default_factory=lambda: dict(LLAMA_AXES), hash=False)
    """module name -> the axes its weight's rows and columns index (see LLAMA_AXES)"""
    attn_out: str = "self_attn.o_proj"
    """the module, inside a decoder layer, whose input is the heads' outputs (head importance)"""
    mlp_down: str = "mlp.down_proj"
    """the module whose input is the MLP channels (channel importance; refit target)"""
    branch_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    """the norms that read the residual stream and feed a branch: hidden-channel importance"""
    output_norms: tuple[str, ...] = ()
    """norms of a branch's output before the residual add (Gemma 3's post-norms)"""
    final_norm: str = "norm"
    norm: str = "rms"
    """rms: x / rms(x) * w; rms+1: x / rms(x) * (1 + w) (Gemma); layer: LayerNorm, which centres
    its input, so no rescale keeps it exact and none is applied"""
    embed_scale: str | None = None
    """sqrt_hidden: the embeddings are multiplied by sqrt(hidden_size) in the model (Gemma)"""
    layer_pattern: int = 0
    """>0: llama.cpp derives each layer's attention type from its index with this period
    (Gemma 3: 5 sliding-window layers, then 1 global); depth cuts keep that pattern"""
    prune: bool = True
    # ---- export
    gguf_arch: str | None = None
    """llama.cpp's architecture name; None: no export"""
    head_dim_arch: str | None = None
    """the GGUF architecture to write when heads x head_dim != hidden (width-pruned): the
    family's own where llama.cpp sizes q/o by key_length, another graph that computes the same
    function, or None: refused (llama.cpp's graph sizes q/o by hidden)"""
    activations: tuple[str, ...] = ("silu",)
    """hidden_act values llama.cpp's graph computes (the first is the one it computes)"""
    rope_types: tuple[str, ...] = ("default",)
    """rope_type values exported (llama3: as a rope_freqs tensor)"""
    norm_offset: float = 0.0
    """added to every norm weight on export: llama.cpp's graph multiplies by w where HF by 1 + w"""
    output_tensor: bool = False
    """write output.weight even when tied (llama.cpp's phi2 graph requires it)"""
    sliding_window: str = "refuse"
    """refuse: no sliding window in llama.cpp's graph; ignored: written, llama.cpp attends the whole
    context (a note); pattern: llama.cpp's fixed layer_pattern"""
    no_graph: tuple[tuple[str, str], ...] = ()
    """(config key, why): a config setting this key has no llama.cpp graph (export refuses it)"""
    no_prune: tuple[tuple[str, str], ...] = ()
    """(config key, why): a config setting this key is not pruned"""
    graph_constants: tuple[tuple[str, object, str], ...] = ()
    """(config key, value, why): values llama.cpp's graph hard-codes ("head_dim": the head size)"""
    tokenizers: tuple[str, ...] = (BPE_TOKENIZER, SP_TOKENIZER)
    logit_post: tuple[str, ...] = ()
    """config keys (from LOGIT_POST) this family applies after lm_head"""
    examples: str = ""


TABLE: dict[str, Arch] = {a.model_type: a for a in (
    Arch("llama", "Llama", "LlamaConfig", gguf_arch="llama", head_dim_arch="llama",
         rope_types=("default", "llama3"),
         examples="Llama 2, Llama 3.x, SmolLM, SmolLM2"),
    # Mistral without sliding-window attention is a llama to llama.cpp
    Arch("mistral", "Mistral", "MistralConfig", gguf_arch="llama", head_dim_arch="llama",
         examples="Mistral-7B v0.2/v0.3"),
    # llama.cpp's qwen2 graph sizes q by hidden; its llama graph (q/k/v biases optional) computes
    # the same function with q/k rows permuted, and sizes q by key_length
    Arch("qwen2", "Qwen2", "Qwen2Config", gguf_arch="qwen2", head_dim_arch="llama",
         examples="Qwen2, Qwen2.5, Qwen2.5-Coder"),
    Arch("qwen3", "Qwen3", "Qwen3Config", axes=LLAMA_AXES | QK_NORM_AXES, gguf_arch="qwen3", head_dim_arch="qwen3",
         no_graph=(("attention_bias", "its qwen3 graph has no q/k/v biases"),),
         examples="Qwen3"),
    Arch("phi", "Phi-2", "PhiConfig", axes=PHI_AXES, attn_out="self_attn.dense",
         mlp_down="mlp.fc2", branch_norms=("input_layernorm",), final_norm="final_layernorm",
         norm="layer", gguf_arch="phi2", activations=("gelu_new", "gelu_pytorch_tanh"),
         output_tensor=True,
         no_graph=(("qk_layernorm", "Phi with qk_layernorm has no llama.cpp graph"),),
         no_prune=(("qk_layernorm", "Phi with qk_layernorm (q/k norms sized hidden/heads) is not "
                    "pruned"),),
         examples="Phi-1.5, Phi-2"),
    Arch("phi3", "Phi-3", "Phi3Config", axes=PHI3_AXES, mlp_down="mlp.down_proj",
         gguf_arch="phi3", sliding_window="ignored",
         examples="Phi-3-mini, Phi-3.5-mini, Phi-4-mini"),
    Arch("gemma3_text", "Gemma 3 (text)", "Gemma3TextConfig", axes=GEMMA3_AXES,
         branch_norms=("input_layernorm", "pre_feedforward_layernorm"),
         output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
         norm="rms+1", embed_scale="sqrt_hidden", layer_pattern=6, gguf_arch="gemma3",
         head_dim_arch="gemma3",
         activations=("gelu_pytorch_tanh",), norm_offset=1.0, sliding_window="pattern",
         logit_post=("final_logit_softcapping",),
         no_graph=(("attn_logit_softcapping", "llama.cpp's gemma3 graph has no attention "
                    "soft-capping"),
                   ("final_logit_softcapping", "llama.cpp's gemma3 graph has no logit "
                    "soft-capping")),
         graph_constants=(("query_pre_attn_scalar", "head_dim", "llama.cpp's gemma3 graph "
                           "scales queries by 1/sqrt(head_dim)"),
                          ("rope_local_base_freq", 10000.0, "llama.cpp's gemma3 graph runs its "
                           "sliding-window layers' rope at base")),
         examples="Gemma-3-270M, Gemma-3-1B"),
    # distilled and evaluated (their logits post-processed as the model does); not pruned/exported
    Arch("gemma2", "Gemma 2", "Gemma2Config", prune=False, logit_post=("final_logit_softcapping",),
         examples="Gemma-2-2B"),
    Arch("cohere", "Cohere Command-R", "CohereConfig", prune=False, logit_post=("logit_scale",),
         examples="Command-R"),
)}

PRUNABLE = tuple(t for t, a in TABLE.items() if a.prune)
EXPORTABLE = tuple(t for t, a in TABLE.items() if a.gguf_arch)


def get(cfg: dict, where: str, verb: str) -> Arch:
    """The record of config.json `cfg` for `verb` (prune, export), or a UsageError naming the
    file, the architecture and what is supported."""
    model_type = cfg.get("model_type")
    arch = TABLE.get(model_type)
    ok = arch is not None and {"prune": arch.prune, "export": bool(arch.gguf_arch)}.get(verb, True)
    if not ok:
        names = PRUNABLE if verb == "prune" else EXPORTABLE
        raise UsageError(f"{where}: `slm {verb}` does not support the {model_type} architecture "
                         f"({(cfg.get('architectures') or ['?'])[0]}); supported: "
                         f"{', '.join(names)} (SmolLM is llama; see docs/architectures.md)")
    for key, why in arch.no_prune if verb == "prune" else ():
        if cfg.get(key):
            raise UsageError(f"{where} (key `{key}`): {why}; `slm {verb}` supports "
                             f"{arch.name} without it")
    return arch


def rope_type(cfg: dict) -> str:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rope:  # per layer type (transformers 5 Gemma 3)
        rope = rope["full_attention"] or {}
    return rope.get("rope_type") or rope.get("type") or "default"


# --------------------------------------------------------------------------- norms and depth

def scale_norm(arch: Arch, weight, factor: float) -> None:
    """Multiply a norm's effective weight by `factor` in place: w for RMSNorm, (1 + w) for
    Gemma's (w becomes factor * (1 + w) - 1)."""
    if arch.norm == "rms+1":
        weight.add_(1.0).mul_(factor).sub_(1.0)
    else:
        weight.mul_(factor)


def embed_factor(arch: Arch, hidden_before: int, hidden_after: int) -> float:
    """How much the residual stream shrinks when a model that multiplies its embeddings by
    sqrt(hidden) is cut to `hidden_after` channels: sqrt(D'/D) (1.0 for other families)."""
    if arch.embed_scale == "sqrt_hidden":
        return math.sqrt(hidden_after / hidden_before)
    return 1.0


def layer_types(arch: Arch, n: int) -> list[str]:
    """The attention type of each of `n` layers as llama.cpp computes it for a pattern family."""
    p = arch.layer_pattern
    return ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n)]


def keep_layers(arch: Arch, scores: list[float], types: list[str], n: int) -> list[int]:
    """The `n` layers to keep (ascending indices), highest total `scores` first.
    For a family with a layer pattern (Gemma 3: 5 sliding, 1 global, repeating), llama.cpp
    derives each layer's type from its new index, so the kept layers' own types, in order, must
    read as that pattern: the highest-scoring subsequence that does (dynamic programming over
    (layer, kept position)). Raises UsageError when no such subsequence exists."""
    if not arch.layer_pattern:
        return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n])
    want = layer_types(arch, n)
    L = len(scores)
    NEG = -math.inf
    # best[i][j]: the best total keeping j layers among the first i, the j-th matching want[j-1]
    best = [[NEG] * (n + 1) for _ in range(L + 1)]
    for i in range(L + 1):
        best[i][0] = 0.0
    for i in range(1, L + 1):
        for j in range(1, n + 1):
            skip = best[i - 1][j]
            take = (best[i - 1][j - 1] + scores[i - 1]
                    if types[i - 1] == want[j - 1] and best[i - 1][j - 1] > NEG else NEG)
            best[i][j] = max(skip, take)
    if best[L][n] == NEG:
        raise UsageError(f"--layers {n}: no {n} of the {L} layers follow llama.cpp's "
                         f"{arch.name} pattern ({arch.layer_pattern - 1} sliding-window layers, "
                         "then one global); keep fewer layers")
    kept, j = [], n
    for i in range(L, 0, -1):  # walk back: take layer i-1 whenever the total says it was taken
        if j and types[i - 1] == want[j - 1] and best[i - 1][j - 1] > NEG \
                and best[i][j] == best[i - 1][j - 1] + scores[i - 1]:
            kept.append(i - 1)
            j -= 1
    return sorted(kept)


# --------------------------------------------------------------------------- GGUF read back

def gguf_config(config, gguf_file) -> None:
    """Set in `config` (a transformers config read from `gguf_file`) what transformers' GGUF
    reader leaves out, from the file itself: head_dim from `<arch>.attention.key_length` (a
    width-pruned model; transformers reads it for some architectures only), q/k/v/o biases where
    the file has them (a width-pruned Qwen2 is written as llama), and the values llama.cpp's graph
    derives from head_dim (Gemma 3's query_pre_attn_scalar)."""
    from slmkit.models import gguf_header

    meta, tensors = gguf_header(gguf_file)  # header only: gguf-py's reader decodes every token
    key = meta.get(f"{meta.get('general.architecture')}.attention.key_length")
    if key is not None:
        config.head_dim = int(key)
    if "blk.0.attn_q.bias" in tensors:
        config.attention_bias = True  # transformers' llama: q/k/v/o biases, all or none
    record = TABLE.get(config.model_type)
    for k, value, _ in record.graph_constants if record else ():
        if value == "head_dim":
            setattr(config, k, config.head_dim)


# --------------------------------------------------------------------------- logits

def logit_post(config):
    """The model's own processing of lm_head's output, as a function of logits (any shape), or
    None when its logits are exactly lm_head(final hidden). `config`: a transformers config or
    config.json's dict. A config that sets a post-processing key its family's record does not
    name is refused (UsageError): its head may not be applied outside the model."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    model_type = get("model_type")
    arch = TABLE.get(model_type)
    named = arch.logit_post if arch else ()
    steps = []
    for key in LOGIT_POST:
        value = get(key)
        if value in (None, 0, 0.0) or (key != "final_logit_softcapping" and value == 1.0):
            continue
        if key not in named:
            raise UsageError(f"the {model_type} model sets `{key}` ({value}), which slmkit does "
                             "not know how to apply outside the model; use a family of "
                             "docs/architectures.md")
        steps.append((key, float(value)))
    if not steps:
        return None

    def post(logits):
        import torch

        for key, value in steps:
            if key == "final_logit_softcapping":  # as Gemma 2 computes it
                logits = torch.tanh(logits / value) * value
            else:  # logit_scale, as Cohere multiplies
                logits = logits * value
        return logits
    return post


NEUTRAL = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
"""each post-processing key's value that turns it off (in the config, or the model's copy of it)"""


@contextmanager
def head_outside(model):
    """Within it, `model(...)` returns its final hidden states (B, T, H) as `logits`: its output
    projection is an identity and its own logit processing is off (a model's forward would
    otherwise soft-cap or scale the hidden states themselves). Yields output_head(): lm_head
    then that processing, for a loss to apply a chunk of positions at a time. The weights stay
    the model's (tied or not), so they train as before."""
    import torch

    head = output_head(model)  # refuses unknown processing first
    lm_head = model.get_output_embeddings()
    saved = []
    for key, off in NEUTRAL.items():
        for owner in (model.config, model):  # Cohere keeps its own copy of logit_scale
            if key in vars(owner):
                saved.append((owner, key, vars(owner)[key]))
                setattr(owner, key, off)
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(lm_head)
        for owner, key, value in saved:
            setattr(owner, key, value)


def output_head(model, head=None):
    """The one rule for applying a model's output head outside the model (distill's chunked
    loss, scoring at picked positions): a function of final hidden states (..., H) -> logits
    (..., V) that is lm_head (`head`, default the model's output embeddings) then the model's own
    post-processing (logit_post). Raises UsageError where that processing is unknown."""
    head = head if head is not None else model.get_output_embeddings()
    post = logit_post(model.config)
    if post is None:
        return head
    return lambda hidden: post(head(hidden))


# --------------------------------------------------------------------------- docs

def _cell(ok: bool, note: str = "") -> str:
    return ("yes" + (f" ({note})" if note else "")) if ok else "no"


def matrix() -> str:
    """docs/architectures.md: the support matrix, family x verb, from TABLE."""
    rows = ["# Architectures", "",
            "Generated from `src/slmkit/archs.py` by `python -m slmkit.archs docs/architectures.md`;",
            "a test fails when this file is stale. `slm distill` and `slm eval` load any causal LM",
            "transformers ships; the families below are the ones slmkit knows by name.", "",
            "| family | model_type | e.g. | prune | distill / eval | export (llama.cpp arch) | "
            "rope | tokenizers |",
            "|---|---|---|---|---|---|---|---|"]
    for a in TABLE.values():
        head = ("lm_head, then " + ", ".join(f"`{k}`" for k in a.logit_post)) if a.logit_post else ""
        export = f"yes (`{a.gguf_arch}`)" if a.gguf_arch else "no"
        rows.append(f"| {a.name} | `{a.model_type}` | {a.examples} | {_cell(a.prune)} | "
                    f"{_cell(True, head)} | {export} | "
                    f"{', '.join(a.rope_types) if a.gguf_arch else '-'} | "
                    f"{'; '.join(a.tokenizers) if a.gguf_arch else '-'} |")
    rows += ["", "## What each family needs", ""]
    for a in TABLE.values():
        if not (a.prune or a.gguf_arch):
            continue
        bits = [f"norm {a.norm}" + (" (pruned channels: no rescale, LayerNorm centres)"
                                    if a.norm == "layer" else ""),
                f"hidden importance from {', '.join(a.branch_norms)}"]
        if a.output_norms:
            bits.append(f"branch output norms {', '.join(a.output_norms)}")
        if a.embed_scale:
            bits.append("embeddings x sqrt(hidden): the residual stream shrinks by sqrt(D'/D), "
                        "so the branch output norms are scaled by it too")
        if a.layer_pattern:
            bits.append(f"depth cuts keep llama.cpp's pattern ({a.layer_pattern - 1} sliding, 1 "
                        "global): the highest-scoring subsequence of layers whose types read as it")
        if a.norm_offset:
            bits.append(f"export adds {a.norm_offset:g} to norm weights")
        if a.gguf_arch and a.head_dim_arch is None:
            bits.append("hidden kept at heads x head_dim when pruned (llama.cpp's graph sizes q by "
                        "hidden); a model that is not is refused by export")
        elif a.gguf_arch and a.head_dim_arch != a.gguf_arch:
            bits.append(f"width-pruned (heads x head_dim != hidden): exported as `{a.head_dim_arch}`, "
                        "whose graph sizes q by head_dim")
        if a.sliding_window == "ignored":
            bits.append("sliding_window written; llama.cpp attends the whole context")
        if "llama3" in a.rope_types:
            bits.append("Llama 3.x `llama3` rope scaling exported as the `rope_freqs` tensor")
        for key, why in a.no_graph:
            bits.append(f"refused: `{key}` ({why})")
        for key, value, why in a.graph_constants:
            bits.append(f"refused unless `{key}` is {value} ({why})")
        rows.append(f"- **{a.name}** (`{a.model_type}`): " + "; ".join(bits) + ".")
    rows += ["", "Every export writes `<arch>.attention.key_length` / `value_length` when head_dim "
             "is not hidden / heads (width-pruned models), and refuses, before any work, a model "
             "llama.cpp would not load the same: an unknown rope type, activation, or tokenizer.",
             ""]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    path = Path(paths[0] if paths else "docs/architectures.md")
    text = matrix()
    if check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale: run `python -m slmkit.archs {path}`", file=sys.stderr)
            return 1
        return 0
    from slmkit.models import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
