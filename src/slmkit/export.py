"""Export a model to GGUF for llama.cpp and Ollama, with an Ollama Modelfile beside it.

    slm export default --quant q8_0 --out smollm2.q8_0.gguf
    slm export runs/demo/student --quant q4_k_m --out student.gguf
    llama-cli -m smollm2.q8_0.gguf -cnv            # or: ollama create smollm2 -f Modelfile

Architectures: every family of the architecture table (slmkit/archs.py, docs/architectures.md)
with a GGUF architecture: llama (Llama, Mistral, SmolLM; Llama 3.x `llama3` rope as the
`rope_freqs` tensor), qwen2, qwen3, phi2, phi3 and gemma3. Everything is checked on config.json
and the tokenizer before any weight is read (check_export): a model llama.cpp would not load, or
would compute differently (a rope type, activation, sliding-window layout or tokenizer it lacks),
is refused there, never written. Tensor names come from the gguf package's map for the
architecture. Only the `llama` graph's q/k rows are permuted: llama.cpp runs the others' rope
NeoX-style, which is HF's rotate-half layout. A width-pruned model whose heads x head_dim is not
its hidden size gets `<arch>.attention.key_length`/`value_length`; where llama.cpp's graph sizes
q by hidden anyway (qwen2) the file is written as the `llama` graph, which computes the same
function (q/k/v biases included), and where no graph can (phi2, phi3) the export is refused.

Quantisation: f32, f16 and q8_0 (~8.5 bits a weight) are written here (our q8_0 bytes equal
llama-quantize's, tested); q4_0 (~4.5 bits) and the K-quants q4_k_m (~4.9), q5_k_m (~5.7) and
q6_k (~6.6) are made by llama.cpp's own quantizer from an f32 export, so its per-tensor rules
(the output projection in Q6_K when its rows are a multiple of 256 values, else Q8_0; some
layers one type up in the _m mixes; a tensor whose rows are not whole 256-value blocks falls back
to Q5_0/Q5_1/Q8_0) are llama.cpp's, not a copy; `slm export` reports the tensors that fell back.
Norms and other 1-D tensors stay f32 in every mode. Tokenizers: byte-level BPE (GPT-2 style: SmolLM,
Qwen, Phi-2, Llama 3) as llama.cpp's `gpt2` model, and SentencePiece-style BPE with byte fallback
(Llama 2, Mistral, Phi-3, Gemma) as its `llama` model: scores that make its merges HF's
(merge_scores), byte and control token types, add_space_prefix from the normalizer.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmkit import archs, models
from slmkit.cli import add_config_arguments, config_from_args, option
from slmkit.errors import UsageError

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
BY_LLAMACPP = ("q4_0", "q4_k_m", "q5_k_m", "q6_k")  # quantised by llama.cpp from an f32 export
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
# The pre-tokenizer regexes of the tokenizers llama.cpp knows by name (tokenizer.ggml.pre).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space


@dataclass
class ExportConfig:
    """One `slm export` run; CLI flags are these names with dashes."""

    model: str = option(help=models.WEIGHTS_HELP, flags=("model",), wired=True)
    out: str | None = option(None, "output .gguf file (default: ./NAME.QUANT.gguf); an Ollama "
                             "`Modelfile` is written in the same folder (NAME.Modelfile when the "
                             "folder's Modelfile is another export's)", wired=True)
    quant: str = option("q8_0", "weight type: f32, f16, q8_0 (default; ~8.5 bits/weight), q6_k "
                        "(~6.6), q5_k_m (~5.7), q4_k_m (~4.9, Ollama's usual pick) or q4_0 (~4.5)",
                        choices=QUANTS)
    format: str = option("gguf", "output format (gguf)", choices=("gguf",))
    trust_remote_code: bool = option(False, "allow code from the model folder", wired=True)

    def __post_init__(self):
        self.out = self.out or f"{model_name(self.model)}.{self.quant}.gguf"


def export(cfg: ExportConfig) -> Path:
    """`export_gguf` as `slm export` runs it. Returns the path of the .gguf file."""
    return export_gguf(cfg.model, Path(cfg.out), quant=cfg.quant,
                       trust_remote_code=cfg.trust_remote_code)


def add_arguments(p):
    add_config_arguments(p, ExportConfig)


def run(args) -> int:
    cfg = config_from_args(ExportConfig, args)
    path = export(cfg)
    size = path.stat().st_size
    mf = modelfile_path(path)
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {cfg.quant}) and {mf}")
    fallbacks = kquant_fallbacks(path, cfg.quant)
    if fallbacks:
        print(f"  {fallbacks}")
    print(f"  llama.cpp: llama-cli -m {path} -cnv")
    print(f"  Ollama:    cd {path.parent} && ollama create {path.stem.split('.')[0]} -f {mf.name}")
    return 0


# --------------------------------------------------------------------------- the export

@dataclass
class Planned:
    """One tensor of the output file: where it comes from and how it is stored."""
    hf_name: str
    name: str                   # GGUF name, e.g. blk.3.attn_q.weight
    shape: tuple[int, ...]      # numpy (row-major) shape, e.g. (out_features, in_features)
    qtype: object               # gguf.GGMLQuantizationType
    permute_heads: int = 0      # >0: apply the rotary row permutation with this many heads
    offset: float = 0.0         # added to every value (Gemma's (1 + w) norms: llama.cpp wants 1 + w)
    data: object = None         # a tensor made here (Llama 3's rope factors), not read from hf_name


def export_gguf(model, out, quant: str = "q8_0", trust_remote_code: bool = False) -> Path:
    """Write MODEL (an HF folder, a .gguf file or `default`) as a GGUF file at `out`, and an
    Ollama `Modelfile` beside it (`modelfile_path`). Written to a temporary sibling, then renamed
    into place; temporary files a killed export left beside `out` are removed first.
    Returns the path of the .gguf file."""
    import gguf
    from safetensors import safe_open
    from tqdm import tqdm

    if quant not in QUANTS:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if quant in BY_LLAMACPP:
        _llama_cpp(quant)  # before any work: is the quantizer there?
    written = "f32" if quant in BY_LLAMACPP else quant
    out = Path(out)
    if out.suffix != ".gguf":
        raise UsageError(f"--out {out}: give a file name ending in .gguf")
    folder = models.resolve(model, trust_remote_code=trust_remote_code)
    cfg = models.read_config(folder)
    target = check_export(cfg, folder)
    tok = tokenizer_metadata(folder, cfg["vocab_size"])
    if target.gguf != target.arch.gguf_arch:
        print(f"note: {folder}/config.json: heads x head_dim is not hidden_size, which llama.cpp's "
              f"{target.arch.gguf_arch} graph needs; written as its {target.gguf} graph, which "
              "computes the same function", file=sys.stderr)
    if tok["ignored_strip"]:
        print(f"note: {folder}/tokenizer.json: the tokens {', '.join(tok['ignored_strip'][:5])} strip "
              "the whitespace beside them, which llama.cpp does not; text next to them "
              "tokenises differently there", file=sys.stderr)
    window = cfg.get("sliding_window") if target.arch.sliding_window == "ignored" else None
    if window and window < cfg["max_position_embeddings"]:
        print(f"note: {folder}/config.json sets sliding_window {window}; llama.cpp's {target.gguf} graph "
              f"attends the whole context, so past {window} tokens it differs from transformers",
              file=sys.stderr)

    tensors = models.tensor_headers(folder)
    plan = plan_tensors(cfg, target, {k: tuple(meta["shape"]) for k, meta in tensors.items()}, written)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # mkstemp's names below: a killed export's
        stale.unlink(missing_ok=True)
    temps = []
    for _ in range(2 if quant in BY_LLAMACPP else 1):
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
        temps.append(tmp)
    tmp = temps[0]
    writer = gguf.GGUFWriter(tmp, target.gguf)
    try:
        write_metadata(writer, cfg, target, written, model_name(model), tok["phi3_strip"])
        write_tokenizer(writer, tok)
        for t in plan:
            dtype, nbytes, shape = stored_layout(t)
            writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles = {}
        for t in tqdm(plan, desc=f"export {written}", unit="tensor", file=sys.stderr,
                      disable=len(plan) < 50):
            if t.data is not None:
                writer.write_tensor_data(encode(t.data, t.qtype))
                continue
            shard = tensors[t.hf_name]["file"]
            if shard not in handles:
                handles[shard] = safe_open(str(shard), framework="pt")
            w = handles[shard].get_tensor(t.hf_name).float().numpy()
            if t.offset:
                w = w + t.offset
            if t.permute_heads:
                w = rotary_permute(w, t.permute_heads)
            writer.write_tensor_data(encode(w, t.qtype))
        writer.close()
        if quant in BY_LLAMACPP:
            llamacpp_quantize(temps[0], temps[1], quant)
            tmp = temps[1]
        models.share(Path(tmp))  # mkstemp makes it private; a model file is for sharing
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        raise
    finally:
        for t in temps:
            Path(t).unlink(missing_ok=True)
    with models.atomic_write(modelfile_path(out)) as f:
        f.write(modelfile(out.name, tok["chat_template"], tok["eos_text"]))
    return out


def check_exportable(model, quant: str = "q8_0", trust_remote_code: bool = False) -> Target:
    """Everything `slm export MODEL --quant QUANT` checks before it reads a weight: the quant (and
    llama.cpp's quantizer for the K-quants), the architecture (check_export) and the tokenizer.
    `slm build` runs it for every model its export stage will write, before the first stage."""
    if quant not in QUANTS:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if quant in BY_LLAMACPP:
        _llama_cpp(quant)
    folder = models.resolve(model, trust_remote_code=trust_remote_code)
    cfg = models.read_config(folder)
    target = check_export(cfg, folder)
    tokenizer_metadata(folder, cfg["vocab_size"])
    return target


def modelfile_path(gguf_file: Path) -> Path:
    """`Modelfile` beside the GGUF file, unless that one belongs to another GGUF file of the
    folder (its FROM line says so): then `NAME.Modelfile`, so exports share a folder safely."""
    plain = gguf_file.parent / "Modelfile"
    if plain.is_file():
        froms = [line.split(None, 1)[1].strip() for line in plain.read_text(errors="replace").splitlines()
                 if line.startswith("FROM ") and len(line.split(None, 1)) == 2]
        if froms and froms[0] != f"./{gguf_file.name}":
            return gguf_file.with_suffix(".Modelfile")
    return plain


def _llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise UsageError(f"--quant {quant} uses llama.cpp's own quantizer: pip install "
                         "llama-cpp-python (`make` installs it), or pick f16 or q8_0") from None
    return llama_cpp


def llamacpp_quantize(src, dst, quant: str) -> None:
    """Quantise the GGUF file `src` to `dst` with llama.cpp's quantizer (`llama-quantize`'s code),
    quietly: llama.cpp logs every tensor."""
    import ctypes
    import logging

    llama_cpp = _llama_cpp(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    log = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log by it
    level = log.level
    # Silence it all: its level table predates ggml's current one (a WARN arrives as ERROR, an
    # ERROR as DEBUG), and the fallback warning is said in our own summary (kquant_fallbacks).
    log.setLevel(logging.CRITICAL + 1)
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                              ctypes.byref(params))
    finally:
        log.setLevel(level)
    if code != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({code}) on {src}")


def model_name(spec) -> str:
    """A short name for general.name and default file names."""
    if str(spec) == models.DEFAULT:
        return models.default_gguf().name.split(".")[0]
    return Path(str(spec)).name.removesuffix(".gguf") or "model"


# llama.cpp graphs that rotate adjacent pairs (2i, 2i+1): HF's rotate-half q/k rows are permuted
# for them (rotary_permute); the other graphs run NeoX-style rope, HF's own layout.
PAIRWISE_ROPE = ("llama",)


@dataclass(frozen=True)
class Target:
    """What one export writes: the family's record and the GGUF architecture llama.cpp loads."""
    arch: archs.Arch
    gguf: str


def check_export(cfg: dict, folder: Path) -> Target:
    """The family record and GGUF architecture when llama.cpp computes the same function as
    transformers for this config (and loads the file); a UsageError naming the key otherwise.
    Runs on config.json alone, before any weight is read."""
    where = f"{folder}/config.json"
    arch = archs.get(cfg, where, "export")
    for key, why in arch.no_graph:
        if cfg.get(key):
            raise UsageError(f"{where} (key `{key}`): {why}; `slm export` supports {arch.name} "
                             "without it")
    name = arch.gguf_arch
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if act not in arch.activations:
        raise UsageError(f"{where}: hidden_act `{act}` is not supported; llama.cpp's {name} "
                         f"graph computes {arch.activations[0]}")
    rope = archs.rope_type(cfg)
    if rope not in arch.rope_types:
        raise UsageError(f"{where} (key `rope_parameters`): rope type `{rope}` has no llama.cpp "
                         f"{name} graph; `slm export` supports {', '.join(arch.rope_types)} for "
                         f"{arch.name}")
    types = cfg.get("layer_types") or []
    if arch.sliding_window == "pattern":
        if types and types != archs.layer_types(arch, cfg["num_hidden_layers"]):
            raise UsageError(f"{where} (key `layer_types`): llama.cpp's {name} graph makes every "
                             f"{arch.layer_pattern}th layer global and the others sliding-window; "
                             "these layers do not follow that pattern")
    elif arch.sliding_window == "refuse" and (cfg.get("use_sliding_window")
                                              or "sliding_attention" in types):
        raise UsageError(f"{where}: sliding-window attention is not supported by `slm export` "
                         f"(llama.cpp's {name} graph attends the whole context)")
    for key, expected, why in arch.graph_constants:
        value = (rope_params(cfg, "sliding_attention")["rope_theta"]
                 if key == "rope_local_base_freq" else cfg.get(key, expected))
        if expected == "head_dim":
            expected = head_dim(cfg)
        if value != expected:
            raise UsageError(f"{where} (key `{key}`): {value}, but {why} ({expected})")
    heads, hidden, dim = cfg["num_attention_heads"], cfg["hidden_size"], head_dim(cfg)
    if heads * dim != hidden:
        # a width-pruned model: some llama.cpp graphs size q/o from hidden alone
        name = arch.head_dim_arch
        if name is None:
            raise UsageError(
                f"{where}: {heads} heads x head_dim {dim} = {heads * dim} is not hidden_size "
                f"{hidden} (a width-pruned model), and llama.cpp's {arch.gguf_arch} graph needs "
                f"them equal, so llama.cpp would not load the export; prune with --hidden "
                f"{heads * dim} (or --heads so that heads x {dim} = hidden)")
    if rotary_dims(cfg) % 2:
        raise UsageError(f"{where}: the rotary dimensions (head_dim x partial_rotary_factor) "
                         "must be even")
    return Target(arch, name)


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rotary_dims(cfg: dict) -> int:
    """How many dimensions of each head rope rotates (Phi-2 rotates the first 40%, say)."""
    rope = cfg.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return int(head_dim(cfg) * factor)


def rope_params(cfg: dict, layer_type: str = "full_attention") -> dict:
    """The rope parameters of `layer_type`'s layers (transformers 5 keeps them per layer type
    for Gemma 3), with rope_theta filled from the older top-level keys."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if layer_type in rope or "full_attention" in rope:
        rope = dict(rope.get(layer_type) or {})
    if "rope_theta" not in rope:
        top = cfg.get("rope_local_base_freq") if layer_type == "sliding_attention" else None
        rope["rope_theta"] = top or cfg.get("rope_theta") or 10000.0
    return rope


def rope_freqs(cfg: dict):
    """Llama 3.x (`rope_type: llama3`) as llama.cpp reads it: a float32 tensor of one factor per
    rotary frequency (head_dim / 2), each frequency divided by it. Wavelengths shorter than
    original_context / high_freq_factor keep their frequency (1), longer than
    original_context / low_freq_factor are divided by `factor`, and those between move
    smoothly from one to the other: the rule transformers' llama3 rope computes."""
    import numpy as np

    rope = rope_params(cfg)
    dims, base = rotary_dims(cfg), float(rope["rope_theta"])
    factor, low, high = (float(rope["factor"]), float(rope["low_freq_factor"]),
                         float(rope["high_freq_factor"]))
    old = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    out = np.where(wavelen < old / high, 1.0,
                   np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def plan_tensors(cfg: dict, target: Target, shapes: dict[str, tuple[int, ...]], quant: str) -> list[Planned]:
    """HF tensor names and shapes -> the tensors of the GGUF file, in llama.cpp's order
    (embedding, rope factors, layers 0..n-1, final norm, output)."""
    import gguf
    import numpy as np

    arch, name_ = target.arch, target.gguf
    tied = bool(cfg.get("tie_word_embeddings", False))
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    arch_id = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[name_]
    names = gguf.get_tensor_name_map(arch_id, cfg["num_hidden_layers"])
    plan = []
    for hf_name, shape in shapes.items():
        if tied and hf_name == "lm_head.weight":
            continue  # the same tensor as token_embd; llama.cpp reuses token_embd when output is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"tensor `{hf_name}` has no place in llama.cpp's {name_} architecture; "
                             f"the checkpoint is not a plain {arch.name} model")
        permute = 0
        if name_ in PAIRWISE_ROPE and name.endswith(("attn_q.weight", "attn_q.bias")):
            permute = heads
        elif name_ in PAIRWISE_ROPE and name.endswith(("attn_k.weight", "attn_k.bias")):
            permute = kv_heads
        offset = arch.norm_offset if hf_name.endswith("norm.weight") else 0.0
        plan.append(Planned(hf_name, name, shape, tensor_type(shape, quant), permute, offset))
    if tied and arch.output_tensor:  # llama.cpp's phi2 graph requires its own output tensor
        embed = "model.embed_tokens.weight"
        plan.append(Planned(embed, "output.weight", shapes[embed], tensor_type(shapes[embed], quant)))
    elif not tied and "lm_head.weight" not in shapes:
        raise UsageError("the checkpoint has untied embeddings but no lm_head.weight; it is incomplete")
    if name_ in PAIRWISE_ROPE and any(t.name.endswith("attn_q.bias") for t in plan) \
            and not any(t.name.endswith("attn_output.bias") for t in plan):
        # a Qwen2 written as llama (width-pruned): readers of llama files (transformers'
        # attention_bias) take q/k/v/o biases all or none, so o gets zeros; llama.cpp adds them
        for layer in range(cfg["num_hidden_layers"]):
            zeros = np.zeros(cfg["hidden_size"], dtype=np.float32)
            plan.append(Planned("", f"blk.{layer}.attn_output.bias", zeros.shape,
                                tensor_type(zeros.shape, quant), data=zeros))
    if archs.rope_type(cfg) == "llama3":
        factors = rope_freqs(cfg)
        plan.append(Planned("", "rope_freqs.weight", factors.shape, tensor_type(factors.shape, quant),
                            data=factors))

    def order(t: Planned):
        m = re.match(r"blk\.(\d+)\.", t.name)
        rank = {"token_embd": -2, "rope_freqs": -1, "output_norm": 1 << 30, "output": 1 << 31}
        return (int(m.group(1)) if m else rank[t.name.rsplit(".", 1)[0]], t.name)

    plan.sort(key=order)
    return plan


def tensor_type(shape: tuple[int, ...], quant: str):
    """The stored type of one tensor (f32, f16 or q8_0). 1-D tensors (norms, biases) stay f32:
    they are tiny and llama.cpp adds/multiplies them in f32. q8_0 needs rows that are whole blocks
    (32 values); other matrices fall back to f16, as llama.cpp's converter does. In q8_0 the
    output projection is q8_0 too, as llama-quantize keeps it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) == 1 or quant == "f32":
        return Q.F32
    if quant == "f16":
        return Q.F16
    assert quant == "q8_0", quant  # the others are llama.cpp's (BY_LLAMACPP)
    return Q.Q8_0 if shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16


def stored_layout(t: Planned):
    """(numpy dtype, bytes, shape as GGUFWriter.add_tensor_info takes it) of a planned tensor."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    n = models.numel(t.shape)
    if t.qtype == Q.F32:
        return np.float32, 4 * n, t.shape
    if t.qtype == Q.F16:
        return np.float16, 2 * n, t.shape
    byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
    return np.uint8, models.numel(byte_shape), byte_shape


def encode(w, qtype):
    """float32 array -> the array written to the file (f32, f16, or quantised bytes)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def rotary_permute(w, n_heads: int):
    """Reorder the rows of a q/k projection (weight [heads*head_dim, in] or bias [heads*head_dim])
    from HF's rotate-half layout to llama.cpp's interleaved one. Within a head, HF rotates row i
    with row i + head_dim/2; llama.cpp rotates rows 2i and 2i+1. So row (half, i) of each head
    moves to position (i, half)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    per_head = w.reshape(n_heads, 2, half, *w.shape[1:])
    return per_head.swapaxes(1, 2).reshape(w.shape)


def write_metadata(writer, cfg: dict, target: Target, quant: str, name: str,
                   phi3_strip: bool = False) -> None:
    import gguf

    arch = target.arch
    heads = cfg["num_attention_heads"]
    dim = head_dim(cfg)
    rope = rope_params(cfg)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_name(general_name(name, phi3_strip))
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])  # phi3: half of gate_up's rows
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(rotary_dims(cfg))
    # an explicit head_dim (Qwen3, Gemma 3, width-pruned students) is written whenever
    # config.json has one, as llama.cpp's converter does; llama.cpp needs it whenever
    # heads x head_dim != hidden, or it takes head_dim = hidden / heads
    if cfg.get("head_dim") or dim * heads != cfg["hidden_size"]:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if arch.norm == "layer":
        writer.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-5)))
    else:
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if arch.sliding_window == "ignored":
        # as llama.cpp's converter writes them; llama.cpp currently attends the whole context
        # even when sliding_window is set (Phi-3-mini: 2047), see export_gguf's note
        writer.add_sliding_window(cfg.get("sliding_window") or 0)
        if cfg.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
    elif arch.sliding_window == "pattern":
        writer.add_sliding_window(cfg["sliding_window"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def general_name(name: str, phi3_strip: bool = False) -> str:
    """general.name, spelled so that readers do not take it for something else."""
    # transformers' GGUF loader reads general.name == "mistral" (exactly) as a Mistral-arch file
    # and then fails to map its tensors; any other spelling is just a name.
    if name == "mistral":
        return "Mistral"
    # llama.cpp applies Phi-3's SentencePiece quirks (strip the whitespace after special tokens;
    # look up </s>, <s>, <unk>) to any vocabulary whose general.name contains "phi3" or "phi-3"
    # and to no other: the name says it exactly when the tokenizer strips as Phi-3's does
    # (phi3_strip, see strip_flags); a byte-level BPE file would tokenise differently, or fail
    # to load without those tokens.
    if phi3_strip:
        return name if re.search(r"(?i)phi-?3", name) else f"{name} phi3"
    return re.sub(r"(?i)(phi)-?(3)", r"\1 \2", name)


def spec_stripping(spec: dict) -> list[str]:
    """The added tokens of tokenizer.json that strip whitespace on a side (lstrip / rstrip)."""
    return [a["content"] for a in spec.get("added_tokens", []) if a.get("lstrip") or a.get("rstrip")]


PHI3_UNSTRIPPED = {"<unk>", "<s>", "<|endoftext|>"}
"""the special tokens llama.cpp's Phi-3 quirk leaves alone; it rstrips every other one"""


def strip_flags(spec: dict, types: list[int]) -> tuple[bool, list[str]]:
    """(phi3_strip, ignored): whether the added tokens' whitespace stripping is exactly what
    llama.cpp does for Phi-3 (rstrip on every control token but PHI3_UNSTRIPPED, lstrip on none),
    and otherwise the tokens whose lstrip/rstrip llama.cpp ignores (it reads no such flags)."""
    added = spec.get("added_tokens", [])
    stripping = spec_stripping(spec)
    if not stripping:
        return False, []
    phi3 = all(bool(a.get("rstrip")) == (a["content"] not in PHI3_UNSTRIPPED) and not a.get("lstrip")
               for a in added if types[a["id"]] == CONTROL)
    control_only = all(types[a["id"]] == CONTROL for a in added if a["content"] in stripping)
    # llama.cpp's quirk looks these up and fails to load the file without them
    present = PHI3_UNSTRIPPED | {"</s>"} <= {a["content"] for a in added}
    return (True, []) if phi3 and control_only and present else (False, stripping)


def kquant_fallbacks(path, quant: str) -> str | None:
    """One line on the tensors llama.cpp's quantizer kept out of K-quants because their rows are
    not whole 256-value super-blocks (it picks Q5_0, Q5_1 or Q8_0 for them instead), or None."""
    from gguf import QK_K, GGUFReader

    if quant not in K_QUANTS:
        return None
    # GGUFReader shapes are ggml's (row length first); 1-D tensors are f32 by design
    kept = [t for t in GGUFReader(str(path)).tensors
            if len(t.shape) >= 2 and not t.tensor_type.name.endswith("_K") and t.shape[0] % QK_K]
    if not kept:
        return None
    types = "/".join(sorted({t.tensor_type.name for t in kept}))
    rows = ", ".join(str(r) for r in sorted({int(t.shape[0]) for t in kept}))
    return (f"{len(kept)} tensors kept in {types}: rows of {rows} values are not whole "
            f"{QK_K}-value K-quant blocks")


# --------------------------------------------------------------------------- tokenizer

def tokenizer_metadata(folder: Path, vocab_size: int) -> dict:
    """Everything llama.cpp needs to tokenise like the HF tokenizer in `folder`:
    the tokenizer model (`gpt2`: byte-level BPE; `llama`: SentencePiece-style BPE with byte
    fallback), tokens in id order (padded to the model's vocab_size), token types, merges (gpt2)
    or scores (llama), the pre-tokenizer name, special ids, add_bos/add_eos, add_space_prefix and
    the chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer in `{folder}`: {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise UsageError(f"{folder}: `slm export` needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(tok.backend_tokenizer.to_str())
    bpe = spec["model"]
    decoder = json.dumps(spec.get("decoder"))
    if bpe.get("type") == "BPE" and not bpe.get("byte_fallback") and "ByteLevel" in decoder:
        kind = "gpt2"
    elif bpe.get("type") == "BPE" and bpe.get("byte_fallback") and "ByteFallback" in decoder:
        kind = "llama"
    else:
        raise UsageError(f"{folder}/tokenizer.json: `slm export` writes byte-level BPE (GPT-2 "
                         "style: SmolLM, Qwen, Phi-2) and SentencePiece-style BPE with byte "
                         "fallback (Llama 2, Mistral, Phi-3, Gemma); this one is "
                         f"{bpe.get('type')}{' with byte fallback' if bpe.get('byte_fallback') else ''}"
                         f" with decoder {(spec.get('decoder') or {}).get('type')}")
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in bpe["vocab"].items()}
    if kind == "llama":
        for t, i in bpe["vocab"].items():
            if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                by_id[i] = (t, BYTE)
        if bpe.get("unk_token") in bpe["vocab"]:
            by_id[bpe["vocab"][bpe["unk_token"]]] = (bpe["unk_token"], UNKNOWN)
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in bpe["vocab"]]
        if missing:
            raise UsageError(f"{folder}/tokenizer.json: byte fallback without the byte tokens "
                             f"{', '.join(missing[:3])}...; llama.cpp needs all 256")
    for added in spec.get("added_tokens", []):
        if by_id.get(added["id"], ("", NORMAL))[1] in (BYTE, UNKNOWN):
            continue
        by_id[added["id"]] = (added["content"], CONTROL if added["special"] else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise UsageError(f"{folder}: the tokenizer has ids up to {max(by_id)} but the model's "
                         f"vocab_size is {vocab_size}; tokenizer and weights do not belong together")
    # ids the tokenizer never produces (embedding rows padded to a round size) become unused tokens
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    probe = tok("a").input_ids  # does the tokenizer itself add BOS/EOS around plain text?
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    out = {
        "model": kind,
        "tokens": [t for t, _ in tokens],
        "types": [k for _, k in tokens],
        "bos": tok.bos_token_id, "eos": tok.eos_token_id,
        "pad": tok.pad_token_id, "unk": tok.unk_token_id,
        "eos_text": tok.eos_token,
        "add_bos": len(probe) > 1 and probe[0] == tok.bos_token_id,
        "add_eos": len(probe) > 1 and probe[-1] == tok.eos_token_id,
        "chat_template": template,
    }
    phi3_strip, ignored = strip_flags(spec, out["types"])
    out.update(phi3_strip=phi3_strip and kind == "llama",
               ignored_strip=ignored or (spec_stripping(spec) if phi3_strip and kind != "llama" else []))
    if kind == "gpt2":
        out.update(merges=merges, pre=pre_tokenizer_name(spec.get("pre_tokenizer"), folder))
    else:
        out.update(scores=merge_scores(out["tokens"], merges),
                   add_space_prefix=space_prefix(spec, folder))
    return out


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp's `llama` tokenizer merge like HF's BPE: it
    repeatedly joins the adjacent pair whose joined piece scores highest, HF the pair whose merge
    ranks first; so a piece scores -(rank of the first merge that makes it). Pieces no merge makes
    (characters, bytes, specials) score 0: llama.cpp never compares them."""
    made: dict[str, int] = {}
    for rank, m in enumerate(merges):
        made.setdefault(m.replace(" ", "", 1), rank)
    return [-float(made[t]) if t in made else 0.0 for t in tokens]


def space_prefix(spec: dict, folder: Path) -> bool:
    """Whether the tokenizer puts "▁" (a space) before the text, as SentencePiece's
    add_dummy_prefix does (Llama 2, Mistral: yes; Gemma: no), from the normalizer's Prepend or
    the Metaspace pre-tokenizer's prepend_scheme; and a check that spaces become "▁" (llama.cpp
    always does that) and nothing else splits the text. One difference stays: transformers'
    Metaspace (Mistral v0.3's tokenizer.json) adds no "▁" to a text that starts with a space,
    where SentencePiece and llama.cpp add one always."""
    def steps(node):
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [s for n in node.get("normalizers", node.get("pretokenizers", [])) for s in steps(n)]
        return [node]

    norm, pre = steps(spec.get("normalizer")), steps(spec.get("pre_tokenizer"))
    prepend = any(s["type"] == "Prepend" and s.get("prepend") == SPACE
                  for s in norm)
    escapes = any(s["type"] == "Replace" and s.get("content") == SPACE
                  for s in norm)
    for s in pre:
        if s["type"] == "Metaspace" and not s.get("split", True):
            escapes = True
            prepend = prepend or s.get("prepend_scheme", "always") in ("first", "always")
        elif not (s["type"] == "Split" and s.get("pattern", {}).get("String") == " "
                  and s.get("behavior") == "MergedWithPrevious"):
            raise UsageError(f"{folder}/tokenizer.json (key `pre_tokenizer`): {s['type']} has no "
                             "llama.cpp SentencePiece equivalent")
    if not escapes:
        raise UsageError(f"{folder}/tokenizer.json (key `normalizer`): spaces are not replaced by "
                         f"\"{SPACE}\" as SentencePiece and llama.cpp's `llama` tokenizer do")
    return prepend


def pre_tokenizer_name(pre: dict | None, folder: Path) -> str:
    """The llama.cpp pre-tokenizer (tokenizer.ggml.pre) that splits text exactly like this HF
    pre-tokenizer. llama.cpp knows pre-tokenizers by name only, so we match the known shapes."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if s]
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"  # single digits, then the GPT-2 regex (SmolLM's tokenizer.json)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise UsageError(f"{folder}/tokenizer.json (key `pre_tokenizer`): no llama.cpp pre-tokenizer is "
                     f"known to match {json.dumps(pre)[:200]}; supported: GPT-2 byte-level, "
                     "SmolLM, Qwen2, Llama 3")


def write_tokenizer(writer, tok: dict) -> None:
    writer.add_tokenizer_model(tok["model"])  # gpt2: byte-level BPE; llama: SentencePiece
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if tok["model"] == "gpt2":
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_merges(tok["merges"])
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(tok["scores"])
        writer.add_add_space_prefix(tok["add_space_prefix"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if tok[key] is not None:
            add(tok[key])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


# --------------------------------------------------------------------------- Ollama

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile(gguf_file: str, chat_template: str | None, eos: str | None) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_file` in the same folder. ChatML templates
    (<|im_start|>role ... <|im_end|>, SmolLM's and Qwen's) get Ollama's Go-template form; for
    other templates Ollama derives one from the GGUF's tokenizer.chat_template."""
    lines = [f"# Ollama: ollama create NAME -f Modelfile", f"FROM ./{gguf_file}"]
    stops = []
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        stops += ["<|im_start|>", "<|im_end|>"]
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
