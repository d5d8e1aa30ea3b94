"""Cut a smaller model out of the teacher by measured importance: whole layers (depth) and
attention heads / KV groups, MLP channels and hidden channels (width). The result is a standard
checkpoint of the same architecture with a plain, homogeneous config.

    slm prune default --target 0.5 --calib data.jsonl --out pruned          # half the parameters
    slm prune default --target 60M --method depth --calib data.jsonl --out pruned
    slm prune default --layers 24 --ffn 1024 --task summarize --out pruned   # an explicit shape
    slm prune default --target 0.5 --dry-run                                 # print the plan only
    slm prune default --target 0.5 --search 4 --calib data.jsonl --out pruned  # compare 4 shapes

Importance comes from forward passes over calibration text (no gradients):
  - depth: Block Influence of each layer, 1 - cos(layer input, layer output) averaged over tokens
    (ShortGPT, arXiv 2403.03853); the layers that change the residual stream least go first;
  - width (Minitron, arXiv 2407.14679): a head by the L2 norm of its output (the input of o_proj,
    split per head), an MLP channel by its |activation| (the input of down_proj / fc2), a hidden
    channel by the |output| of every RMSNorm/LayerNorm that reads the residual stream; each is
    averaged over the sequence, then aggregated as an L2 norm over the batch. A KV group scores
    the sum of its heads.

Budget rule (`--target`): parameters are counted exactly from the weight shapes.
  - depth: the most layers that fit the budget;
  - width: candidates are every hidden size on a grid of 32 (8 for dimensions under 256, so GGUF
    block quantisation still tiles the rows), with every valid head count that divides it (KV
    groups x heads per group, as many KV groups as possible), and the largest MLP on its grid of
    32 that fits. The rule shrinks hidden, heads and MLP as evenly as possible: it picks the
    candidate whose smallest kept fraction is largest, then the one closest to the target from
    below;
  - both: first remove up to a quarter of the layers (ShortGPT drops ~25% with modest loss);
    when that alone does not reach the budget, the width rule shrinks the rest.
When hidden channels go, each RMSNorm weight is scaled so the kept channels keep their
calibration scale (see norm_rescale()). With --refit, each kept layer's MLP output projection
(down_proj / fc2) is refitted by ridge least squares so that the kept channels reproduce the whole
MLP's output on the calibration tokens (see refit_mlp()). It is off by default: on SmolLM2 (the
grammar student, 30 layers, MLP 1536 -> 480) it lowered the held-out CE at the start of
distillation from 2.71 to 1.60 nats, yet after the grammar recipe's distillation the refitted
student scored GLEU 47.7 against 51.4 for the sliced one (README): a better start that trains to
no better end. It serves a model used without retraining.
head_dim never changes: config.head_dim is written explicitly, so hidden need not equal
heads * head_dim (as in Llama-3.1-Minitron-4B-Width: hidden 3072, 32 heads of 128); hidden must
still be a multiple of the head count, which transformers' LlamaConfig checks. Phi-2 and Phi-3
are the exception: llama.cpp's phi2/phi3 graphs size q by hidden, so for them the width rule keeps
hidden = heads x head_dim and explicit shapes must too (fixed_head_dim()): every pruned model
exports. (A Qwen2 with hidden != heads x head_dim exports as llama.cpp's llama graph, see export.py.)
Gemma 3 (docs/architectures.md): importance from the norms that feed each branch, not the post-
norms of its output; (1 + w) norms rescaled as (1 + w) (archs.scale_norm); its sqrt(hidden)
embedding scale kept by scaling the branch output norms (apply_plan()); depth cuts keep llama.cpp's
fixed pattern of 5 sliding-window layers then 1 global (archs.keep_layers).

Shape search (`--search N`, see search_candidates()): N shapes at the budget, from "keep every
layer, cut the MLP" to "cut layers, keep the MLP", each with every attention head and the full
hidden size. Each is cut from importance measured once and scored by its held-out loss (next-token
NLL before any training) on a part of the calibration data that importance never saw; the lowest
loss is written. Minitron and ModelOpt's NAS rank candidate shapes the same way before a short
distillation; here the start-of-distill loss ranked the grammar students as distillation did.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from slmkit import archs, models, precision
from slmkit.cli import AT_LEAST_1, Check, add_config_arguments, check_options, config_from_args, option
from slmkit.errors import UsageError

METHODS = ("depth", "width", "both")
DEPTH_CAP = 0.25
"""`both`: the most layers (as a fraction of all) removed before width pruning starts."""

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
RULES = {  # how the shape was chosen, as written into prune_plan.json
    "shape": "explicit shape",
    "depth": "depth: the most layers that fit the target",
    "width": "width: hidden, heads and ffn shrunk as evenly as possible, closest to the target from below",
    "both": f"both: up to {DEPTH_CAP:.0%} of the layers first, then width (shrunk as evenly as possible)",
    "search": "search: shapes at the target trading layers against MLP (hidden and heads kept), "
              "the lowest held-out loss before training",
}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int

SHAPE_KEYS = tuple(f.name for f in fields(Shape))  # layers, hidden, ffn, heads, kv_heads


class ShapeFlag(argparse.Action):
    """`--layers 2 --ffn 32` -> shape={"layers": 2, "ffn": 32}."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.shape = (namespace.shape or {}) | {option_string[2:].replace("-", "_"): value}


@dataclass
class PruneConfig:
    """One `slm prune` run; CLI flags are these names with dashes, `shape` is the five below."""

    model: str = option(help="the teacher: HF folder, .gguf file, or `default`", flags=("model",),
                        wired=True)
    out: str | None = option(None, "folder for the pruned model (a standard HF checkpoint)",
                             wired=True)
    target: float | str | None = option(None, "parameter budget: a fraction (0.5) or a count (60M, "
                                        "1.2B)")
    method: str | None = option(None, "how a --target is met: layers, width, or layers then width "
                                "(both, the default)", choices=METHODS)
    search: int | None = option(None, "compare N shapes at the --target (layers traded against MLP, "
                                "every head kept) by held-out loss on --calib; write the best",
                                metavar="N")
    shape: dict | None = option(None, "explicit shape: the layers, hidden size, MLP size, heads and "
                                "KV heads to keep (those not given keep the teacher's)",
                                flags=tuple("--" + k.replace("_", "-") for k in SHAPE_KEYS),
                                type=int, action=ShapeFlag, metavar="N")
    calib: str | None = option(None, "calibration text: .jsonl (string fields joined) or .txt",
                               wired=True)
    task: str | None = option(None, "use this task preset's examples as calibration data",
                              wired=True)
    num_samples: int | None = option(None, "calibration rows (default 256 on CUDA, 16 on CPU); with "
                                     "--search also the most held-out rows", check=AT_LEAST_1)
    seq_len: int = option(256, "tokens per calibration row",
                          check=Check(lambda v: v >= 2, "at least 2"))
    seed: int = option(0, "shuffles the calibration texts")
    refit: bool = option(False, "refit each pruned MLP's output projection to the teacher's MLP "
                         "output on the calibration tokens (ridge least squares): a better model "
                         "before training, not a better one after distilling grammar (README)")
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: CUDA when present)", wired=True)
    dry_run: bool = option(False, "print the plan; load no weights, write nothing")
    trust_remote_code: bool = option(False, "allow a model folder that ships its own code (off by "
                                     "default)", wired=True)

    def __post_init__(self):
        if self.search is not None:
            self._check_search()
        elif (self.target is None) == (self.shape is None):
            raise UsageError("give either --target (a parameter budget) or an explicit shape "
                             "(--layers/--hidden/--ffn/--heads/--kv-heads), not both or neither")
        unknown = set(self.shape or ()) - set(SHAPE_KEYS)
        if unknown:
            raise UsageError(f"shape: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"use {', '.join(SHAPE_KEYS)}")
        if not self.dry_run and self.out is None:
            raise UsageError("give --out FOLDER for the pruned model (or --dry-run)")
        check_options(self)

    def _check_search(self):
        if self.search < 2:
            raise UsageError(f"--search {self.search}: give the number of shapes to compare, at least 2")
        if self.target is None:
            raise UsageError("--search needs --target: the parameter budget every candidate shape "
                             "must fit (e.g. --target 0.5)")
        if self.method is not None:
            raise UsageError(f"--method {self.method} with --search: the search compares shapes "
                             "of its own at the --target; give one of the two")
        for key in sorted(set(self.shape or ()) & {"layers", "ffn"}):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} with --search: the search chooses the layers and MLP size "
                             "itself; only --hidden, --heads and --kv-heads may be fixed")
        if not self.dry_run and self.calib is None and self.task is None:
            raise UsageError("--search needs --calib FILE (or --task PRESET): its held-out part "
                             "scores the candidate shapes")


# --------------------------------------------------------------------------- shapes and counts

def source_shape(cfg: dict) -> Shape:
    heads = cfg["num_attention_heads"]
    return Shape(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                 ffn=cfg["intermediate_size"], heads=heads,
                 kv_heads=cfg.get("num_key_value_heads") or heads)


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def check_arch(cfg: dict, where: str) -> archs.Arch:
    return archs.get(cfg, where, "prune")


def axes(arch: archs.Arch, key: str, ndim: int) -> tuple:
    module = key.split(".")[-2]
    if module not in arch.axes:
        raise UsageError(f"slm prune does not know how to prune parameter `{key}` of a "
                         f"{arch.name} model; see docs/architectures.md")
    return arch.axes[module][:ndim]


def layer_of(key: str) -> int | None:
    m = LAYER_RE.search(key)
    return int(m.group(1)) if m else None


def axis_sizes(shape: Shape, hd: int) -> dict[str, int]:
    return {"hidden": shape.hidden, "q": shape.heads * hd, "kv": shape.kv_heads * hd,
            "qkv": (shape.heads + 2 * shape.kv_heads) * hd, "ffn": shape.ffn, "ffn2": 2 * shape.ffn}


def count_params(cfg: dict, shapes: dict[str, list[int]], dst: Shape) -> int:
    """Exact parameter count of the model `dst` would give, from the source's weight shapes
    (safetensors headers; no weights loaded). Tied embeddings count once."""
    sizes = axis_sizes(dst, head_dim(cfg))
    arch = archs.TABLE[cfg["model_type"]]
    new = {}
    for key, shape in shapes.items():
        layer = layer_of(key)
        if layer is not None and layer >= dst.layers:  # layers are homogeneous: any dst.layers do
            continue
        new[key] = [sizes[a] if a else d for a, d in zip(axes(arch, key, len(shape)), shape)]
    return models.describe_shapes(cfg, new)["parameters"]


def header_shapes(folder: Path) -> dict[str, list[int]]:
    return {name: meta["shape"] for name, meta in models.tensor_headers(folder).items()}


def fixed_head_dim(cfg: dict) -> int:
    """head_dim when the family's llama.cpp graph needs heads x head_dim == hidden (phi2, phi3:
    archs.Arch.head_dim_arch is None), so that every pruned model exports; else 0 (free)."""
    return head_dim(cfg) if archs.TABLE[cfg["model_type"]].head_dim_arch is None else 0


def check_shape(src: Shape, dst: Shape, fixed_hd: int = 0) -> None:
    """Raise a UsageError naming the flag when `dst` cannot be cut out of `src` (`fixed_hd`:
    fixed_head_dim())."""
    for flag, new, old in (("--layers", dst.layers, src.layers), ("--hidden", dst.hidden, src.hidden),
                           ("--ffn", dst.ffn, src.ffn), ("--kv-heads", dst.kv_heads, src.kv_heads),
                           ("--heads", dst.heads, src.heads)):
        if not 1 <= new <= old:
            raise UsageError(f"{flag} {new}: must be between 1 and the model's {old} "
                             "(pruning only removes)")
    if dst.hidden % dst.heads:
        raise UsageError(f"--hidden {dst.hidden} is not divisible by --heads {dst.heads}; "
                         "transformers requires hidden_size to be a multiple of the head count")
    if fixed_hd and dst.heads * fixed_hd != dst.hidden:
        raise UsageError(f"--hidden {dst.hidden} with --heads {dst.heads}: this family's llama.cpp "
                         f"graph needs hidden = heads x head_dim ({fixed_hd}), or the pruned model "
                         f"would not export; give --hidden {dst.heads * fixed_hd} or --heads "
                         f"{dst.hidden // fixed_hd}")
    if dst.heads % dst.kv_heads:
        raise UsageError(f"--heads {dst.heads} is not divisible by --kv-heads {dst.kv_heads}; "
                         "every KV group must keep the same number of query heads")
    per_group = src.heads // src.kv_heads
    if dst.heads // dst.kv_heads > per_group:
        raise UsageError(f"--heads {dst.heads} with --kv-heads {dst.kv_heads} needs "
                         f"{dst.heads // dst.kv_heads} heads per KV group but the model has "
                         f"{per_group}; use --heads <= {dst.kv_heads * per_group}")


def explicit_shape(src: Shape, layers=None, hidden=None, ffn=None, heads=None, kv_heads=None,
                   fixed_hd: int = 0) -> Shape:
    """Fill unspecified dimensions from the source. For GQA, --kv-heads alone keeps the heads per
    group; --heads alone keeps the KV groups. For MHA (heads == kv heads) they move together."""
    per_group = src.heads // src.kv_heads
    if heads is None and kv_heads is not None:
        heads = kv_heads * per_group
    if kv_heads is None and heads is not None:
        kv_heads = heads if per_group == 1 else src.kv_heads
    dst = Shape(layers=layers or src.layers, hidden=hidden or src.hidden, ffn=ffn or src.ffn,
                heads=heads or src.heads, kv_heads=kv_heads or src.kv_heads)
    for flag, v in (("--layers", layers), ("--hidden", hidden), ("--ffn", ffn), ("--heads", heads),
                    ("--kv-heads", kv_heads)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} {v}: must be a positive number")
    check_shape(src, dst, fixed_hd)
    return dst


def parse_target(text, total: int) -> int:
    """`0.5` (fraction of the parameters), `60M`, `1.2B`, `800K` or a plain count -> parameters."""
    s = str(text).strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(s[-1:], None)
    try:
        value = float(s[:-1] if scale else s)
    except ValueError:
        raise UsageError(f"--target {text}: give a fraction of the parameters (0.5) or a count "
                         "(60M, 1.2B, 800K, 60000000)") from None
    if not math.isfinite(value):
        raise UsageError(f"--target {text}: give a finite number: a fraction of the parameters "
                         "(0.5) or a count (60M)")
    fraction = scale is None and ("." in s or value < 1)  # 0.5 and 1.0 are fractions, 60000000 a count
    n = round(value * total) if fraction else round(value * (scale or 1))
    if n <= 0:
        raise UsageError(f"--target {text}: must be positive")
    if n >= total:
        raise UsageError(f"--target {text}: {n:,} parameters is not smaller than the model "
                         f"({total:,}); give a fraction below 1 or a smaller count")
    return n


def step_of(full: int) -> int:
    """Width dimensions move in multiples of 32 (8 for dimensions under 256), so GGUF's 32-value
    quantisation blocks still tile every row."""
    return 32 if full >= 256 else 8


def head_counts(src: Shape) -> list[tuple[int, int]]:
    """Valid (heads, kv_heads) pairs: kv groups x heads per group, neither above the source's;
    for each head count the pair with the most KV groups."""
    per_group = src.heads // src.kv_heads
    pairs = {}
    for kv in range(1, src.kv_heads + 1):
        for p in range(1, per_group + 1):
            pairs[kv * p] = max(pairs.get(kv * p, 0), kv)
    return sorted(pairs.items(), reverse=True)


def width_candidates(src: Shape, layers: int, count, target: int, fixed_hd: int = 0) -> list[Shape]:
    """Every hidden size on the step grid, with every valid head count that divides it (that
    times `fixed_hd` makes it, when given: fixed_head_dim()), and the largest MLP (on its grid)
    that still fits the budget."""
    out = []
    h_step, f_step = step_of(src.hidden), step_of(src.ffn)
    for hidden in range(src.hidden, 0, -h_step):
        for heads, kv in head_counts(src):
            if hidden % heads or (fixed_hd and heads * fixed_hd != hidden):
                continue
            shape = largest_ffn(src, Shape(layers=layers, hidden=hidden, ffn=f_step, heads=heads,
                                           kv_heads=kv), count, target)
            if shape is not None:
                out.append(shape)
    return out


def largest_ffn(src: Shape, base: Shape, count, target: int) -> Shape | None:
    """`base` with the largest MLP on the grid of step_of(src.ffn) (up to src.ffn) that fits the
    budget; None when not even one step fits."""
    f_step = step_of(src.ffn)
    if count(replace(base, ffn=src.ffn)) <= target:
        return replace(base, ffn=src.ffn)
    if count(replace(base, ffn=f_step)) > target:
        return None
    lo, hi = 1, src.ffn // f_step  # largest k with count(ffn = k * f_step) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(replace(base, ffn=mid * f_step)) <= target else (lo, mid - 1)
    return replace(base, ffn=lo * f_step)


def search_candidates(src: Shape, count, target: int, n: int, base: Shape | None = None) -> list[Shape]:
    """N shapes for `--search`, spread evenly over the family at the budget: for every layer
    count, from all of them down to the most that fit with the full MLP (the depth rule's
    answer), the largest MLP on its grid that fits; fewer when the family is smaller.
    `base` gives the hidden size and heads every candidate keeps (default: the teacher's).

    Why this family: every candidate keeps every attention head and the hidden size, because
    what cut heads lost did not come back in distillation (README: the demo's student shapes),
    and trades depth against MLP, the choice the measured winners differ in: 18 layers with
    3/4 of the MLP for summarize, all 30 with under 1/3 for grammar (which copies through
    attention). Fewer layers also decode faster on a CPU; the held-out loss decides the rest."""
    base = base or src
    family = []
    for layers in range(src.layers, 0, -1):
        shape = largest_ffn(src, replace(base, layers=layers), count, target)
        if shape is None:  # too deep for even the smallest MLP
            continue
        family.append(shape)
        if shape.ffn == src.ffn:  # the full MLP fits: fewer layers only move away from the target
            break
    if not family:
        raise UsageError(f"--target: {target:,} parameters cannot be reached with hidden "
                         f"{base.hidden} and {base.heads} heads even at one layer; use a larger "
                         "target, or give a smaller --hidden/--heads with --search")
    if len(family) <= n:
        return family
    return [family[round(i * (len(family) - 1) / (n - 1))] for i in range(n)]


def plan_shape(src: Shape, count, target: int, method: str, fixed_hd: int = 0) -> Shape:
    """The shape the budget rule (module docstring) picks; `count(shape) -> parameters`;
    `fixed_hd`: fixed_head_dim()."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")

    def by_depth(max_removed: int) -> Shape | None:
        for n in range(1, max_removed + 1):
            shape = replace(src, layers=src.layers - n)
            if count(shape) <= target:
                return shape
        return None

    def by_width(layers: int) -> Shape | None:
        # shrink hidden, heads and MLP as evenly as possible: maximise the smallest kept
        # fraction; among equals, the most parameters (the candidate closest from below)
        def key(s):
            return (min(s.hidden / src.hidden, s.heads / src.heads, s.ffn / src.ffn), count(s))
        return max(width_candidates(src, layers, count, target, fixed_hd), key=key, default=None)

    if method == "depth":
        shape = by_depth(src.layers - 1)
    elif method == "width":
        shape = by_width(src.layers)
    else:
        cap = max(1, int(src.layers * DEPTH_CAP))
        shape = by_depth(cap) or by_width(src.layers - cap)
    if shape is None:
        others = " or ".join(f"--method {m}" for m in METHODS if m != method)
        raise UsageError(f"--target: {target:,} parameters cannot be reached with --method "
                         f"{method}; use a larger target, or try {others}")
    return shape


# --------------------------------------------------------------------------- calibration

def calibration_texts(calib=None, task: str | None = None) -> list[str]:
    """Texts from a .txt/.jsonl file, else from a task preset's shipped examples; lines marked
    "split": "eval" never calibrate (the held-out lines must not choose what the student keeps)."""
    from slmkit import data, tasks

    if calib is not None:
        return data.calibration_texts(calib, what="--calib", train_only=True)
    if task is not None:
        examples = data.load_examples(tasks.preset_data(task), task=tasks.get_task(task), split="train")
        texts = ["\n".join(t for t in (ex.prompt, ex.answer, ex.text) if t) for ex in examples]
        return [t for t in texts if t.strip()]
    raise UsageError("give calibration data: --calib FILE (.txt or .jsonl) or --task PRESET")


def calibration_batch(tokenizer, texts: list[str], num_samples: int, seq_len: int, seed: int = 0):
    """Shuffle the texts (seeded), tokenise them with EOS between, and cut the stream into
    `num_samples` rows of `seq_len` tokens (fewer when the data run out; no padding anywhere).
    Returns a LongTensor (N, T)."""
    import torch

    order = list(texts)
    random.Random(seed).shuffle(order)
    need = num_samples * seq_len
    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in order:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if len(stream) >= need:
            break
    if len(stream) <= len(eos):
        raise UsageError("the calibration data hold no tokens; give a file with text")
    if len(stream) < seq_len:
        return torch.tensor([stream])
    n = min(num_samples, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def search_split(texts: list[str]) -> tuple[list[str], list[str]]:
    """(importance texts, held-out texts) for `--search`: data.held_out's rule over the texts
    (10 %, at least 1, at most 100, a fixed-seed shuffle), so the same texts score the shapes
    whatever --seed, and importance never sees them."""
    from slmkit import data

    if len(texts) < 2:
        raise UsageError("--search needs at least 2 calibration texts: one part measures "
                         "importance, a held-out part scores the shapes")
    held = data.held_out([{} for _ in texts])
    return ([t for t, h in zip(texts, held) if not h], [t for t, h in zip(texts, held) if h])


def heldout_loss(model, ids) -> float:
    """Mean next-token NLL (nats per predicted token) of `model` on ids (N, T): every row predicts
    its tokens 1..T-1 from those before, N x (T - 1) predictions; float32 log-probs under the
    precision rule (slmkit.scoring)."""
    from slmkit import scoring

    if ids.shape[1] < 2:
        raise UsageError("the held-out calibration text is a single token; give more text")
    sums = scoring.score_spans(model, [(row.tolist(), 1) for row in ids], desc="held-out loss",
                               unit="row")
    return -sum(sums) / (ids.shape[0] * (ids.shape[1] - 1))


# --------------------------------------------------------------------------- importance

def _modules(model):
    """(decoder layers, [(attention output proj, MLP down proj, [norms]) per layer], final norm),
    the modules named by the family's record (archs.TABLE). A layer's norms are its branch norms
    (they read the residual stream), then its branch output norms (Gemma 3)."""
    base, arch = model.model, archs.TABLE[model.config.model_type]
    parts = [(layer.get_submodule(arch.attn_out), layer.get_submodule(arch.mlp_down),
              [getattr(layer, n) for n in arch.branch_norms + arch.output_norms])
             for layer in base.layers]
    return base.layers, parts, getattr(base, arch.final_norm)


def measure_importance(model, ids, batch_size: int = 8, device=None) -> dict:
    """Forward passes over `ids` (N, T) with hooks; returns float32 CPU tensors:
    block_influence (L,), heads (L, H), ffn (L, F), hidden (L, D) summed over each layer's norms,
    and final_hidden (D,) from the final norm; energy (L, norms per layer, D) and final_energy (D,)
    are the mean squares of the norms' inputs (for norm_rescale())."""
    import torch
    from tqdm import tqdm

    cfg = model.config
    device = device or next(model.parameters()).device
    layers, parts, final_norm = _modules(model)
    branch = len(archs.TABLE[cfg.model_type].branch_norms)  # norms that read the residual stream
    L, H, hd = len(layers), cfg.num_attention_heads, model.model.layers[0].self_attn.head_dim
    sq = {"heads": torch.zeros(L, H), "ffn": torch.zeros(L, cfg.intermediate_size),
          "hidden": torch.zeros(L, cfg.hidden_size), "final_hidden": torch.zeros(cfg.hidden_size)}
    bi_sum, tokens = torch.zeros(L), [0]
    # mean square of each norm's input per channel, for norm_rescale(); phi has one norm a layer,
    # Gemma 3 four (two feed the branches, two normalise their outputs)
    energy = {"energy": torch.zeros(L, len(parts[0][2]), cfg.hidden_size),
              "final_energy": torch.zeros(cfg.hidden_size)}

    def add_energy(name, index, x):  # x (B, T, D)
        energy[name][index] += x.float().pow(2).sum((0, 1)).cpu()

    def add(name, i, x):  # x (B, D): per-sequence means; squares summed = L2 over the batch later
        x = x.float().cpu().pow(2).sum(0)
        if i is None:
            sq[name] += x
        else:
            sq[name][i] += x

    hooks = []
    for i, (attn_out, down, norms) in enumerate(parts):
        hooks.append(attn_out.register_forward_pre_hook(
            lambda m, a, i=i: add("heads", i, a[0].unflatten(-1, (H, hd)).norm(dim=-1).mean(1))))
        hooks.append(down.register_forward_pre_hook(
            lambda m, a, i=i: add("ffn", i, a[0].abs().mean(1))))
        for k, norm in enumerate(norms):
            hooks.append(norm.register_forward_pre_hook(
                lambda m, a, i=i, k=k: add_energy("energy", (i, k), a[0])))
            if k < branch:  # hidden importance: what each branch reads, not what it writes
                hooks.append(norm.register_forward_hook(
                    lambda m, a, out, i=i: add("hidden", i, out.abs().mean(1))))

        def block(m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            bi_sum[i] += (1 - cos).sum().cpu()
            if i == 0:
                tokens[0] += cos.numel()
        hooks.append(layers[i].register_forward_hook(block, with_kwargs=True))
    hooks.append(final_norm.register_forward_pre_hook(
        lambda m, a: add_energy("final_energy", slice(None), a[0])))
    hooks.append(final_norm.register_forward_hook(
        lambda m, a, out: add("final_hidden", None, out.abs().mean(1))))
    try:
        with torch.no_grad(), precision.autocast(device):
            for start in tqdm(range(0, len(ids), batch_size), desc="importance", unit="batch",
                              file=sys.stderr, total=math.ceil(len(ids) / batch_size)):
                # the base model only: importance needs no logits, and skipping lm_head saves time
                model.model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    scores = {k: v.sqrt() for k, v in sq.items()}
    scores["block_influence"] = bi_sum / max(tokens[0], 1)
    scores.update({k: v / max(tokens[0], 1) for k, v in energy.items()})
    return scores


def _top(scores, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (order is what weights need)."""
    import torch

    return sorted(torch.topk(scores.float(), k).indices.tolist())


def select(scores: dict, src: Shape, dst: Shape, arch: archs.Arch | None = None,
           layer_types: list[str] | None = None) -> dict:
    """What to keep, from importance scores (higher = more important):
    layers (L',), hidden (D',), and per kept layer: kv_groups (K',), heads (H',) ordered group by
    group, ffn (F',). Pass random scores for a random baseline of the same shape. A family with a
    layer pattern (`arch.layer_pattern`) keeps the best layers whose `layer_types` follow it
    (archs.keep_layers)."""
    if arch is not None and arch.layer_pattern and dst.layers < src.layers:
        layers = archs.keep_layers(arch, scores["block_influence"].tolist(), layer_types, dst.layers)
    else:
        layers = _top(scores["block_influence"], dst.layers)
    hidden_score = scores["hidden"][layers].sum(0) + scores["final_hidden"]
    keep = {"layers": layers, "hidden": _top(hidden_score, dst.hidden),
            "kv_groups": [], "heads": [], "ffn": []}
    per_group, new_per_group = src.heads // src.kv_heads, dst.heads // dst.kv_heads
    for layer in layers:
        heads = scores["heads"][layer].view(src.kv_heads, per_group)  # (K, H/K): heads by group
        groups = _top(heads.sum(1), dst.kv_heads)
        keep["kv_groups"].append(groups)
        keep["heads"].append([g * per_group + h for g in groups for h in _top(heads[g], new_per_group)])
        keep["ffn"].append(_top(scores["ffn"][layer], dst.ffn))
    return keep


# --------------------------------------------------------------------------- surgery

def _index(keep: dict, j: int, src: Shape, hd: int) -> dict:
    """Row/column indices of every axis kind for kept layer number j (LongTensors)."""
    import torch

    def expand(units):  # head index -> its head_dim rows
        return (torch.tensor(units)[:, None] * hd + torch.arange(hd)).flatten()

    q, kv = expand(keep["heads"][j]), expand(keep["kv_groups"][j])
    ffn = torch.tensor(keep["ffn"][j])
    return {"hidden": torch.tensor(keep["hidden"]), "q": q, "kv": kv, "ffn": ffn,
            "qkv": torch.cat([q, src.heads * hd + kv, (src.heads + src.kv_heads) * hd + kv]),
            "ffn2": torch.cat([ffn, src.ffn + ffn])}


def pruned_tensors(state: dict, keep: dict, src: Shape, hd: int, arch: archs.Arch):
    """Every tensor of `state` sliced to the kept layers / heads / channels, layers renumbered
    0..L'-1, as (key, tensor) one at a time: a caller copying them into place never holds a
    second whole cut model (a 1.5B cut to half: 1.8 GB in bf16)."""
    position = {layer: j for j, layer in enumerate(keep["layers"])}
    outer = _index(keep, 0, src, hd) if keep["layers"] else {}  # hidden is the same everywhere
    for key, t in state.items():
        layer = layer_of(key)
        index = outer
        if layer is not None:
            if layer not in position:
                continue
            index = _index(keep, position[layer], src, hd)
            key = key.replace(f".layers.{layer}.", f".layers.{position[layer]}.", 1)
        for dim, axis in enumerate(axes(arch, key, t.dim())):
            if axis:
                t = t.index_select(dim, index[axis].to(t.device))
        yield key, t.contiguous()


def pruned_config(config, keep: dict, dst: Shape, hd: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = dst.layers, dst.hidden, dst.ffn
    cfg.num_attention_heads, cfg.num_key_value_heads = dst.heads, dst.kv_heads
    cfg.head_dim = hd  # kept fixed; hidden may now differ from heads * head_dim
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [config.layer_types[i] for i in keep["layers"]]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = sum(i < config.max_window_layers for i in keep["layers"])
    return cfg


def norm_rescale(scores: dict, keep: dict, src: Shape) -> dict:
    """RMSNorm factors for hidden pruning. RMSNorm divides by the root mean square over the
    channels it sees; over D' kept channels that mean is S_kept/D' instead of S/D, so the kept
    outputs would be multiplied by sqrt(S D' / (S_kept D)) (below 1 when the kept channels hold
    more than their share D'/D of the energy, as important channels do). Scaling each norm's weight by
    sqrt(D/D' * S_kept/S) (S from calibration) restores their scale. Measured on SmolLM2 at half
    size (`both`): held-out perplexity 1052 -> 647 before any retraining.
    The factors are per norm of a layer (_modules' order), branch output norms included: their
    input is a branch's output, cut to the kept channels the same way.
    Returns {"layers": [[factor per norm] per kept layer], "final": factor}."""
    kept = keep["hidden"]
    ratio = src.hidden / len(kept)

    def factor(e):  # e (D,) mean squares
        return float((ratio * e[kept].sum() / e.sum().clamp_min(1e-30)).sqrt())

    return {"layers": [[factor(e) for e in scores["energy"][layer]] for layer in keep["layers"]],
            "final": factor(scores["final_energy"])}


def apply_plan(model, keep: dict, dst: Shape, rescale: dict | None = None):
    """A new model of the same class holding only what `keep` names (see select()); `rescale`
    (norm_rescale()) multiplies the norm weights when hidden channels go.
    A family that scales its embeddings by sqrt(hidden) (Gemma 3) has them shrink by
    c = sqrt(D'/D) once hidden is D' (archs.embed_factor). The norms that read the residual stream
    do not mind its scale, but what the branches add to it must shrink by c too, so their output
    norms (archs.Arch.output_norms) take a factor c: the whole stream is then c times the
    original's on the kept channels, and every branch reads what it read. (The embedding matrix
    itself cannot take the factor: tied, it is the output projection too.)"""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    arch = archs.TABLE[cfg["model_type"]]
    src, hd = source_shape(cfg), model.model.layers[0].self_attn.head_dim
    new = AutoModelForCausalLM.from_config(pruned_config(model.config, keep, dst, hd),
                                           dtype=next(model.parameters()).dtype)
    target, unset = new.state_dict(), set(new.state_dict())
    with torch.no_grad():  # load_state_dict(strict=True), one cut tensor alive at a time
        for key, t in pruned_tensors(model.state_dict(), keep, src, hd, arch):
            if key not in target or target[key].shape != t.shape:
                raise RuntimeError(f"pruned tensor {key} {tuple(t.shape)} does not fit the cut "
                                   f"model's {tuple(target[key].shape) if key in target else 'nothing'}")
            target[key].copy_(t)
            unset.discard(key)
    if unset:
        raise RuntimeError(f"the cut left {len(unset)} tensors of the new model unset, e.g. {min(unset)}")
    _, parts, final = _modules(new)
    c = archs.embed_factor(arch, src.hidden, dst.hidden)
    if c != 1.0:
        with torch.no_grad():
            for _, _, norms in parts:
                for norm in norms[len(arch.branch_norms):]:
                    archs.scale_norm(arch, norm.weight, c)
    if rescale:
        with torch.no_grad():
            for factors, (_, _, norms) in zip(rescale["layers"], parts):
                for f, norm in zip(factors, norms):
                    archs.scale_norm(arch, norm.weight, f)
            archs.scale_norm(arch, final.weight, rescale["final"])
    if model.config.tie_word_embeddings:
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.to(next(model.parameters()).device).eval()


def cut(model, scores: dict, src: Shape, dst: Shape, refit_ids=None):
    """select() + norm_rescale() + apply_plan(), then refit_mlp() on `refit_ids` (N, T) when MLP
    channels go: (pruned model, keep, rescale, refit record or None)."""
    arch = archs.TABLE[model.config.model_type]
    keep = select(scores, src, dst, arch, getattr(model.config, "layer_types", None))
    # LayerNorm (phi) also centres its input, so the RMS factor would not be right there
    rescale = (norm_rescale(scores, keep, src)
               if dst.hidden < src.hidden and arch.norm != "layer" else None)
    pruned = apply_plan(model, keep, dst, rescale)
    refit = refit_mlp(model, pruned, keep, refit_ids) if refit_ids is not None and dst.ffn < src.ffn else None
    return pruned, keep, rescale, refit


REFIT_RIDGE = 1e-2
"""refit_mlp()'s ridge, as a fraction of the mean diagonal of the kept channels' Gram matrix:
of 1e-3, 1e-2 and 1e-1 on the grammar student (MLP 1536 -> 480, 4,096 calibration tokens), the
middle gave the lowest held-out loss before training (less overfits the calibration tokens, more
underfits)."""


def refit_mlp(model, pruned, keep: dict, ids, ridge: float = REFIT_RIDGE, batch_size: int = 8) -> dict:
    """Refit each kept layer's MLP output projection in `pruned` (down_proj, or Phi's fc2 with its
    bias) so that its kept channels best reproduce the teacher's full MLP output on the tokens of
    `ids` (N, T): with a (tokens, F') the kept channels' activations in the teacher and y (tokens,
    D') the teacher's MLP output at the kept hidden channels, the new weight is
    W = (a^T a + ridge * mean(diag) I)^-1 a^T y (ridge least squares; with a column of ones for a
    bias). Slicing alone keeps the old weights, which assumed the cut channels' contribution too.
    The activations come from the teacher, in one forward pass; memory per kept layer is
    F' x (F' + D') floats. Returns {"ridge", "tokens", "error_before", "error_after"}: per kept layer
    the relative squared error ||y - a W||^2 / ||y||^2 of the sliced and of the refitted weights on
    those tokens."""
    import torch

    _, parts, _ = _modules(model)
    device = next(model.parameters()).device
    hidden = torch.tensor(keep["hidden"], device=device)
    stats = {}  # kept layer j -> [a^T a, a^T y, y^T y (scalar)], float32 on the model's device
    has_bias = parts[0][1].bias is not None

    def hook(m, args, out, j, channels):
        a = args[0].reshape(-1, args[0].shape[-1])[:, channels].float()
        if has_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        y = out.reshape(-1, out.shape[-1])[:, hidden].float()
        s = stats.setdefault(j, [0, 0, 0])
        s[0], s[1], s[2] = s[0] + a.T @ a, s[1] + a.T @ y, s[2] + y.pow(2).sum()

    hooks = [parts[layer][1].register_forward_hook(
                 functools.partial(hook, j=j, channels=torch.tensor(keep["ffn"][j], device=device)))
             for j, layer in enumerate(keep["layers"])]
    try:
        # full precision: the Gram matrices feed a linear solve
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                model.model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    _, new_parts, _ = _modules(pruned)
    before, after = [], []

    def error(w, g, c, yy):  # ||y - a w||^2 / ||y||^2 from the sums, w (F', D')
        return float((yy - 2 * (w * c).sum() + (w * (g @ w)).sum()) / yy.clamp_min(1e-30))

    with torch.no_grad():
        for j, (_, down, _) in enumerate(new_parts):
            g, c, yy = (t.double().cpu() for t in stats[j])
            old = down.weight.detach().double().cpu().T  # (F', D')
            if has_bias:
                old = torch.cat([old, down.bias.detach().double().cpu()[None]], 0)
            reg = ridge * g.diagonal().mean() * torch.ones(len(g), dtype=g.dtype)
            if has_bias:
                reg[-1] = 0  # the bias is not shrunk
            w = torch.linalg.solve(g + torch.diag(reg), c)
            before.append(error(old, g, c, yy))
            after.append(error(w, g, c, yy))
            if has_bias:
                down.bias.copy_(w[-1])
                w = w[:-1]
            down.weight.copy_(w.T.to(down.weight.dtype))
    return {"ridge": ridge, "tokens": int(ids.numel()), "error_before": [round(e, 6) for e in before],
            "error_after": [round(e, 6) for e in after]}


def search(model, tok, scores: dict, src: Shape, candidates: list[Shape], held_texts: list[str],
           num_samples: int, seq_len: int, total: int, refit_ids=None):
    """Cut every candidate from the same importance scores (refitted on `refit_ids`, see cut()) and
    score it by heldout_loss() on rows of `held_texts`. Returns (the plan's "search" table, cut()'s
    tuple for the chosen): the lowest loss wins, the first among equals. Only the best model so far
    stays in memory."""
    from tqdm import tqdm

    # seed 0, not --seed: the same held-out rows whatever the run, so losses compare
    held = calibration_batch(tok, held_texts, num_samples, seq_len, seed=0)
    table, best, chosen = [], math.inf, None
    for i, shape in enumerate(tqdm(candidates, desc="search", unit="shape", file=sys.stderr)):
        made = cut(model, scores, src, shape, refit_ids)
        loss = heldout_loss(made[0], held)
        n = models.count_parameters(made[0])
        table.append({"shape": asdict(shape), "parameters": n, "fraction": n / total,
                      "held_out_loss": loss if math.isfinite(loss) else None})
        if chosen is None or (math.isfinite(loss) and loss < best):
            best, chosen, kept = (loss if math.isfinite(loss) else math.inf), i, made
        del made
    return {"metric": "held-out loss: mean next-token NLL (nats per predicted token) of each "
                      "pruned model before any training",
            "held_out": {"texts": len(held_texts), "sequences": int(held.shape[0]),
                         "seq_len": int(held.shape[1]), "seed": 0,
                         "rule": "data.held_out over the calibration texts"},
            "teacher_loss": heldout_loss(model, held),
            "candidates": table, "chosen": chosen}, kept


# --------------------------------------------------------------------------- the command

def format_plan(plan: dict) -> str:
    a, b = plan["shape_before"], plan["shape_after"]
    rows = [f"prune plan for {plan['source']} ({plan['architecture']}, method {plan['method']})"]
    rows += [f"  {k:<9}{a[k]:>8} -> {b[k]}" for k in a]
    rows.append(f"  params   {plan['parameters_before']:>12,} -> {plan['parameters_after']:,} "
                f"({100 * plan['fraction']:.1f}%)")
    if plan.get("target_parameters"):
        rows.append(f"  target   {plan['target_parameters']:>12,} ({plan['rule']})")
    return "\n".join(rows)


def format_search(plan: dict) -> str:
    """The search table: a row per candidate (shape, parameters, share of the teacher, held-out
    loss once scored), the teacher's loss for reference, and the chosen one."""
    s, n = plan["search"], plan["parameters_before"]
    rows = [f"prune search for {plan['source']} ({plan['architecture']}): {len(s['candidates'])} "
            f"shapes at <= {plan['target_parameters']:,} parameters",
            f"  {'layers':>6} {'hidden':>6} {'ffn':>6} {'heads/kv':>8} {'parameters':>12} "
            f"{'of teacher':>10} {'held-out loss':>13}"]

    def loss(x):
        return f"{x:>13.4f}" if x is not None else f"{'-':>13}"

    for i, c in enumerate(s["candidates"]):
        h = c["shape"]
        mark = "  <- lowest loss" if i == s.get("chosen") else ""
        rows.append(f"  {h['layers']:>6} {h['hidden']:>6} {h['ffn']:>6} "
                    f"{str(h['heads']) + '/' + str(h['kv_heads']):>8} {c['parameters']:>12,} "
                    f"{100 * c['fraction']:>9.1f}% {loss(c.get('held_out_loss'))}{mark}")
    if "teacher_loss" in s:
        rows.append(f"  {'teacher':<29} {n:>12,} {100.0:>9.1f}% {loss(s['teacher_loss'])}")
        h = s["held_out"]
        rows.append(f"held-out loss: mean next-token NLL (nats) before any training, on "
                    f"{h['sequences']} rows of {h['seq_len']} tokens from the held-out calibration "
                    f"texts ({h['texts']}; importance did not see them)")
    return "\n".join(rows)


def read_teacher(cfg: PruneConfig):
    """(folder, config.json, shape, count): `count(shape)` is the exact parameter count of that
    cut, from the safetensors headers (no weights loaded)."""
    # a GGUF is converted in the dtype the pruning computes in (bfloat16 on bf16 hardware)
    folder = models.resolve(cfg.model, trust_remote_code=cfg.trust_remote_code,
                            dtype=models.compute_dtype("auto", models.pick_device(cfg.device)))
    config = models.read_config(folder)
    arch = check_arch(config, f"{folder}/config.json")
    types = config.get("layer_types")
    if arch.layer_pattern and types and types != archs.layer_types(arch, len(types)):
        raise UsageError(f"{folder}/config.json (key `layer_types`): the layers do not follow "
                         f"llama.cpp's {arch.name} pattern ({arch.layer_pattern - 1} sliding-window "
                         "layers, then one global), which depth cuts keep; slm prune supports "
                         f"{arch.name} models as they ship")
    shapes = header_shapes(folder)
    src = source_shape(config)
    if count_params(config, shapes, src) != models.describe_shapes(config, shapes)["parameters"]:
        # the counting rules must cover every tensor
        raise UsageError(f"{folder}: unexpected weights for a {config['model_type']} model; "
                         "slm prune cannot account for all of them")
    return folder, config, src, functools.partial(count_params, config, shapes)


def choose_shape(cfg: PruneConfig, src: Shape, count, total: int, fixed_hd: int = 0):
    """(method, target parameters, shape, --search candidates); the shape is None under --search,
    which picks a candidate once they are scored."""
    if cfg.target is None:
        dst = explicit_shape(src, **cfg.shape, fixed_hd=fixed_hd)
        if dst == src:
            raise UsageError("the shape equals the model's; give a smaller --layers/--hidden/"
                             "--ffn/--heads/--kv-heads or a --target")
        return "shape", None, dst, None
    target = parse_target(cfg.target, total)
    if cfg.search is None:
        return cfg.method or "both", target, plan_shape(src, count, target, cfg.method or "both", fixed_hd), None
    candidates = search_candidates(src, count, target, cfg.search,
                                   explicit_shape(src, **(cfg.shape or {}), fixed_hd=fixed_hd))
    if len(candidates) < cfg.search:
        print(f"only {len(candidates)} shapes of this family fit the target; --search "
              f"{cfg.search} compares all of them", file=sys.stderr)
    return "search", target, None, candidates


def prune(cfg: PruneConfig) -> dict:
    """Cut a smaller model out of the teacher `cfg.model` and save it to `cfg.out`; return the
    plan. With `cfg.dry_run`, print and return the plan (shape and parameter counts) without
    loading weights.

        prune(PruneConfig("default", "pruned", target=0.5, calib="data.jsonl"))
    """
    import torch

    folder, config, src, count = read_teacher(cfg)
    total = count(src)
    method, target, dst, candidates = choose_shape(cfg, src, count, total, fixed_head_dim(config))
    # read (and validated) before any heavy work; a dry run needs none but checks what it is given
    texts = calibration_texts(cfg.calib, cfg.task) if (cfg.calib or cfg.task or not cfg.dry_run) else []
    texts, held_texts = search_split(texts) if candidates and texts else (texts, [])

    def after(shape):  # the plan's keys for the shape written
        return {"shape_after": asdict(shape), "parameters_after": count(shape),
                "fraction": count(shape) / total}

    plan = {"source": str(cfg.model),
            "architecture": config.get("architectures", [config["model_type"]])[0],
            "method": method, "target_parameters": target, "rule": RULES[method],
            "shape_before": asdict(src), "shape_after": None, "head_dim": head_dim(config),
            "parameters_before": total, "parameters_after": None, "fraction": None}
    if candidates:
        plan["search"] = {"candidates": [{"shape": asdict(c), "parameters": count(c),
                                          "fraction": count(c) / total} for c in candidates]}
    else:
        plan.update(after(dst))
    print(format_search(plan) if candidates else format_plan(plan))
    if cfg.dry_run:
        return plan

    device = models.pick_device(cfg.device)
    num_samples = cfg.num_samples or (256 if device.type == "cuda" else 16)
    model, tok = models.load_folder(folder, dtype=models.compute_dtype("auto", device), device=device,
                                    trust_remote_code=cfg.trust_remote_code)
    ids = calibration_batch(tok, texts, num_samples, cfg.seq_len, seed=cfg.seed)
    scores = measure_importance(model, ids, device=device)
    refit_ids = ids if cfg.refit else None
    if candidates:
        plan["search"], (pruned, keep, rescale, refit) = search(
            model, tok, scores, src, candidates, held_texts, num_samples, cfg.seq_len, total, refit_ids)
        plan.update(after(candidates[plan["search"]["chosen"]]))
        print(format_search(plan))
        print(format_plan(plan))
    else:
        pruned, keep, rescale, refit = cut(model, scores, src, dst, refit_ids)
    got, total_after = models.count_parameters(pruned), plan["parameters_after"]
    if got != total_after:
        raise RuntimeError(f"pruned model has {got:,} parameters, the plan said {total_after:,}")
    plan.update(calibration=calibration_record(cfg, ids), kept=keep, norm_rescale=rescale,
                mlp_refit=refit, importance=importance_record(scores, keep))
    # inside the model folder, which save_model writes to a temporary folder and renames
    extra = {"prune_search.json": plan["search"]} if candidates else {}
    with torch.no_grad():
        models.save_model(pruned, tok, cfg.out, extra={"prune_plan.json": plan, **extra})
    print(f"wrote {cfg.out}: {got:,} parameters ({100 * got / total:.1f}% of {total:,})")
    return plan


def calibration_record(cfg: PruneConfig, ids) -> dict:
    """The plan's "calibration": what the importance was measured on (ids (N, T))."""
    from slmkit import data, tasks

    calib, task = cfg.calib, cfg.task
    return {"file": str(calib) if calib is not None else None, "task": task if calib is None else None,
            "sha256": data.file_hash(calib if calib is not None else tasks.preset_data(task)),
            "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "seed": cfg.seed}


def importance_record(scores: dict, keep: dict) -> dict:
    """The plan's "importance": the scores rounded; the (L, F) MLP scores are large, so summarised
    (the kept indices are exact)."""
    return {"block_influence": [round(v, 6) for v in scores["block_influence"].tolist()],
            "heads": [[round(v, 5) for v in row] for row in scores["heads"].tolist()],
            "hidden": [round(v, 5) for v in (scores["hidden"][keep["layers"]].sum(0)
                                             + scores["final_hidden"]).tolist()],
            "ffn_sha256": hashlib.sha256(scores["ffn"].numpy().tobytes()).hexdigest(),
            "ffn_mean_per_layer": [round(v, 5) for v in scores["ffn"].mean(1).tolist()]}


def add_arguments(p):
    add_config_arguments(p, PruneConfig)


def run(args) -> int:
    prune(config_from_args(PruneConfig, args))
    return 0
