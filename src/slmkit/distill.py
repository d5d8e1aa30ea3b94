"""Train a student on the teacher's token distributions (logit distillation) and on the data.

    slm distill --student pruned/ --teacher default --data train.jsonl --task summarize --out student/
    slm distill --student default --data train.jsonl --alpha-ce 1 --out tuned/       # plain fine-tune
    slm distill --teacher default --data train.jsonl --task summarize --cache-teacher topk.safetensors
    slm distill --student pruned/ --teacher-cache topk.safetensors --data train.jsonl \\
        --task summarize --out student/                                            # offline teacher
    slm distill ... --resume                          # insist on continuing OUT.work/checkpoint
    slm distill --student pruned/ --teacher openai:teacher@http://HOST:8000 ...   # served teacher
    slm distill --student gemma-3-270m --teacher qwen2.5-coder-0.5b-instruct ...  # any two families
    slm distill --student default --teacher openai:qwen@http://HOST:8000 \
        --teacher-tokenizer qwen2.5-coder-0.5b-instruct ...     # served, another tokenizer
    accelerate launch --multi_gpu --num_processes 2 -m slmkit distill ... [--fsdp]  # DDP / FSDP2

Loss = (1 - alpha_ce) * KD + alpha_ce * CE, means over answer tokens (prompt and padding masked;
plain text: every token). KD is forward KL at tau = 1 unless --loss/--temperature say otherwise
(see slmkit.losses). --prompt-kd W adds W x the KD mean over the prompt tokens: the teacher's
distribution over the input text is extra signal (a dialogue has ~5x the tokens of its summary;
Minitron distils on every token), at ~45 % more time a step; on the demo it did not pay (README).
--hidden-kd W adds W x the mean cosine distance between each student layer's output and that of
the teacher layer it was cut from (`layer_pairs`, `losses.hidden_distance`), over every token:
a dense signal per layer where logit KD gives one distribution per answer token.
The token budget (--max-tokens) counts every non-padding token the student reads, prompt and
answer; the schedule length is estimated from the mean example length.

Files: OUT/ is the student (HF folder) with training_record.json and metrics.jsonl. While
training, OUT.work/ holds metrics.jsonl and checkpoint/ (safetensors and JSON only, layout in
slmkit.checkpoint); it is removed once OUT is written. Rerunning a killed command continues from
the checkpoint when the settings match (--restart starts over).

The code: `setup` makes a `Run` (data, models, optimizer, resume point), `fit` is the loop;
`batch_losses` is one micro-batch's loss, the rest (evaluation, checkpoints, the final save) take
the Run. Memory: the loss projects hidden states to logits --chunk positions at a time
(`final_hidden`), the student may recompute its activations (`checkpointing_pays`).

Teacher cache (--cache-teacher FILE, read with --teacher-cache FILE): one safetensors file of
the teacher's top-k log-probs, keyed by each example's text (slmkit.topk_cache, `slmkit-topk-v2`),
so one file teaches students of any tokenizer; `slm generate --topk-logprobs` writes the same
format while the teacher writes the data. Older `slmkit-topk-v1` files (rows by student token
id) are still read by a student of the teacher's tokenizer.

Across tokenizers (--cross-tokenizer auto|on|off; auto = on when the tokenizers differ, and for a
v2 cache): each model reads the example's prompt in its own chat template, then the same answer
text; slmkit.align pairs the student's and the teacher's predictions made after the same text
(groups of tokens ending at the same byte) and maps the teacher's distribution onto the
student's vocabulary (slmkit.teacher, losses.mapped_kd / tail_buckets). A student position with
no teacher prediction of the same context gets CE only. For a same-tokenizer pair the text path
gives the direct path's KD exactly. --on-policy, --hidden-kd, --prompt-kd and --pack are refused
across tokenizers (before any model loads): they need positions or layers the text path does not
pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from slmkit import archs
from slmkit.backends import MAX_LOGPROBS
from slmkit.cli import (AT_LEAST_1, FRACTION, NOT_NEGATIVE, POSITIVE, Check, add_config_arguments,
                        check_options, config_from_args, option)
from slmkit.batching import (Encoded, collate, collate_weights, edit_weights, encode_all,  # noqa: F401
                             epoch_batches, left_pad, pack, predicted, split_rows)
from slmkit.data import EVAL_FRACTION, EVAL_MAX
from slmkit.errors import UsageError
from slmkit.models import DTYPES
from slmkit.served_teacher import is_served

CROSS = ("auto", "on", "off")
LOSSES = ("forward_kl", "reverse_kl", "jsd")  # = losses.KINDS; here so `--help` imports no torch
FREEZE = ("none", "embeddings", "attention")  # each also freezes what the one before it does


@dataclass
class DistillConfig:
    """Everything one distillation run needs; CLI flags are these names with dashes."""

    student: str = option(None, "student MODEL: HF folder, .gguf or `default` (usually `slm prune` "
                          "output)", wired=True)
    teacher: str | None = option(None, "teacher MODEL (any tokenizer: see --cross-tokenizer), or "
                                 "`openai:NAME@URL` for one of the student's tokenizer served with "
                                 "vLLM's prompt_logprobs (vLLM, slm serve); none = CE-only "
                                 "fine-tuning (--alpha-ce 1)", wired=True)
    data: str = option(None, "training JSONL (pairs, chat messages, plain text or task fields); "
                       "lines with \"split\": \"eval\" are held out, else --eval-fraction", wired=True)
    task: str | None = option(None, "task preset whose fields the data uses (e.g. summarize)",
                              wired=True)
    out: str = option(None, "output folder for the student", wired=True)
    loss: str = option("forward_kl", "KD divergence", choices=LOSSES)
    beta: float = option(0.5, "JSD beta: 0 = forward KL, 1 = reverse KL (GKD)", check=FRACTION)
    temperature: float = option(1.0, "softmax temperature of both models (loss scaled by tau^2)",
                                check=POSITIVE)
    alpha_ce: float = option(0.0, "weight of cross-entropy on the data: loss = (1-a) KD + a CE",
                             check=FRACTION)
    prompt_kd: float = option(0.0, "also match the teacher on the prompt tokens, with this weight "
                              "(more signal per example; ~45%% slower steps; online teacher only)",
                              check=NOT_NEGATIVE)
    hidden_kd: float = option(0.0, "also match each student layer's output to the teacher layer it "
                              "was cut from (cosine distance on every token, with this weight; the "
                              "map comes from slm prune's prune_plan.json, else layers spread "
                              "evenly); online teacher only", check=NOT_NEGATIVE)
    edit_weight: float = option(1.0, "answer tokens that do not copy the prompt (a correction's "
                                "edits) weigh this many times the copied ones in KD and CE; each "
                                "example's weights still average 1 (1 = off)", check=POSITIVE)
    lora: int = option(0, "train rank-R low-rank adapters on the blocks' linear layers instead of "
                       "every weight (LoRA, `pip install -e .[lora]`): a teacher too big to "
                       "fine-tune whole in memory; merged into the saved model (0 = off)",
                       check=NOT_NEGATIVE)
    freeze: str = option("none", "weights that stay as pruned: embeddings (the token embeddings and "
                         "output head: with Adam every step moves every row, also of the words the "
                         "data never shows), attention (also every layer's attention), or none",
                         choices=FREEZE)
    max_steps: int | None = option(None, "optimizer steps (default: one epoch)", check=AT_LEAST_1)
    max_tokens: int | None = option(None, "token budget: prompt + answer tokens read by the student",
                                    check=AT_LEAST_1)
    batch_size: int = option(8, "examples per micro-batch per process", check=AT_LEAST_1)
    grad_accum: int = option(1, "micro-batches per optimizer step (simulates a bigger batch)",
                             check=AT_LEAST_1)
    lr: float | None = option(None, "peak learning rate (AdamW); default: by the student's size "
                              "(lr_for: 1e-4 up to 300M parameters, 1e-5 up to 1B, 5e-6 above; "
                              "2e-4 with --lora)",
                              check=NOT_NEGATIVE)
    weight_decay: float = option(0.0, "AdamW weight decay", check=NOT_NEGATIVE)
    warmup_ratio: float = option(0.05, "fraction of steps with linear warmup; cosine decay to 0 after",
                                 check=Check(lambda v: 0 <= v < 1, "in [0, 1)"))
    clip: float = option(1.0, "gradient norm clipping", check=POSITIVE)
    max_length: int = option(1024, "max tokens per example (prompts cut from the left)",
                             check=AT_LEAST_1)
    eval_every: int = option(50, "evaluate on the held-out split every N steps", check=AT_LEAST_1)
    eval_fraction: float = option(EVAL_FRACTION, "held-out fraction when no line says \"split\": \"eval\"",
                                  check=Check(lambda v: 0 < v < 1, "in (0, 1)"))
    eval_max: int = option(EVAL_MAX, "at most this many held-out examples", check=AT_LEAST_1)
    save_every: int = option(100, "checkpoint every N steps", check=AT_LEAST_1)
    seed: int = option(0, "random seed (data order, sampling)")
    dtype: str = option("float32", "weights dtype", choices=DTYPES)
    bf16: bool = option(True, "bf16 autocast where the GPU/CPU supports it (--no-bf16 to disable)")
    device: str | None = option(None, "cpu or cuda (default: CUDA when present)", wired=True)
    teacher_cache: str | None = option(None, "offline teacher: top-k file from --cache-teacher",
                                       wired=True)
    top_k: int | None = option(None, "k of the teacher's top-k log-probs: what --cache-teacher stores "
                               "and what a served teacher is asked for (default 32; 20 for a served "
                               "teacher, the most vLLM and slm serve return by default)",
                               check=AT_LEAST_1)
    teacher_tokenizer: str | None = option(None, "MODEL with the tokenizer (and chat template) of a "
                                           "served teacher (openai:...) of another tokenizer than "
                                           "the student: the examples are encoded with it, scored "
                                           "by the server and aligned (--cross-tokenizer)")
    cross_tokenizer: str = option("auto", "align teacher and student on the text (each reads its "
                                  "prompt in its own chat template; the answer's tokens are grouped "
                                  "by byte offsets and the teacher's distributions mapped onto the "
                                  "student's vocabulary, see slmkit.align): on, off, or auto (on when "
                                  "the tokenizers differ, and for a text-keyed --teacher-cache)",
                                  choices=CROSS)
    on_policy: float = option(0.0, "GKD lambda: fraction of batches whose answers the student samples",
                              check=FRACTION)
    max_new_tokens: int = option(128, "longest on-policy sample", check=AT_LEAST_1)
    fsdp: bool = option(False, "shard the student's parameters, gradients and optimizer state over the "
                        "processes (FSDP2); start with `accelerate launch` or torchrun")
    pack: bool = option(False, "sequence packing: several training examples per row of up to "
                        "--max-length tokens, each attending only to itself (--batch-size counts rows)")
    chunk: int = option(512, "loss positions processed at once: memory grows with chunk x vocabulary, "
                        "never batch x length x vocabulary", check=AT_LEAST_1)
    activation_checkpointing: str = option("auto", "recompute the student's layer activations in "
                                           "backward instead of keeping them: on, off or auto (on when "
                                           "they would outweigh weights + AdamW state)")
    teacher_dtype: str = option("auto", "teacher weights dtype: float32, bfloat16, float16 or auto "
                                "(bfloat16 when the forward runs under bf16 autocast, else --dtype)")
    resume: bool | str = option(False, "insist on continuing OUT.work/checkpoint (or the given "
                                "checkpoint folder); without it a checkpoint of the same settings is "
                                "continued anyway", nargs="?", const=True, metavar="CKPT", wired=True)
    restart: bool = option(False, "start over even if OUT.work holds a checkpoint of these settings",
                           wired=True)
    stop_after: int | None = option(None, "stop after this many steps leaving a checkpoint, as if "
                                    "killed", check=AT_LEAST_1)
    trust_remote_code: bool = option(False, "allow code from model folders", wired=True)

    def __post_init__(self):
        if self.top_k is None:
            self.top_k = MAX_LOGPROBS if is_served(self.teacher) else 32
        for name in ("student", "data", "out"):
            if not getattr(self, name):
                raise UsageError(f"--{name} is required")
        if self.activation_checkpointing not in ("auto", "on", "off"):
            raise UsageError(f"--activation-checkpointing {self.activation_checkpointing}: choose "
                             "on, off or auto")
        if self.teacher_dtype != "auto":
            from slmkit.models import torch_dtype

            torch_dtype(self.teacher_dtype)  # names the valid ones
        if self.cross_tokenizer not in CROSS:
            raise UsageError(f"--cross-tokenizer {self.cross_tokenizer}: choose auto, on or off")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss}: choose one of {', '.join(LOSSES)}")
        check_options(self)
        if self.teacher and self.teacher_cache:
            raise UsageError("give --teacher (online) or --teacher-cache (offline), not both")
        if self.alpha_ce < 1 and not (self.teacher or self.teacher_cache):
            raise UsageError("distillation needs --teacher MODEL or --teacher-cache FILE; "
                             "for plain fine-tuning on the data pass --alpha-ce 1")
        if self.on_policy > 0 and not self.teacher:
            raise UsageError("--on-policy needs an online --teacher to score the student's samples")
        if self.fsdp and self.on_policy > 0:
            raise UsageError("--fsdp and --on-policy do not go together: each process samples "
                             "answers of its own length, and a sharded model must step in lockstep")
        if self.pack and self.on_policy > 0:
            raise UsageError("--pack and --on-policy do not go together: sampling replaces whole "
                             "answers, row by row; drop one")
        if self.on_policy > 0 and self.alpha_ce >= 1:
            raise UsageError("--on-policy trains only the divergence on the student's samples, so "
                             "it needs --alpha-ce below 1")
        if self.prompt_kd > 0 and not (self.teacher and self.alpha_ce < 1):
            raise UsageError("--prompt-kd needs an online --teacher and --alpha-ce below 1 (the "
                             "teacher cache holds answer positions only)")
        if self.hidden_kd > 0 and not (self.teacher and not is_served(self.teacher) and self.alpha_ce < 1):
            raise UsageError("--hidden-kd needs a local online --teacher MODEL and --alpha-ce below 1 "
                             "(a served teacher and the teacher cache give no hidden states)")
        if is_served(self.teacher) and (self.prompt_kd > 0 or self.on_policy > 0 or self.temperature != 1):
            raise UsageError("a served teacher (openai:...) gives top-k log-probs at temperature 1 "
                             "on the data's answers: drop --prompt-kd, --on-policy and --temperature")
        if self.teacher_tokenizer and not is_served(self.teacher):
            raise UsageError("--teacher-tokenizer names a served teacher's tokenizer: it needs "
                             "--teacher openai:NAME@URL (a local teacher brings its own)")
        if self.lora and (self.fsdp or self.freeze != "none"):
            raise UsageError("--lora trains adapters only, every weight of the model stays: drop "
                             "--fsdp and --freeze")
        if self.teacher_cache and self.temperature != 1:
            raise UsageError("--teacher-cache holds log-probs at temperature 1; drop --temperature "
                             "or use an online --teacher")


# --------------------------------------------------------------------------- models

def vocab_hash(tokenizer) -> str:
    return hashlib.sha1(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]


def use_text_path(cfg: DistillConfig) -> bool:
    """Whether the teacher is aligned with the student on the text (--cross-tokenizer), decided
    and checked before any model loads: from the tokenizers alone (auto), the cache's format, or
    the flag. What the text path does not do is refused here, in one line."""
    from slmkit import models, topk_cache

    def differ(teacher: str) -> bool:  # the tokenizers alone load: seconds, not minutes
        # a GGUF resolves to the folder of the dtype it will load in: converted once, not twice
        dtypes = (cfg.dtype, teacher_dtype(cfg, models.pick_device(cfg.device)))
        s_tok, t_tok = (models.load_tokenizer(models.resolve(m, cfg.trust_remote_code, dtype=d),
                                              cfg.trust_remote_code)
                        for m, d in zip((cfg.student, teacher), dtypes))
        return vocab_hash(s_tok) != vocab_hash(t_tok)

    if cfg.alpha_ce >= 1 and cfg.on_policy == 0:
        return False  # no teacher distributions are read
    if cfg.teacher_cache:
        fmt = topk_cache.format_of(cfg.teacher_cache)
        on = fmt == topk_cache.FORMAT
        if on and cfg.cross_tokenizer == "off":
            raise UsageError(f"--teacher-cache `{cfg.teacher_cache}` is text-keyed "
                             f"({topk_cache.FORMAT}): it is read through the alignment step; drop "
                             "--cross-tokenizer off")
        if not on and cfg.cross_tokenizer == "on":
            topk_cache.Reader(cfg.teacher_cache)  # refuses a v1 file, saying how to rewrite it
    elif is_served(cfg.teacher):
        if not cfg.teacher_tokenizer:
            if cfg.cross_tokenizer == "on":
                raise UsageError("--cross-tokenizer on with a served teacher needs --teacher-tokenizer "
                                 "MODEL (a local model with the served model's tokenizer), or have "
                                 "the teacher write the data with its top-k (`slm generate "
                                 "--topk-logprobs 20`, recipes/api-teacher.yaml)")
            return False
        on = differ(cfg.teacher_tokenizer) if cfg.cross_tokenizer == "auto" else cfg.cross_tokenizer == "on"
    else:
        on = differ(cfg.teacher) if cfg.cross_tokenizer == "auto" else cfg.cross_tokenizer == "on"
    if on:
        for flag, used in (("--on-policy", cfg.on_policy > 0), ("--hidden-kd", cfg.hidden_kd > 0),
                           ("--prompt-kd", cfg.prompt_kd > 0), ("--pack", cfg.pack)):
            if used:
                raise UsageError(f"{flag} does not work across tokenizers yet (the teacher and the "
                                 "student are aligned on the answer text only); drop it, or use a "
                                 "teacher of the student's tokenizer")
    return on


def layer_pairs(student_folder: Path, s_config, t_config) -> tuple[list[tuple[int, int]], list[int] | None]:
    """--hidden-kd's map: (student layer j, teacher layer t) pairs, and the teacher's hidden
    channels the student kept (None: all of them). A student cut by `slm prune` names them in its
    prune_plan.json (`kept.layers`, `kept.hidden`, both teacher indices); any other student
    spreads its L' layers evenly over the teacher's L (layer j stands for round((j + 1) L / L') - 1)
    and needs the teacher's hidden size. The last layer is left out: its output goes through the
    final norm into the logits, which KD matches already."""
    n_s, n_t = s_config.num_hidden_layers, t_config.num_hidden_layers
    d_s, d_t = s_config.hidden_size, t_config.hidden_size
    if n_s < 2:
        raise UsageError(f"--hidden-kd matches the student's layers but its last; `{student_folder}` "
                         "has one layer: drop --hidden-kd")
    plan_file = student_folder / "prune_plan.json"
    kept = {}
    if plan_file.is_file():
        from slmkit import models

        plan = models.read_json(plan_file, fix="delete it to match layers spread evenly")
        kept = plan.get("kept") or {}
        before = plan.get("shape_before") or {}
        fits = (isinstance(kept.get("layers"), list) and len(kept["layers"]) == n_s
                and isinstance(kept.get("hidden"), list) and len(kept["hidden"]) == d_s
                and before.get("layers") == n_t and before.get("hidden") == d_t)
        if not fits:  # cut from a model of another shape than this teacher
            kept = {}
    if kept:
        layers, channels = [int(t) for t in kept["layers"]], [int(c) for c in kept["hidden"]]
        if channels == list(range(d_t)):
            channels = None
    elif d_s != d_t:
        raise UsageError(f"--hidden-kd: the student `{student_folder}` has hidden size {d_s}, the "
                         f"teacher {d_t}, and no prune_plan.json of this teacher names the channels "
                         "it kept; use a student cut by `slm prune` from this teacher, or drop "
                         "--hidden-kd")
    else:
        layers, channels = [round((j + 1) * n_t / n_s) - 1 for j in range(n_s)], None
    return [(j, layers[j]) for j in range(n_s - 1)], channels


@contextmanager
def final_hidden(model):
    """Within it, `model(...)` returns its final hidden states (B, T, H) as `logits`; yields the
    output projection (H -> V) it took out, for the loss to apply `--chunk` positions at a time.
    The projection's weights stay the model's (tied or not), so they train as before; the model's
    own logit processing follows it (archs.head_outside: Gemma 2's soft-capping, Cohere's scale),
    or it is refused."""
    with archs.head_outside(model) as head:
        yield head


class Window(NamedTuple):
    logits: object   # (B, K, V); inside `final_hidden` the final hidden states (B, K, H)
    labels: object   # (B, K)
    mask: object     # (B, K) bool
    states: object   # with `states=True`: every layer's output, (L + 1) x (B, T, H), else None


def logits_window(model, ids, att, mask, pos, states: bool = False) -> Window:
    """Run `model` and return logits (B, K, V), labels (B, K) and mask (B, K) aligned so
    logits[:, i] predicts labels[:, i], for the K columns from the first counted position on.
    Logits of the prompt columns before it are never computed (`logits_to_keep`); the layers'
    hidden states (`states`, for --hidden-kd: the embeddings, then each layer's output, the
    last one after the final norm) cover every column. A batch with packed rows goes without an
    attention mask: transformers then builds a block-causal mask from the positions, each run
    0, 1, ... attending only to itself (the left padding is one such run, never counted)."""
    width = ids.shape[1]
    target = predicted(mask, att)                       # column c predicts token c + 1
    first = int(target.any(0).nonzero()[0])
    keep = width - first                                # columns first .. width-1
    packed = bool((pos[:, 1:] < pos[:, :-1]).logical_and(att[:, 1:].bool()).any())
    out = model(input_ids=ids, attention_mask=None if packed else att, position_ids=pos,
                logits_to_keep=keep, use_cache=False, output_hidden_states=states)
    logits = out.logits[:, :-1]                         # the last column predicts nothing
    return Window(logits, ids[:, first + 1:], target[:, first:], out.hidden_states if states else None)


# --------------------------------------------------------------------------- run identity

FINGERPRINT_KEYS = ("student", "teacher", "task", "loss", "beta", "temperature", "alpha_ce",
                    "max_steps", "max_tokens", "batch_size", "grad_accum", "lr", "weight_decay",
                    "warmup_ratio", "clip", "max_length", "eval_fraction", "eval_max", "seed",
                    "dtype", "teacher_cache", "on_policy", "max_new_tokens", "prompt_kd",
                    "edit_weight", "teacher_dtype", "pack", "fsdp", "freeze", "hidden_kd",
                    "cross_tokenizer", "teacher_tokenizer", "lora")


def fingerprint(cfg: DistillConfig, world: int, device) -> dict:
    """What must match for a checkpoint to continue this run exactly; `autocast` is what the
    precision rule picks on `device` (a bf16 run does not continue in float32, or back)."""
    from slmkit import precision
    from slmkit.data import file_hash

    fp = {k: getattr(cfg, k) for k in FINGERPRINT_KEYS}
    if dataclasses.is_dataclass(fp.get("task")):  # a recipe's custom task: its fields, as JSON
        fp["task"] = dataclasses.asdict(fp["task"])
    fp["data_sha256"] = file_hash(cfg.data)
    fp["global_batch"] = cfg.batch_size * cfg.grad_accum * world
    fp["autocast"] = precision.describe(device, cfg.bf16)
    if cfg.fsdp:  # each process saved its own shards
        fp["processes"] = world
    return fp


def schedule(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- on-policy

def sample_answers(model, items: list[Encoded], tokenizer, max_new_tokens: int, device, autocast):
    """GKD on-policy: replace each answer by the student's own sample (temperature 1) after the
    same prompt, cut after the first stop token (tokenizer or generation-config EOS); the teacher
    then scores those tokens. Examples with no prompt are kept."""
    import torch

    from slmkit.data import pad_batch
    from slmkit.models import stop_ids

    prompts = [e.ids[:e.mask.index(1)] for e in items]
    todo = [i for i, p in enumerate(prompts) if p]
    if not todo:
        return items
    ids, att = pad_batch([prompts[i] for i in todo], tokenizer.pad_token_id, side="left")
    stops = stop_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    model.train(was_training)
    new = list(items)
    for row, i in enumerate(todo):
        gen = out[row, ids.shape[1]:].tolist()
        end = next((j for j, t in enumerate(gen) if t in stops), None)
        if end is not None:
            gen = gen[:end + 1]
        new[i] = Encoded(prompts[i] + gen, [0] * len(prompts[i]) + [1] * len(gen), items[i].key,
                         items[i].where)
    return new


# --------------------------------------------------------------------------- the loop

def find_resume_point(cfg: DistillConfig, work: Path, fp: dict, acc):
    """(trainer state, checkpoint folder) to continue from, or (None, None) to start over.

    A checkpoint under OUT.work made with the same settings (fingerprint) is continued, so
    rerunning a killed or interrupted command picks up where it stopped; `--restart` starts over.
    One made with other settings is refused under `--resume` and replaced otherwise."""
    from slmkit import checkpoint

    if isinstance(cfg.resume, str):
        ckpt = Path(cfg.resume)
        if not (ckpt / checkpoint.STATE).is_file():
            raise UsageError(f"--resume `{ckpt}` is not a checkpoint folder (no {checkpoint.STATE})")
    else:
        if acc.is_main_process and not cfg.restart:
            checkpoint.recover(work)  # a crash mid-save leaves the complete folder aside
        acc.wait_for_everyone()
        ckpt = work / checkpoint.LIVE
        if cfg.restart or not (ckpt / checkpoint.STATE).is_file():
            return None, None
    state = checkpoint.read_state(ckpt)
    diff = [k for k in fp if state["fingerprint"].get(k) != fp[k]]
    if diff and cfg.resume:
        raise UsageError(f"--resume: checkpoint `{ckpt}` is from another run ({', '.join(diff)} "
                         f"differ, e.g. {diff[0]} {state['fingerprint'].get(diff[0])!r} there vs "
                         f"{fp[diff[0]]!r} now); rerun with the same settings or drop --resume")
    if diff:
        if acc.is_main_process:
            print(f"slm distill: `{ckpt}` holds a run with other settings ({', '.join(diff)}); "
                  "starting over", file=sys.stderr)
        return None, None
    return state, ckpt


def checkpointing_pays(cfg: DistillConfig, config, parameters: int, longest: int) -> bool:
    """--activation-checkpointing: on, off, or `auto`, which turns it on when the activations a
    micro-batch keeps for backward would outweigh the training state that stays anyway.
    Activations ~ batch x longest example x layers x (4 hidden + 2 intermediate) x 4 bytes (each
    layer's input, attention and MLP intermediates in float32); training state = 16 bytes a
    parameter (float32 weights, gradients and AdamW's two moments). Recomputing costs about one
    more forward pass per step, so small batches of short examples train without it."""
    if cfg.activation_checkpointing != "auto":
        return cfg.activation_checkpointing == "on"
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    activations = cfg.batch_size * longest * config.num_hidden_layers * (4 * hidden + 2 * inter) * 4
    return activations > 16 * parameters


def teacher_dtype(cfg: DistillConfig, device) -> str:
    """--teacher-dtype auto: the dtype the teacher computes in anyway. Under bf16 autocast its
    matmuls run in bf16 whatever its weights, so bf16 weights halve its memory for nothing lost."""
    from slmkit import precision

    if cfg.teacher_dtype != "auto":
        return cfg.teacher_dtype
    return "bfloat16" if precision.autocast_dtype(device, cfg.bf16) is not None else cfg.dtype


def projector(lm_head, device, bf16: bool, grad: bool = True):
    """lm_head as the loss applies it to one chunk of hidden states: under the precision rule's
    autocast, logits out (the loss casts them to float32); without autograd for the teacher."""
    import torch

    from slmkit import precision

    def head(h):
        with precision.autocast(device, bf16), (nullcontext() if grad else torch.no_grad()):
            return lm_head(h)
    return head


MMAP_FROM_TOKENS = 2048
"""return_freed_memory() applies when a micro-batch may hold this many tokens (batch x length)."""


def return_freed_memory(tokens: int) -> None:
    """Ask glibc's malloc to give blocks of 1 MiB and more back to the system when freed, when a
    micro-batch may hold `tokens` >= MMAP_FROM_TOKENS. By default malloc keeps blocks under its
    dynamic threshold (up to 32 MiB) in the heap, where a big step's activations (tens of MB each,
    freed in another order than allocated) fragment it: fine-tuning `default` at batch 8 x 1024
    tokens peaked at 5.2 GB RSS for 2.8 GB live. The price is a fresh mapping (page faults) for
    every such block: the demo's distill steps (batch 1 x 320) ran ~8 % slower with it, where
    fragmentation costs nothing, so small micro-batches keep the default. Other C libraries (and
    non-Linux systems) are left as they are."""
    import ctypes

    if tokens < MMAP_FROM_TOKENS:
        return

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


@dataclass
class Run:
    """One training run as `setup` makes it: what the loop reads, and the position it advances."""

    cfg: DistillConfig
    acc: object              # accelerate.Accelerator: processes, DDP, reductions
    fp: dict                 # the fingerprint a checkpoint must match to continue this run
    out: Path
    work: Path               # OUT.work: metrics.jsonl and checkpoint/ while training
    model: object            # the student as prepared: DDP-wrapped, FSDP-sharded or plain
    tokenizer: object
    optimizer: object
    scheduler: object
    train: list[Encoded]
    held: list[Encoded]
    total: int               # optimizer steps
    checkpointing: bool      # activation checkpointing on the student
    teacher: object = None   # slmkit.teacher's interface: a model, a top-k file or a server
    layer_map: tuple | None = None  # --hidden-kd: `layer_pairs` (pairs, kept teacher channels)
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    warned: bool = False     # the divergence warning is said once

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def device(self):
        return self.acc.device

    @property
    def student(self):
        """The student module itself (under FSDP the sharded module is one)."""
        return self.acc.unwrap_model(self.model)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    @property
    def collective(self) -> bool:
        """A sharded model evaluates on every process at once; otherwise the main one does."""
        return self.cfg.fsdp

    def autocast(self):
        from slmkit import precision

        return precision.autocast(self.device, self.cfg.bf16)


def distill(cfg: DistillConfig) -> Path:
    """Train the student; returns the student folder (cfg.out). With `stop_after`, returns the
    checkpoint folder after that many steps instead, as if the run had been killed."""
    run = setup(cfg)
    return Path(cfg.out) if run is None else fit(run)


def setup(cfg: DistillConfig) -> Run | None:
    """Data, models, optimizer and the resume point; None when OUT is already this run's
    finished student (under --resume)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from slmkit import models, sharding
    from slmkit import teacher as teachers
    from slmkit.tasks import get_task

    out = Path(cfg.out)
    work = out.with_name(out.name + ".work")
    acc = Accelerator(cpu=cfg.device == "cpu")
    device = acc.device
    # the data first: a bad file is reported before minutes of model loading
    task = get_task(cfg.task) if cfg.task else None
    train_ex, eval_ex = split_rows(cfg.data, task, cfg.eval_fraction, cfg.eval_max)
    fp = fingerprint(cfg, acc.num_processes, device)
    if cfg.resume and (out / "training_record.json").is_file():
        done = models.read_json(out / "training_record.json", fix="delete OUT to train again")
        if done.get("fingerprint") == fp:
            return None  # finished already with these settings
    text_path = use_text_path(cfg)  # before any model loads: it may refuse the flags
    state, ckpt = find_resume_point(cfg, work, fp, acc)
    set_seed(cfg.seed)
    return_freed_memory(cfg.batch_size * cfg.max_length)

    # models: the pair's vocabularies and heads first, from their tokenizers and configs
    local_teacher = cfg.teacher and not is_served(cfg.teacher) and (cfg.alpha_ce < 1 or cfg.on_policy > 0)
    # same tokenizer: their shared real vocabulary (padding aside); across tokenizers the text
    # path maps the teacher's tokens onto the student's instead
    vocab = (models.shared_vocab(cfg.student, cfg.teacher, cfg.trust_remote_code,
                                 dtypes=(cfg.dtype, teacher_dtype(cfg, device)))
             if local_teacher and not text_path else None)
    student, tokenizer = models.load_model(cfg.student, dtype=cfg.dtype, device=device,
                                           trust_remote_code=cfg.trust_remote_code)
    student.train()
    student.config.use_cache = False
    if cfg.lora:
        student = with_lora(student, cfg.lora)
    teacher = teachers.load(cfg, text_path, student, tokenizer, device, vocab)
    layer_map = None
    if cfg.hidden_kd > 0:  # only a ModelTeacher gets here (use_text_path, DistillConfig)
        pairs, channels = layer_pairs(models.resolve(cfg.student), student.config,
                                      teacher.model.config)
        layer_map = pairs, None if channels is None else torch.tensor(channels, device=device)

    # data
    train = encode_all(train_ex, tokenizer, cfg.max_length, cfg.edit_weight)
    if cfg.pack:
        train = pack(train, cfg.max_length)
    held = encode_all(eval_ex, tokenizer, cfg.max_length)
    if teacher is not None:
        for part, ex, is_held in ((train, train_ex, False), (held, eval_ex, True)):
            teacher.prepare(part, [e for _, e in ex], tokenizer, is_held)
    global_batch = cfg.batch_size * cfg.grad_accum * acc.num_processes
    if len(train) < global_batch:
        raise UsageError(f"{cfg.data}: {len(train)} training examples, fewer than one global batch "
                         f"({global_batch} = --batch-size x --grad-accum x processes); lower them")
    lengths = [len(e.ids) for e in train]
    checkpointing = checkpointing_pays(cfg, student.config, models.count_parameters(student),
                                       max(lengths))
    if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable (deprecated there)
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.max_steps:
        total = cfg.max_steps
    elif cfg.max_tokens:
        total = max(1, math.ceil(cfg.max_tokens / (sum(lengths) / len(lengths) * global_batch)))
    else:
        total = len(train) // global_batch  # one epoch
    warmup = int(cfg.warmup_ratio * total)

    if cfg.lr is None:  # the fingerprint keeps None: the rule gives a resumed run the same lr
        cfg = dataclasses.replace(cfg, lr=lr_for(models.count_parameters(student), bool(cfg.lora)))
        if acc.is_main_process:
            print(f"slm distill: --lr {cfg.lr:g}, the default for a student of "
                  f"{models.count_parameters(student) / 1e6:.0f}M parameters"
                  f"{' trained through LoRA adapters' if cfg.lora else ''} (lr_for)", file=sys.stderr)
    frozen = freeze(student, cfg.freeze)
    if frozen and acc.is_main_process:
        print(f"slm distill: --freeze {cfg.freeze}: {frozen / 1e6:.1f}M parameters stay as they are",
              file=sys.stderr)
    if cfg.fsdp:
        sharding.shard(student)  # before the optimizer: it holds the shards
    trained = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))
    # the scheduler is not prepared: it steps once per optimizer step
    if cfg.fsdp:
        model, optimizer = student, acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(student, optimizer)
    run = Run(cfg, acc, fp, out, work, model, tokenizer, optimizer, scheduler, train, held, total,
              checkpointing, teacher=teacher, layer_map=layer_map)
    restore(run, state, ckpt)
    return run


# (parameters up to, peak lr): full fine-tuning at batch 1-8 on a few hundred task lines. A
# 135M student trains well at 1e-4 to 3e-4 (the presets' recipes); a 0.5B student at 1e-4 made
# held-out KD rise tenfold in three steps (0.154 -> 1.648), at 1e-5 it stayed near its start
LR_BY_SIZE = ((300e6, 1e-4), (1e9, 1e-5), (float("inf"), 5e-6))


LORA_LR = 2e-4  # adapters start at zero and move only a low-rank slice: LoRA's usual rate


def lr_for(parameters: int, lora: bool = False) -> float:
    """The default peak learning rate of a student of this many parameters (LR_BY_SIZE): larger
    models take smaller steps, as their pretraining did; LoRA adapters take LORA_LR at any size."""
    return LORA_LR if lora else next(lr for most, lr in LR_BY_SIZE if parameters <= most)


def diverging(start: dict, now: dict) -> str | None:
    """Why held-out loss says training is going wrong, or None: a non-finite loss, or the
    held-out KD (CE without a teacher) above twice its value before the first step plus 0.05
    (a short run's noise stays below that; a too-large learning rate goes far past it)."""
    key = "eval_kd" if "eval_kd" in now else "eval_ce"
    if key not in now:
        return None
    if not math.isfinite(now[key]):
        return f"held-out {key[5:].upper()} is {now[key]}"
    if key in start and now[key] > 2 * start[key] + 0.05:
        return f"held-out {key[5:].upper()} rose from {start[key]:.3f} before training to {now[key]:.3f}"
    return None


def with_lora(model, rank: int):
    """The model with rank-`rank` LoRA adapters (alpha 2 x rank, no dropout) on every linear layer
    of its blocks, attention and MLP; the embeddings and the head stay as they are. Only the
    adapters train: a 1.5B's AdamW state is megabytes, not 12 GB."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--lora needs peft: `pip install -e .[lora]` (or `pip install peft`)") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear"))


def freeze(model, what: str) -> int:
    """Stop gradients to the weights `what` names (FREEZE); returns how many parameters that
    holds. `embeddings` covers the input embeddings and the output head, tied or not; `attention`
    adds every parameter of a module whose name ends in `self_attn` or `attention`."""
    if what == "none":
        return 0
    tensors = {id(t): t for t in (model.get_input_embeddings().weight,
                                  getattr(model.get_output_embeddings(), "weight", None))
               if t is not None}
    if what == "attention":
        for name, module in model.named_modules():
            if name.split(".")[-1] in ("self_attn", "attention"):
                tensors.update((id(p), p) for p in module.parameters())
    for t in tensors.values():
        t.requires_grad_(False)
    return sum(t.numel() for t in tensors.values())


def restore(run: Run, state: dict | None, ckpt: Path | None) -> None:
    """Continue from the checkpoint `find_resume_point` found (weights, optimizer, scheduler,
    generators, position), else clear OUT.work; OUT.work/metrics.jsonl keeps the steps up to it."""
    import safetensors.torch

    from slmkit import checkpoint, models, sharding

    rank, work = run.acc.process_index, run.work
    if state is not None:
        if run.cfg.fsdp:
            sharding.load_model_shard(run.model, ckpt, rank)
            checkpoint.load_optimizer(run.optimizer, ckpt, f"optimizer-{rank}")
        else:
            safetensors.torch.load_model(run.student, str(ckpt / "model.safetensors"))
            checkpoint.load_optimizer(run.optimizer, ckpt)
        run.scheduler.load_state_dict(checkpoint.read_json(ckpt / "scheduler.json"))
        checkpoint.load_rng(ckpt, rank)
        run.step, run.tokens, run.elapsed = state["step"], state["tokens"], state["elapsed"]
        if run.main:
            print(f"slm distill: continuing from step {run.step} of `{ckpt}`", file=sys.stderr)
    elif run.main and work.exists():
        shutil.rmtree(work)
    run.acc.wait_for_everyone()
    if run.main:
        work.mkdir(parents=True, exist_ok=True)
        keep = []  # a killed run may have logged steps past its last checkpoint, or half a line
        if state is not None and (work / "metrics.jsonl").is_file():
            keep = [line for line in (work / "metrics.jsonl").read_text(errors="replace").splitlines()
                    if _logged_step(line) is not None and _logged_step(line) <= run.step]
        with models.atomic_write(work / "metrics.jsonl") as f:
            f.write("".join(line + "\n" for line in keep))


def fit(run: Run) -> Path:
    """The training loop, from run.step to run.total; returns the student folder (or, at
    --stop-after, the checkpoint folder)."""
    import torch
    from tqdm import tqdm

    from slmkit import losses, models, sharding

    cfg, acc = run.cfg, run.acc
    lengths = [len(e.ids) for e in run.train]
    per_epoch = len(run.train) // run.global_batch
    bar = tqdm(total=run.total, initial=run.step, disable=not run.main, file=sys.stderr,
               unit="step", desc="distill", dynamic_ncols=True)
    last_eval: dict = {}
    evaluated_at = None  # the step last_eval is of
    row: dict = {}
    if run.step == 0 and (run.main or run.collective):
        log(run, {"step": 0, "tokens": 0} | evaluate_held(run))  # the starting point
    start = first_row(run)  # held-out loss before training: what divergence is measured against
    t0 = time.perf_counter() - run.elapsed
    while run.step < run.total and not (cfg.max_tokens and run.tokens >= cfg.max_tokens):
        epoch, index = divmod(run.step, per_epoch)
        batch = epoch_batches(lengths, run.global_batch, cfg.seed, epoch)[index]
        mine = [run.train[i] for i in batch[acc.process_index::run.world]]  # this process's share
        sampled = bool(cfg.on_policy) and random.Random(cfg.seed * 7919 + run.step).random() < cfg.on_policy
        if sampled:
            mine = sample_answers(run.student, mine, run.tokenizer, cfg.max_new_tokens,
                                  run.device, run.autocast())

        def objective(kd, ce):
            # on the student's own samples only the divergence trains (GKD; TRL does the same):
            # CE there would reinforce whatever the student happened to sample
            return (1 - cfg.alpha_ce) * kd if sampled else losses.mix(kd, ce, cfg.alpha_ce)

        # normalise by the global count of counted tokens, so the loss and its gradient do not
        # depend on how the batch is split over micro-batches and processes
        answers = sum(e.targets for e in mine)
        read = sum(len(e.ids) for e in mine)
        firsts = sum(len(e.segments) for e in mine)  # each example's first token: no prediction
        counts = torch.tensor([answers, read, read - firsts - answers],  # prompt positions
                              dtype=torch.float64, device=run.device)
        n_global, read, p_global = (float(x) for x in acc.reduce(counts, reduction="sum"))
        sums = torch.zeros(4, dtype=torch.float64, device=run.device)
        micro = [mine[i::cfg.grad_accum] for i in range(cfg.grad_accum)]
        for m, items in enumerate(micro):
            last = m == len(micro) - 1
            sync = (sharding.no_sync(run.model, not last) if cfg.fsdp
                    else nullcontext() if last else acc.no_sync(run.model))
            with sync:
                kd, ce, _, pkd, hkd = batch_losses(run, items, prompt=cfg.prompt_kd > 0,
                                                   states=cfg.hidden_kd > 0)
                loss = objective(kd, ce) * (run.world / n_global)  # DDP averages grads
                if cfg.prompt_kd > 0:
                    loss = loss + cfg.prompt_kd * pkd * (run.world / max(p_global, 1.0))
                if cfg.hidden_kd > 0:  # a mean over every real token read
                    loss = loss + cfg.hidden_kd * hkd * (run.world / read)
                acc.backward(loss)
            sums += torch.stack([kd.detach(), ce.detach(), pkd.detach(), hkd.detach()]).double()
        grad_norm = (sharding.clip_grad_norm(run.model, cfg.clip) if cfg.fsdp
                     else acc.clip_grad_norm_(run.model.parameters(), cfg.clip))
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.tokens += int(read)
        kd_sum, ce_sum, pkd_sum, hkd_sum = (float(x) for x in acc.reduce(sums, reduction="sum"))
        run.elapsed = time.perf_counter() - t0
        row = {"step": run.step, "tokens": run.tokens,
               "loss": float(objective(torch.tensor(kd_sum / n_global), torch.tensor(ce_sum / n_global))),
               "kd": kd_sum / n_global, "ce": ce_sum / n_global, "lr": run.scheduler.get_last_lr()[0],
               "grad_norm": float(grad_norm), "tokens_per_s": run.tokens / max(run.elapsed, 1e-9),
               "elapsed_s": round(run.elapsed, 3)}
        if cfg.prompt_kd > 0:
            row["prompt_kd"] = pkd_sum / max(p_global, 1.0)
        if cfg.hidden_kd > 0:
            row["hidden_kd"] = hkd_sum / read
        if sampled:
            row["on_policy"] = True
        if run.step % cfg.eval_every == 0 or run.step == run.total:
            if run.main or run.collective:
                last_eval, evaluated_at = evaluate_held(run), run.step
                row |= last_eval
                why = diverging(start, last_eval)
                if why and not run.warned and run.main:
                    run.warned = True
                    print(f"\nslm distill: warning: training is diverging at step {run.step}: {why}. "
                          f"--lr {cfg.lr:g} is likely too large for this student (the default for its "
                          f"size is {lr_for(models.count_parameters(run.student), bool(cfg.lora)):g}); try "
                          f"--lr {cfg.lr / 10:g}, a larger --batch-size, or fewer --max-steps",
                          file=sys.stderr)
            acc.wait_for_everyone()
        log(run, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if run.step % cfg.save_every == 0 or run.step == cfg.stop_after:
            save_checkpoint(run)
        if run.step == cfg.stop_after:
            bar.close()
            return run.work / "checkpoint"
    bar.close()
    # --max-tokens may end the loop between evaluations: the final eval is of the final weights
    if evaluated_at != run.step and (run.main or run.collective):
        last_eval = evaluate_held(run)
    save_student(run, row, last_eval, time.perf_counter() - t0)
    return run.out


class Sums(NamedTuple):
    """One micro-batch's summed losses (0-dim tensors) and its count of counted answer tokens."""
    kd: object
    ce: object
    n: int
    prompt_kd: object  # KD over the prompt tokens (`prompt`), else 0
    hidden_kd: object  # over every real token, `losses.hidden_distance` (`states`), else 0


def batch_losses(run: Run, items: list[Encoded], with_grad: bool = True, prompt: bool = False,
                 states: bool = False) -> Sums:
    """The summed losses of one micro-batch: KD and CE over the answer tokens, with `prompt` KD
    over the prompt tokens, with `states` the hidden-state distance of --hidden-kd."""
    from slmkit import losses
    from slmkit import teacher as teachers

    cfg, device = run.cfg, run.device
    ids, att, mask, pos = (t.to(device) for t in collate(items, run.tokenizer.pad_token_id))
    # --prompt-kd needs logits on every real token after a row's first; else only the answers
    window = att * (pos > 0) if prompt else mask  # every token after its example's first
    # the models return final hidden states; the loss projects them to logits chunk by chunk
    with final_hidden(run.student) as lm_head, run.autocast():
        hidden, labels, wmask, s_states = logits_window(run.model if with_grad else run.student,
                                                        ids, att, window, pos, states)
    answer = predicted(mask, att)[:, -labels.shape[1]:]  # the window's columns
    teacher = teachers.KDInputs({}) if run.teacher is None else run.teacher.inputs(
        run, items, teachers.Batch(ids, att, window, pos, answer, states))
    kw = dict(kind=cfg.loss, beta=cfg.beta, temperature=cfg.temperature, chunk=cfg.chunk,
              head=projector(lm_head, device, cfg.bf16), **teacher.loss)
    weights = collate_weights(items)  # held-out items have none: eval CE stays a plain mean
    if weights is not None:  # column c predicts token c + 1, as `predicted` aligns the mask
        weights = weights[:, 1:][:, -labels.shape[1]:].to(device)
    kd, ce, n = losses.loss_sums(hidden, labels, answer, weights=weights, **kw)
    prompt_kd = kd.new_zeros(())
    if prompt:  # a ModelTeacher's logits cover the whole window
        prompt_kd, _, _ = losses.loss_sums(hidden, labels, wmask & ~answer, **kw)
    hidden_kd = kd.new_zeros(())
    if states:  # states[0] is the embeddings: layer j's output is states[j + 1]
        pairs, channels = run.layer_map
        mine = [s_states[j + 1] for j, _ in pairs]
        t_states = teacher.states
        theirs = [t_states[t + 1] if channels is None else t_states[t + 1][..., channels] for _, t in pairs]
        hidden_kd = losses.hidden_distance(mine, theirs, att.bool())
    return Sums(kd, ce, n, prompt_kd, hidden_kd)


def evaluate_held(run: Run) -> dict:
    """Mean CE (and KD) over the held-out examples, with the student in eval mode."""
    import torch

    run.model.eval()
    kd = ce = n = 0.0
    with torch.no_grad():
        for i in range(0, len(run.held), run.cfg.batch_size):
            k, c, m, _, _ = batch_losses(run, run.held[i:i + run.cfg.batch_size], with_grad=False)
            kd, ce, n = kd + float(k), ce + float(c), n + m
    run.model.train()
    if not n:
        return {}
    res = {"eval_ce": ce / n, "eval_ppl": math.exp(min(ce / n, 50)), "eval_tokens": int(n)}
    if run.teacher is not None:
        res["eval_kd"] = kd / n
    return res


def first_row(run: Run) -> dict:
    """The step-0 row of OUT.work/metrics.jsonl (a resumed run wrote it before it was killed)."""
    path = run.work / "metrics.jsonl"
    if not run.main or not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == 0:
            return row
    return {}


def log(run: Run, row: dict) -> None:
    if run.main:
        with open(run.work / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(run: Run) -> None:
    """Write OUT.work/checkpoint (layout in slmkit.checkpoint); every process takes part."""
    import safetensors.torch

    from slmkit import checkpoint, models, sharding

    acc, main, rank = run.acc, run.main, run.acc.process_index
    tmp = run.work / checkpoint.TMP
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    checkpoint.save_rng(tmp, rank)  # every process its own generators
    if run.cfg.fsdp:  # and under FSDP its own shards
        sharding.save_model_shard(run.model, tmp, rank)
        checkpoint.save_optimizer(run.optimizer, tmp, f"optimizer-{rank}")
    elif main:
        safetensors.torch.save_model(run.student, str(tmp / "model.safetensors"))
        checkpoint.save_optimizer(run.optimizer, tmp)
    if main:
        (tmp / "scheduler.json").write_text(json.dumps(run.scheduler.state_dict()))
    acc.wait_for_everyone()
    if main:
        checkpoint.fsync_tree(tmp)
        with models.atomic_write(tmp / checkpoint.STATE) as f:  # last: the folder is complete
            json.dump({"step": run.step, "tokens": run.tokens, "elapsed": run.elapsed,
                       "total_steps": run.total, "fingerprint": run.fp}, f, indent=1)
        checkpoint.fsync_tree(tmp)
        models.replace_dir(tmp, run.work / checkpoint.LIVE)  # the old one goes only after
    acc.wait_for_everyone()


def save_student(run: Run, last_row: dict, last_eval: dict, seconds: float) -> None:
    """OUT: the student (gathered whole under FSDP) with training_record.json and metrics.jsonl;
    OUT.work goes."""
    from slmkit import models, precision, sharding

    full = sharding.full_state_dict(run.model) if run.cfg.fsdp else None  # every process takes part
    if run.main:
        student = sharding.unsharded_copy(run.model, full) if run.cfg.fsdp else run.student
        if run.cfg.lora:  # the adapters folded into the weights: a plain model, as any other
            student = student.merge_and_unload()
        record = {"config": dataclasses.asdict(run.cfg), "fingerprint": run.fp, "steps": run.step,
                  "total_steps": run.total, "tokens": run.tokens, "processes": run.world,
                  "device": str(run.device), "precision": precision.describe(run.device, run.cfg.bf16),
                  "activation_checkpointing": run.checkpointing, "time_s": round(seconds, 2),
                  "final_train": last_row, "final_eval": last_eval,
                  "parameters": models.count_parameters(student)}
        student.config.use_cache = True
        models.save_model(student, run.tokenizer, run.out, extra={"training_record.json": record})
        shutil.copy(run.work / "metrics.jsonl", run.out / "metrics.jsonl")
        shutil.rmtree(run.work, ignore_errors=True)
    run.acc.wait_for_everyone()


# --------------------------------------------------------------------------- offline teacher

def cache_teacher(cfg: DistillConfig, dest, k: int | None = None) -> Path:
    """Write the teacher's top-k log-probs on the aligned text of every example of cfg.data (both
    splits) to one text-keyed file (slmkit.topk_cache, `slmkit-topk-v2`): students of any
    tokenizer read it. Each example is read in the teacher's own chat template. Needs cfg.teacher."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from slmkit import align, models, precision, topk_cache
    from slmkit.tasks import get_task

    if not cfg.teacher or is_served(cfg.teacher):
        raise UsageError("--cache-teacher needs a local --teacher MODEL (a served teacher writes its "
                         "top-k with `slm generate --topk-logprobs`)")
    k = k or cfg.top_k
    task = get_task(cfg.task) if cfg.task else None
    train_ex, eval_ex = split_rows(cfg.data, task, cfg.eval_fraction, cfg.eval_max)
    examples = [ex for _, ex in train_ex + eval_ex]
    for ex in examples:
        align.aligned_text(ex)  # refuses chat messages before the teacher loads
    device = models.pick_device(cfg.device)
    teacher, tokenizer = models.load_model(cfg.teacher, dtype=teacher_dtype(cfg, device),
                                           device=device, trust_remote_code=cfg.trust_remote_code)
    vocab = align.token_bytes(tokenizer)
    items = encode_all(train_ex + eval_ex, tokenizer, cfg.max_length)
    from slmkit.teacher import student_spans  # the teacher's own spans, as a student's

    student_spans(items, examples, tokenizer, vocab)
    items.sort(key=lambda e: len(e.ids))  # similar lengths per batch: little padding
    writer = topk_cache.Writer(k, cfg.teacher, "distill", vocab, models.stop_ids(teacher, tokenizer),
                               autocast=precision.describe(device, cfg.bf16))
    autocast = precision.autocast(device, enabled=cfg.bf16)
    for i in tqdm(range(0, len(items), cfg.batch_size), desc="teacher top-k", file=sys.stderr):
        batch = items[i:i + cfg.batch_size]
        ids, att, mask, pos = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
        with torch.no_grad():
            with final_hidden(teacher) as lm_head, autocast:
                hidden, _, tmask, _ = logits_window(teacher, ids, att, mask, pos)
            rows, cols = tmask.nonzero(as_tuple=True)  # row-major: each example's rows in order
            hidden, head = hidden[rows, cols], projector(lm_head, device, cfg.bf16, grad=False)
            parts = [F.log_softmax(head(hidden[j:j + cfg.chunk]).float(), -1).topk(k, dim=-1)
                     for j in range(0, len(hidden), cfg.chunk)]  # chunk x vocab at a time
            lp, top = torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()
        start = 0
        for e in batch:
            aligned = [j for j, s in enumerate(e.spans) if s is not None]
            row_lp = torch.full((len(aligned), k), float("-inf"))
            row_ids = torch.zeros((len(aligned), k), dtype=torch.long)
            for r, j in enumerate(aligned):
                if j >= 1:  # position j - 1 predicts token j; a plain text's first has no row
                    row_lp[r], row_ids[r] = lp[start], top[start]
                    start += 1
            writer.add(e.key, [e.ids[j] for j in aligned], [e.spans[j] for j in aligned],
                       row_ids, row_lp)
    return writer.save(dest)


# --------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    add_config_arguments(parser, DistillConfig)
    parser.add_argument("--cache-teacher", metavar="FILE", default=None,
                        help="instead of training, write the teacher's top-k log-probs to FILE")


def run(args) -> int:
    if args.cache_teacher:  # the teacher alone runs: --student and --out may be left out
        args.out = args.out or args.cache_teacher
        args.student = args.student or args.teacher
        print(cache_teacher(config_from_args(DistillConfig, args), args.cache_teacher))
        return 0
    print(distill(config_from_args(DistillConfig, args)))
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Under `accelerate launch` or torchrun: wait for every process, then tear the process group
    down before the interpreter exits. Left to interpreter shutdown, gloo's threads can abort a
    process whose work is done ("terminate called without an active exception", exit -6), which
    fails the whole launch (seen once in CI on a loaded 2-core machine)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
