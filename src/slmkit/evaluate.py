"""Score models side by side: task quality, benchmarks, perplexity, safety and cost.

The first MODEL is the reference (usually the teacher); every other model is reported as
"% of reference" for quality and "x" (its value / the reference's) for speed and memory.

  slm eval default runs/demo/student --task summarize --data dialogsum-dev.jsonl --limit 100 \\
      --speed --out runs/demo/report
  slm eval default student --bench arc.jsonl:5 gsm.jsonl:3 --safety toxigen.json --names teacher,student

Benchmark files are JSONL (see the README's `slm eval` section):
  multiple choice  {"question": ..., "choices": [...], "gold": 0, "group": "optional"}
  generation       {"question": ..., "answer": ..., "type": "gen", "rationale": "optional", "group": ...}
A file name may end in `:K` for K-shot prompting (examples drawn from the same file, fixed seed).
"""

from __future__ import annotations

import json
import random
import re
import sys
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slmkit.backends import model_name
from slmkit.cli import (AT_LEAST_1, NOT_NEGATIVE, add_config_arguments, check_options,
                        config_from_args, option)
from slmkit.errors import UsageError
from slmkit.models import ENGINES, context_length, gguf_path, pick_engine

if TYPE_CHECKING:
    import torch

    from slmkit.data import Example
    from slmkit.tasks import Task

@dataclass
class EvalConfig:
    """One `slm eval` run; CLI flags are these names with dashes."""

    models: list[str] = option(help="models to compare; the first is the reference (HF folder, "
                               ".gguf, `default`)", flags=("models",), nargs="+", metavar="MODEL",
                               wired=True)
    names: list[str] | None = option(None, "comma-separated display names, one per MODEL",
                                     type=lambda text: text.split(","), wired=True)
    task: str | None = option(None, "task preset whose metric scores --data (summarize, grammar, "
                              "reply, qa)", wired=True)
    data: str | None = option(None, "task JSONL (default: the preset's shipped eval examples)",
                              wired=True)
    split: str | None = option("eval", "use lines whose `split` is this (default eval; lines "
                               "without `split` always count); `all` for every line", wired=True)
    limit: int | None = option(None, "score only the first N examples", check=AT_LEAST_1)
    bench: list[str] | None = option(None, "benchmark JSONL files, K-shot", nargs="+",
                                     metavar="FILE[:K]")
    shots: int = option(0, "shots for --bench files without `:K` (default 0)", check=NOT_NEGATIVE)
    seed: int = option(1234, "seed for choosing few-shot examples")
    ppl: str | None = option(None, "text (.txt or JSONL) to measure perplexity on", metavar="FILE")
    stride: int = option(512, "perplexity sliding-window stride in tokens", check=AT_LEAST_1)
    safety: str | None = option(None, "ToxiGen-style JSON list for the safety score", metavar="FILE")
    speed: bool = option(False, "measure latency, tokens/s, memory, energy")
    engine: str = option("torch", "engine for .gguf models' generation (--task, generation "
                         "benchmarks) and --speed (auto: the faster here, as `slm generate "
                         "--engine auto`); log-likelihood scores and HF folders always use torch",
                         choices=ENGINES)
    harness: str | None = option(None, "also run lm-evaluation-harness tasks (comma-separated)",
                                 metavar="TASKS")
    max_new_tokens: int = option(64, "generation length limit for --task", check=AT_LEAST_1)
    cot_tokens: int = option(256, "generation length limit for chain-of-thought benchmark answers",
                             check=AT_LEAST_1)
    batch_size: int | str = option("auto", "sequences per forward pass, or `auto` (default): as "
                                   "many tokens as free memory allows (CPU and CUDA)")
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: cuda when present)", wired=True)
    dtype: str = option("auto", "torch weights dtype: auto (bfloat16 where the forward runs under "
                        "bf16 autocast, else float32), float32, bfloat16, float16",
                        choices=("auto", "float32", "bfloat16", "float16"))
    threads: int | None = option(None, "CPU threads for llama.cpp (default: the usable cores)",
                                 check=AT_LEAST_1)
    trust_remote_code: bool = option(False, "allow code from model folders", wired=True)
    out: str | None = option(None, "folder for report.html, report.md, metrics.json, predictions/",
                             wired=True)

    def __post_init__(self):
        from slmkit.scoring import parse_batch_size

        if not self.models:
            raise UsageError("give at least one MODEL")
        self.names = _names(self.models, self.names)
        self.split = None if self.split == "all" else self.split
        self.batch_size = parse_batch_size(self.batch_size)
        check_options(self)
        self.engine = pick_engine(self.engine, self.device)
        if not (self.task or self.data or self.bench or self.ppl or self.safety or self.speed
                or self.harness):
            raise UsageError("nothing to measure: give --task/--data, --bench, --ppl, --safety, "
                             "--speed or --harness")


def add_arguments(parser) -> None:
    add_config_arguments(parser, EvalConfig)


def run(args) -> int:
    from slmkit import report

    metrics = evaluate(config_from_args(EvalConfig, args))
    print(report.scorecard(metrics))
    if args.out:
        print(f"\nreport: {Path(args.out) / 'report.html'}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- the whole evaluation

def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every model; returns the metrics dict (also written to OUT/metrics.json with the
    report when `cfg.out` is given). Per model: name, path, parameters, bytes_on_disk, `task`
    (e.g. rouge1/rouge2/rougeL, agreement with the reference's outputs), `benchmarks`,
    `perplexity`, `safety`, `speed` (decode_tokens_per_s, ...) and `relative` to models[0].

        evaluate(EvalConfig(["default", "runs/demo/student"], task="summarize", limit=40))
    """
    from slmkit import models as M
    from slmkit import report

    inputs = read_inputs(cfg)  # every input checked before any model loads: a typo costs seconds
    metrics = header(cfg, inputs)
    reference_predictions = None
    measured: dict = {}  # speed by model shape: (name, result)
    for spec, folder, name in zip(cfg.models, inputs.folders, cfg.names):
        entry, info = describe_model(spec, folder, name)
        backend = gguf_backend(cfg, inputs, spec, name) if inputs.generates else None
        model = tok = None
        if folder is not None:  # None: llama.cpp does all this model's work
            model, tok = M.load_folder(folder, dtype=M.compute_dtype(cfg.dtype, inputs.device),
                                       device=inputs.device, trust_remote_code=cfg.trust_remote_code)
        if tok is None:
            from slmkit.backends.llamacpp import GGUFTemplate

            tok = GGUFTemplate(backend)
        entry["prompt"] = "chat template" if getattr(tok, "chat_template", None) else "plain text"
        entry["engines"] = {"generation": "llamacpp" if backend else "torch",
                            "log-likelihoods": "torch" if model is not None else None}
        if inputs.examples:
            entry["task"], preds = task_quality(cfg, inputs, metrics["metric"], model, tok, backend, name,
                                                reference_predictions)
            reference_predictions = reference_predictions or preds
        if inputs.benches:
            entry["benchmarks"] = {b["name"]: run_benchmark(model, tok, b, seed=cfg.seed,
                                                            batch_size=cfg.batch_size,
                                                            max_new_tokens=cfg.cot_tokens, backend=backend)
                                   for b in inputs.benches}
            entry["benchmark_average"] = (sum(r["score"] for r in entry["benchmarks"].values())
                                          / len(inputs.benches))
        if cfg.ppl:
            entry["perplexity"] = perplexity(model, tok, inputs.ppl_text, stride=cfg.stride,
                                             batch_size=cfg.batch_size)
        if cfg.safety:
            from slmkit import safety as S

            entry["safety"] = S.evaluate_safety(model, tok, cfg.safety, batch_size=cfg.batch_size)
        del model, backend
        if cfg.harness:
            entry["harness"] = run_harness(folder, cfg.harness, inputs.device, cfg.limit, cfg.batch_size)
        if cfg.speed:
            entry["speed"] = measure_speed(cfg, spec, folder, info, name, inputs.device, measured)
        metrics["models"].append(entry)
    report.add_relative(metrics)
    if cfg.out:
        report.write_report(metrics, Path(cfg.out))
    return metrics


@dataclass
class Inputs:
    """What an evaluation reads besides the models, read and checked before any model loads."""

    task: Task | None
    data: str | None  # the task JSONL, when there are examples
    examples: list[Example]
    benches: list[dict]  # load_benchmark's
    ppl_text: str | None
    folders: list[Path]  # each model's resolved folder
    generates: bool  # whether any score needs generated text (task examples, generation benchmarks)
    device: torch.device


def read_inputs(cfg: EvalConfig) -> Inputs:
    from slmkit import models as M
    from slmkit.data import load_examples
    from slmkit.tasks import get_task, preset_data

    task = get_task(cfg.task) if cfg.task else None
    data, examples = cfg.data, []
    if task or data:
        data = data or str(preset_data(task.name))
        examples = load_examples(data, task, split=cfg.split, need_answer=True, limit=cfg.limit)
        plain = next((e for e in examples if e.text is not None), None)
        if plain is not None:
            raise UsageError(f"{plain.where}: a `text` line has no answer to score; give "
                             "`input`/`output` or `messages` lines, or the fields of --task")
    benches = [load_benchmark(*_bench_spec(b, cfg.shots)) for b in cfg.bench or []]
    if cfg.safety:
        from slmkit import safety as S

        S.load_items(cfg.safety)
    ppl_text = None
    if cfg.ppl:
        from slmkit.data import calibration_texts

        ppl_text = "\n\n".join(calibration_texts(cfg.ppl, what="--ppl"))
    generates = bool(examples) or any(b["kind"] == "gen" for b in benches)
    # torch is needed for log-likelihoods (benchmarks, perplexity, safety, the harness) and for
    # generation and speed unless llama.cpp does them; then a GGUF is never converted or loaded
    only_llamacpp = (cfg.engine == "llamacpp" and not (benches or cfg.ppl or cfg.safety or cfg.harness))
    folders = [None if only_llamacpp and gguf_path(m)
               else M.resolve(m, trust_remote_code=cfg.trust_remote_code,
                              dtype=M.compute_dtype(cfg.dtype, M.pick_device(cfg.device)))
               for m in cfg.models]
    chat = next((e for e in examples if e.messages is not None), None)
    if chat is not None:  # a task prompt runs as plain text without a template; a conversation cannot
        for spec, folder in zip(cfg.models, folders):
            if not (M.has_chat_template(folder) if folder else M.describe(spec)["chat_template"]):
                raise UsageError(f"{chat.where}: a `messages` line needs a chat template, which "
                                 f"`{spec}` has none of; use an instruct model, or give "
                                 "`input`/`output` lines (run as plain text)")
    if cfg.engine == "llamacpp" and (cfg.speed or generates) and any(map(gguf_path, cfg.models)):
        from slmkit import speed as SP

        SP.require_llamacpp()
    return Inputs(task, data, examples, benches, ppl_text, folders, generates, M.pick_device(cfg.device))


def header(cfg: EvalConfig, inputs: Inputs) -> dict:
    """metrics.json before any model is measured: what was run, how, and the baselines."""
    task, examples = inputs.task, inputs.examples
    metrics: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": cfg.names[0],
        "task": task.name if task else None,
        "metric": (task.metric if task else "rouge") if examples else None,
        "data": inputs.data, "split": cfg.split, "n_examples": len(examples),
        "settings": {"max_new_tokens": cfg.max_new_tokens, "cot_tokens": cfg.cot_tokens,
                     "batch_size": cfg.batch_size, "device": str(inputs.device), "greedy": True,
                     "seed": cfg.seed, "stride": cfg.stride, "engine": cfg.engine},
        "models": [],
    }
    if examples:  # what a model must beat: copying the input, where targets are close to inputs
        from slmkit.baselines import copy_input

        base = copy_input(examples, task, lambda p: score_task(metrics["metric"], examples, p, task))
        metrics["baselines"] = [base] if base else []
    return metrics


def describe_model(spec, folder: Path, name: str) -> tuple[dict, dict]:
    """(the model's entry in metrics.json so far, models.describe's record)."""
    from slmkit import models as M

    info = M.describe(spec)
    entry = {"name": name, "source": str(spec), "path": str(folder or gguf_path(spec)),
             **{k: info[k] for k in ("architecture", "parameters", "bytes_on_disk", "layers",
                                     "hidden_size", "heads", "kv_heads", "mlp_size")}}
    if gguf_path(spec):  # a user downloads the file, not the folder it is converted to here
        entry["bytes_on_disk"] = gguf_path(spec).stat().st_size
    print(f"slm eval: {name} ({info['parameters']:,} parameters)", file=sys.stderr)
    return entry, info


def gguf_backend(cfg: EvalConfig, inputs: Inputs, spec, name: str):
    """A .gguf generates through llama.cpp when asked (the exported file judged as users run
    it), with a context sized to the longest prompt; None: generation goes through torch."""
    if cfg.engine != "llamacpp" or not gguf_path(spec):
        return None
    from slmkit.backends.llamacpp import LlamaCppBackend, fit_context

    path = str(gguf_path(spec))
    texts = [e.prompt if e.prompt is not None else "\n".join(m["content"] for m in e.messages)
             for e in inputs.examples] + [_longest_prompt(b) for b in inputs.benches if b["kind"] == "gen"]
    # chat templates add a few dozen tokens around the user's text, chain-of-thought answers more
    n_ctx = fit_context(path, texts, max(cfg.max_new_tokens, cfg.cot_tokens) + 128)
    return LlamaCppBackend(path, name, n_threads=cfg.threads, n_ctx=n_ctx)


def _longest_prompt(bench: dict) -> str:
    """Text at least as long as any K-shot prompt of a generation benchmark: its K + 1 longest
    items written out whole (question, rationale, answer)."""
    texts = sorted((" ".join(str(i.get(k, "")) for k in ("question", "rationale", "answer"))
                    for i in bench["items"]), key=len, reverse=True)
    return "\n\n".join(texts[:bench["shots"] + 1])


def task_quality(cfg: EvalConfig, inputs: Inputs, metric: str, model, tok, backend, name: str,
                 reference_predictions: list[str] | None) -> tuple[dict, list[str]]:
    """(the task's scores, with agreement with the reference's predictions when given; the
    predictions), which are also written to OUT/predictions/NAME.jsonl."""
    examples = inputs.examples
    preds = generate(model, tok, [e.prompt if e.prompt is not None else e.messages for e in examples],
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                     desc=f"{name}: task", backend=backend)
    scores = score_task(metric, examples, preds, inputs.task)
    if reference_predictions is not None:
        from slmkit.metrics import agreement

        scores["agreement"] = agreement(preds, reference_predictions)
        scores["paired"] = paired_difference(metric, examples, reference_predictions, preds,
                                             inputs.task)
    if cfg.out:
        _write_predictions(Path(cfg.out) / "predictions" / f"{_slug(name)}.jsonl", examples, preds)
    return scores, preds


def measure_speed(cfg: EvalConfig, spec, folder: Path, info: dict, name: str, device,
                  measured: dict) -> dict:
    """speed.measure_in_subprocess's record. A dense model's cost follows its shape and dtype, not
    its weights' values: a tuned model and its original are measured once (a GGUF by its file:
    quantisation varies); `measured` (shape -> (name, result)) remembers them."""
    from slmkit import speed as SP

    use = "llamacpp" if cfg.engine == "llamacpp" and gguf_path(spec) else "torch"
    path = gguf_path(spec) if use == "llamacpp" else folder
    shape = (use, path.stat().st_size if use == "llamacpp" else info["dtype"],
             *(info[k] for k in ("architecture", "parameters", "layers", "hidden_size",
                                 "heads", "kv_heads", "mlp_size")))
    if shape in measured:
        first, result = measured[shape]
        return result | {"measured_as": first}
    measured[shape] = name, SP.measure_in_subprocess(path, engine=use, device=str(device))
    return measured[shape][1]


def _names(models: list[str], names: list[str] | None) -> list[str]:
    if names is None:
        names = [model_name(m) for m in models]  # what slm serve calls them
    elif len(names) != len(models):
        raise UsageError(f"--names has {len(names)} name(s) for {len(models)} model(s); give one per MODEL")
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        n = n.strip() or "model"
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return unique


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _write_predictions(path: Path, examples, preds) -> None:
    from slmkit.models import atomic_write

    with atomic_write(path) as f:
        for e, p in zip(examples, preds):
            f.write(json.dumps({"where": e.where, "prediction": p, "references": e.references}) + "\n")


# --------------------------------------------------------------------------- generation

def prompt_texts(tokenizer, prompts: list, chat: bool = True) -> list[str]:
    """The text each prompt becomes: user messages through the chat template when `chat`,
    message lists up to their last answer, plain text as it is."""
    from slmkit.data import chat_prompt

    texts = []
    for p in prompts:
        if isinstance(p, list):  # {"messages": ...} lines: everything before the last answer
            upto = max((i for i, m in enumerate(p) if m["role"] == "assistant"), default=len(p))
            texts.append(tokenizer.apply_chat_template(p[:upto], tokenize=False, add_generation_prompt=True))
        else:
            texts.append(chat_prompt(tokenizer, p) if chat else p)
    return texts


def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size=16,
             desc: str = "generate", chat: bool = True, backend=None) -> list[str]:
    """Greedy continuations, batched with left padding, stopping at end-of-sequence.
    prompts: user messages (rendered through the chat template when `chat`), or message lists.
    With a llama.cpp `backend` the same prompt texts are decoded there, one after the other."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    from slmkit.models import stop_ids
    from slmkit.precision import autocast

    texts = prompt_texts(tokenizer, prompts, chat)
    if backend is not None:
        return _generate_llamacpp(backend, texts, max_new_tokens, desc)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=stop_ids(model, tokenizer),
                               pad_token_id=tokenizer.pad_token_id)
    context = context_length(model.config)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    device = next(model.parameters()).device
    # longest first: batches of similar length waste less compute on padding
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    if batch_size == "auto":
        from slmkit.scoring import token_budget

        longest = len(tokenizer(texts[order[0]], add_special_tokens=False)["input_ids"]) if texts else 1
        batch_size = max(1, min(64, token_budget(model) // (longest + max_new_tokens)))
    outputs: list[str] = [""] * len(texts)
    with tqdm(total=len(texts), desc=desc, unit="ex", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False, truncation=True,
                            max_length=max(context - max_new_tokens, context // 2)).to(device)
            with torch.no_grad(), autocast(device):
                gen = model.generate(**enc, generation_config=gen_cfg)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(idx))
    return outputs


def _generate_llamacpp(backend, texts: list[str], max_new_tokens: int, desc: str) -> list[str]:
    """Greedy (temperature 0) through llama.cpp; the prompt text is the torch path's, tokenised
    by the GGUF's own tokenizer with its special tokens parsed."""
    from tqdm import tqdm

    outputs = []
    for text in tqdm(texts, desc=f"{desc} (llama.cpp)", unit="ex", file=sys.stderr, leave=False):
        done = backend.generate([text], max_tokens=max_new_tokens, temperature=0.0)[0]
        outputs.append(done.text.strip())
    return outputs


def score_task(metric: str, examples, predictions: list[str], task=None) -> dict:
    """The task's metric(s) on a set; all scores in [0, 1]."""
    from slmkit import metrics as Q

    refs = [e.references for e in examples]
    if metric == "rouge":
        return Q.rouge(predictions, refs) | {"n": len(examples)}
    if metric == "gleu":
        sources, padded = _gleu_inputs(examples, task)
        return {"gleu": Q.gleu(sources, [tokenize(p) for p in predictions], padded),
                "n": len(examples)}
    return Q.short_answer(predictions, refs) | Q.answerability(predictions, refs) | {"n": len(examples)}


def paired_difference(metric: str, examples, reference: list[str], predictions: list[str],
                      task=None) -> dict:
    """The model minus the reference on the task's headline score, over the same examples:
    {"key": "rougeL" | "gleu" | "f1", "diff", "se"} (scores in [0, 1]). Differences smaller than
    about two standard errors are ties (the seed alone moves a 40-example score by points)."""
    from slmkit import metrics as Q

    refs = [e.references for e in examples]
    if metric == "gleu":
        sources, padded = _gleu_inputs(examples, task)
        out = Q.gleu_paired(sources, [tokenize(p) for p in reference],
                            [tokenize(p) for p in predictions], padded)
        return {"key": "gleu", **out}
    if metric == "rouge":
        return {"key": "rougeL", **Q.paired_mean_difference(Q.rouge_l_each(reference, refs),
                                                            Q.rouge_l_each(predictions, refs))}
    return {"key": "f1", **Q.paired_mean_difference([Q.token_f1(p, r) for p, r in zip(reference, refs)],
                                                    [Q.token_f1(p, r) for p, r in zip(predictions, refs)])}


def _gleu_inputs(examples, task=None) -> tuple[list[str], list[list[str]]]:
    """GLEU's sources and references, tokenised like JFLEG's (spaces around punctuation; model
    outputs are not), every sentence given as many references as the most (gleu.py needs equal
    counts: the last one repeats)."""
    refs = [e.references for e in examples]
    width = max(len(r) for r in refs)
    return ([tokenize(_source(e, task)) for e in examples],
            [[tokenize(r) for r in rs + [rs[-1]] * (width - len(rs))] for rs in refs])


def _source(example, task=None) -> str:
    """The text a correction task changes: the task's first template field (JFLEG's `input`)."""
    value = example.row.get(task.fields()[0] if task else "input")
    return value if isinstance(value, str) else (example.prompt or "")


def tokenize(text: str) -> str:
    """Split words from punctuation like the JFLEG references ("develop ." / "do n't")."""
    text = re.sub(r"([.,!?;:()\"])", r" \1 ", text)
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('(s|re|ve|ll|d|m))\b", r"\1 \2", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------- benchmarks

def _bench_spec(spec: str, shots: int) -> tuple[Path, int]:
    m = re.fullmatch(r"(.+?):(\d+)", spec)
    if m and not Path(spec).exists():
        return Path(m.group(1)), int(m.group(2))
    return Path(spec), shots


def load_benchmark(path: Path, shots: int = 0) -> dict:
    """A validated benchmark: {"name", "path", "kind": "mc"|"gen", "shots", "items"}."""
    from slmkit.data import read_jsonl

    if not path.is_file():
        raise UsageError(f"--bench: file `{path}` does not exist")
    items, kind = [], None
    for line, row in read_jsonl(path):
        where = f"{path}:{line}"
        this = "gen" if row.get("type") == "gen" else "mc"
        if kind is not None and this != kind:
            raise UsageError(f"{where}: a benchmark file is either all multiple choice or all "
                             "`\"type\": \"gen\"`; split it into two files")
        kind = this
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UsageError(f"{where}: key `question` missing or empty")
        if "group" in row and not isinstance(row["group"], str):
            raise UsageError(f"{where}: key `group` must be text")
        if kind == "gen":
            if not isinstance(row.get("answer"), (str, int, float)) or isinstance(row.get("answer"), bool):
                raise UsageError(f"{where}: key `answer` missing (a generation item needs its answer)")
        else:
            choices = row.get("choices")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                raise UsageError(f"{where}: key `choices` must be a list of at least two non-empty strings")
            gold = row.get("gold")
            if isinstance(gold, bool) or not isinstance(gold, int):
                raise UsageError(f"{where}: key `gold` must be the index of the right choice (an integer)")
            if not 0 <= gold < len(choices):
                raise UsageError(f"{where}: `gold` {gold} is out of range for {len(choices)} choices "
                                 f"(0..{len(choices) - 1})")
        items.append(row | {"where": where})
    if shots < 0 or shots >= len(items):
        raise UsageError(f"--bench {path}:{shots}: {shots}-shot needs at least {shots + 1} items "
                         f"(the file has {len(items)})")
    return {"name": path.stem, "path": str(path), "kind": kind, "shots": shots, "items": items}


def fewshot(items: list[dict], i: int, k: int, seed: int) -> list[dict]:
    """k examples other than item i, the same for a given (seed, i) on every run and model."""
    if k == 0:
        return []
    rng = random.Random(seed * 1_000_003 + i)
    return rng.sample([it for j, it in enumerate(items) if j != i], k)


def mc_context(item: dict, shots: list[dict]) -> str:
    """lm-evaluation-harness's plain format: `Question: ...\\nAnswer:`; shots answered in full."""
    parts = [f"Question: {s['question']}\nAnswer: {s['choices'][s['gold']]}" for s in shots]
    return "\n\n".join(parts + [f"Question: {item['question']}\nAnswer:"])


COT = "Let's think step by step."


def gen_prompt(item: dict, shots: list[dict]) -> str:
    """Chain-of-thought prompt: worked shots (rationale when given), then the question."""
    parts = []
    for s in shots:
        why = f" {s['rationale'].strip()}" if isinstance(s.get("rationale"), str) else ""
        parts.append(f"Question: {s['question']}\nAnswer: {COT}{why} The answer is {s['answer']}.")
    return "\n\n".join(parts + [f"Question: {item['question']}\nAnswer: {COT}"])


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The final answer of a chain of thought: after the last "answer is", else the last number,
    else the first line."""
    text = text.split("\nQuestion:")[0]  # the model may start inventing the next shot
    found = re.findall(r"answer is:?\s*([^\n]+)", text, flags=re.IGNORECASE)
    if found:
        answer = found[-1]
    else:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else (text.strip().splitlines() or [""])[0]
    return answer.strip().rstrip(".").strip()


def _as_number(text) -> float | None:
    m = _NUMBER.search(str(text))
    if not m:
        return None
    try:
        return float(m.group().replace("$", "").replace(",", ""))
    except ValueError:
        return None


def answer_correct(predicted: str, gold) -> bool:
    """Numbers compare as numbers (commas and $ ignored); text by SQuAD-normalised equality."""
    from slmkit.metrics import exact_match

    g = _as_number(gold) if re.fullmatch(r"\s*" + _NUMBER.pattern + r"\s*", str(gold)) else None
    if g is not None:
        p = _as_number(predicted)
        return p is not None and abs(p - g) < 1e-6
    return bool(exact_match(predicted, [str(gold)]))


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size=16,
                   shared: str = "packed") -> list[float]:
    """Summed log-probability of each continuation given its context, as lm-evaluation-harness
    computes it: trailing spaces of the context move to the continuation, the continuation's
    tokens are those of the whole pair after the context's own encoding, and the model reads the
    context's encoding then them. Pairs with the same context share it (slmkit.scoring: `shared`
    packed, cache or none); a pair longer than the model's context keeps its end."""
    from slmkit import scoring

    limit = context_length(model.config)
    groups: dict[tuple[int, ...], list[int]] = {}  # context ids -> indices of its pairs
    encoded = []
    for k, (context, continuation) in enumerate(pairs):
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
        if not cont:
            raise ValueError(f"continuation {continuation!r} adds no tokens to its context")
        encoded.append((ctx, cont))
        groups.setdefault(tuple(ctx), []).append(k)
    scores = [0.0] * len(pairs)
    fits = [ks for ctx, ks in groups.items()
            if ctx and len(ctx) + max(len(encoded[k][1]) for k in ks) <= limit + 1]
    in_groups = {k for ks in fits for k in ks}
    pad = tokenizer.pad_token_id or 0
    if fits:
        got = scoring.score_continuations(model, [(encoded[ks[0]][0], [encoded[k][1] for k in ks])
                                                  for ks in fits],
                                          batch_size, pad, shared=shared, desc="multiple choice")
        for ks, values in zip(fits, got):
            for k, v in zip(ks, values):
                scores[k] = v
    rest = [k for k in range(len(pairs)) if k not in in_groups]
    if rest:  # empty or over-long contexts: each pair alone, its end kept
        spans = []
        for k in rest:
            ctx, cont = encoded[k]
            seq = (ctx + cont)[-(limit + 1):]
            spans.append((seq, len(seq) - len(cont)))
        for k, v in zip(rest, scoring.score_spans(model, spans, batch_size, pad, desc="log-likelihoods")):
            scores[k] = v
    return scores


def run_benchmark(model, tokenizer, bench: dict, seed: int = 1234, batch_size=16,
                  max_new_tokens: int = 256, shared: str = "packed", backend=None) -> dict:
    """{"score", "n", "shots", "kind", "groups": {group: {...}}, plus acc/acc_norm or accuracy}.
    `score` averages the groups' accuracies (each group counts once, as Phi-2's tables average
    benchmarks), or is the plain accuracy when the file has no groups."""
    from slmkit.metrics import choice_accuracy

    items, k = bench["items"], bench["shots"]
    shots = [fewshot(items, i, k, seed) for i in range(len(items))]
    if bench["kind"] == "mc":
        pairs = [(mc_context(it, sh), " " + c) for it, sh in zip(items, shots) for c in it["choices"]]
        flat = loglikelihoods(model, tokenizer, pairs, batch_size, shared=shared)
        lls, pos = [], 0
        for it in items:
            lls.append(flat[pos:pos + len(it["choices"])])
            pos += len(it["choices"])

        def score(sel):
            return choice_accuracy([lls[i] for i in sel], [items[i]["choices"] for i in sel],
                                   [items[i]["gold"] for i in sel])
        headline = "acc"
    else:
        outs = generate(model, tokenizer, [gen_prompt(it, sh) for it, sh in zip(items, shots)],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, desc=bench["name"], chat=False,
                        backend=backend)
        right = [answer_correct(extract_answer(o), it["answer"]) for o, it in zip(outs, items)]

        def score(sel):
            return {"accuracy": sum(right[i] for i in sel) / len(sel)}
        headline = "accuracy"
    result = score(range(len(items))) | {"n": len(items), "shots": k, "kind": bench["kind"]}
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if "group" in it:
            groups.setdefault(it["group"], []).append(i)
    result["groups"] = {g: score(sel) | {"n": len(sel)} for g, sel in sorted(groups.items())}
    result["score"] = (sum(g[headline] for g in result["groups"].values()) / len(groups)
                       if groups else result[headline])
    return result


# --------------------------------------------------------------------------- perplexity

def perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int = 512,
               batch_size=16) -> float:
    """Perplexity of a long text with a sliding window (transformers' "Perplexity of fixed-length
    models"): windows of `max_length` tokens (default: the model's context) advance by `stride`;
    each scores only the tokens it has not scored before, with the rest as context. The mean is
    over the tokens actually predicted (the first token of the text has no prediction). The
    windows are independent, so they are scored in batches (slmkit.scoring)."""
    import math

    from slmkit import scoring

    ids = tokenizer(text)["input_ids"]
    n = len(ids)
    if n < 2:
        raise UsageError("--ppl: the text has fewer than two tokens")
    max_length = max_length or context_length(model.config)
    stride = max(1, min(stride, max_length))
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[begin:end]
        # the window scores its tokens from prev_end on (never its first: it has no context)
        spans.append((window, max(1, prev_end - begin)))
        prev_end = end
        if end == n:
            break
    sums = scoring.score_spans(model, spans, batch_size, tokenizer.pad_token_id or 0,
                               desc="perplexity", unit="window")
    count = sum(len(w) - start for w, start in spans)
    return math.exp(-sum(sums) / count)


# --------------------------------------------------------------------------- lm-evaluation-harness

def run_harness(folder: Path, tasks: str, device, limit: int | None, batch_size: int) -> dict:
    """Pass tasks through to lm-evaluation-harness (optional dependency) and keep its results.
    A task given as a .yaml path is a local task definition in the harness's own format: its
    folder joins the harness's task search path, so it runs offline on local data files."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--harness: give task names, e.g. --harness arc_easy,hellaswag")
    tasks_to_run, include = [], set()
    for name in names:
        if not name.endswith((".yaml", ".yml")):
            tasks_to_run.append(name)
            continue
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"--harness {name}: no such task file")
        import yaml

        task = (yaml.safe_load(path.read_text()) or {}).get("task")
        if not isinstance(task, str):
            raise UsageError(f"{path}: a harness task file needs a `task: NAME` line")
        tasks_to_run.append(task)
        include.add(str(path.resolve().parent))
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("--harness needs lm-evaluation-harness, which is not installed: "
                         "`pip install lm-eval` (it may download task data from the Hub)") from None
    manager = TaskManager(include_path=sorted(include)) if include else None
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                  tasks=tasks_to_run, device=str(device), limit=limit,
                                  batch_size=batch_size, task_manager=manager)
    return json.loads(json.dumps(res["results"], default=str))
