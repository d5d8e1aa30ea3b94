"""The teacher writes task data: N sampled candidates per input, checked by the task's validators,
scored (reference metric when the input has a reference, teacher-as-judge), the best kept when it
clears --threshold, near-duplicates removed and the eval set kept out. One JSONL line per kept
example, with its provenance, written as it goes; a rerun resumes where the last run stopped.

    slm generate --teacher default --task summarize --out data/train.jsonl          # preset inputs
    slm generate --teacher default --task summarize --inputs dialogues.jsonl --out data/s.jsonl \\
        -n 4 --decontaminate eval.jsonl --topk-logprobs 20
    slm generate --teacher openai:gpt-4o-mini@https://api.openai.com/v1 --task grammar \\
        --topics topics.txt --out data/grammar.jsonl          # the teacher writes the inputs first

Each output line is the input row with the task's target field set to the kept answer, plus
`meta` = {teacher, sampling, score, scores, reasons, candidates}. Inputs that produced nothing go
to OUT.rejected.jsonl with their reason, so a rerun skips them too.

Filters and their thresholds (all stated in the summary printed at the end):
  validators   non-empty; no template leakage; summarize: shorter than the dialogue and not a
               copy of it (ROUGE-L precision against the dialogue < 0.9); grammar: close to the
               source (character similarity >= 0.6)
  --threshold  best candidate's score (mean of ROUGE-L F vs the reference and the judge score,
               each in [0, 1]) must reach it
  dedup        MinHash LSH (128 permutations, word 3-shingles of the input fields): an input
               whose estimated Jaccard similarity to a kept example's input is >= --dedup-threshold
               (0.8) is a duplicate; checked before generation and again when keeping
  decontam     share of an input's (or answer's) word 8-grams found in the eval set
               >= --decontam-threshold (0.2) is contaminated; inputs are checked before any
               generation (one shorter than 8 words: when it equals an eval text), answers
               after (those shorter than 8 words are not: "No." leaks no eval example)
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from slmkit import models
from slmkit.backends import Completion, check_sampling
from slmkit.cli import (AT_LEAST_1, FRACTION, NOT_NEGATIVE, Check, add_config_arguments,
                        check_options, config_from_args, flag_error, option)
from slmkit.errors import UsageError, check_file, read_text
from slmkit.tasks import Task, get_task, preset_data

NGRAM = 8
SHINGLE = 3
NUM_PERM = 128
COPY_PRECISION = 0.9
CLOSE_RATIO = 0.6
MISSING_LOGPROBS = ("continue", "stop")

# rubric questions for the teacher-as-judge; {prompt} is the task's user message
RUBRICS = {
    "summarize": "Is this a correct, complete and concise summary of the conversation?",
    "grammar": "Is this text a correct, fluent version of the original that keeps its meaning?",
    "reply": "Is this a natural, friendly and relevant reply to the message?",
    "qa": "Does this answer the question correctly using only the passage?",
}
DEFAULT_RUBRIC = "Is this a correct, helpful and well-written answer to the task?"

# self-instruct: what the teacher is asked to write for each seed topic, per task
INPUT_WRITERS = {
    "summarize": ("Write a realistic conversation of 6 to 10 turns between two people about {topic}. "
                  "Write each turn on its own line as `#Person1#: ...` or `#Person2#: ...`. "
                  "Reply with the conversation only."),
    "grammar": ("Write one or two sentences about {topic} with a few grammar, spelling or "
                "punctuation mistakes of the kind a language learner makes. Reply with the text only."),
    "reply": ("Write a short message (one to three sentences) that someone might send to a friend or "
              "colleague about {topic}. Reply with the message only."),
    "qa": ("Write a short factual passage of three to five sentences about {topic}. Then, on a new "
           "line starting with `Question:`, ask one question that the passage answers."),
}


@dataclass
class GenerateConfig:
    """One `slm generate` run; CLI flags are these names with dashes."""

    teacher: str = option(help="MODEL: HF folder, .gguf, `default`, or openai:NAME@URL (key from "
                          "OPENAI_API_KEY / SLM_API_KEY)", wired=True)
    task: str | Task = option(help="preset: summarize, grammar, reply, qa (from Python also a Task)",
                              wired=True)
    out: str = option(help="output JSONL (appended to, so a rerun resumes)", wired=True)
    inputs: str | None = option(None, "JSONL of task inputs (default: the preset's train inputs, or "
                                "--topics)", wired=True)
    topics: str | None = option(None, "text file of seed topics, one a line: the teacher first "
                                "writes inputs about each (self-instruct)")
    n: int = option(4, "candidates sampled per input (best-of-N); 1 = one greedy answer",
                    flags=("-n",), check=AT_LEAST_1)
    temperature: float = option(0.8, "sampling temperature of the candidates")
    top_p: float = option(0.95, "nucleus sampling: the smallest set of tokens with this much "
                          "probability")
    max_new_tokens: int = option(128, "longest answer, in tokens")
    batch_size: int = option(16, "inputs per backend call (padded batch / requests in flight)",
                             check=AT_LEAST_1)
    judge: bool = option(True, "the teacher judges the candidates (P(Yes) to a rubric question, or "
                         "a 1-5 rating); --no-judge turns it off")
    threshold: float = option(0.2, "drop an input whose best candidate scores below this (scores "
                              "are in [0, 1])", check=FRACTION)
    dedup_threshold: float = option(0.8, "MinHash Jaccard at which two examples are near-duplicates "
                                    "(1 = off)", check=Check(lambda v: 0 < v <= 1, "in (0, 1]"))
    decontaminate: str | None = option(None, "eval JSONL to keep out of the data (its split=train "
                                       "lines are ignored)", metavar="EVAL_JSONL", wired=True)
    decontam_threshold: float = option(0.2, "share of word 8-grams found in the eval set that marks "
                                       "a text contaminated",
                                       check=Check(lambda v: 0 < v <= 1, "in (0, 1]"))
    topk_logprobs: int = option(0, "capture the teacher's top-k log-probs per answer token in "
                                "distill's offline format (0 = off, at most 20)")
    on_missing_logprobs: str = option("continue", "when the teacher returns no log-probs: continue "
                                      "without them, or stop", choices=MISSING_LOGPROBS)
    inputs_per_topic: int = option(4, "inputs the teacher writes per topic", check=AT_LEAST_1)
    seed: int = option(0, "random seed (sampling)")
    limit: int | None = option(None, "use only the first LIMIT inputs (a rerun without it goes on "
                               "from there)", check=AT_LEAST_1)
    concurrency: int = option(8, "openai teacher: requests in flight at once", check=AT_LEAST_1)
    retries: int = option(5, "openai teacher: tries after the first on 429 / 5xx / timeouts / "
                          "refused connections, with exponential backoff", check=NOT_NEGATIVE)
    tokenizer: str | None = option(None, "MODEL whose tokenizer an openai teacher uses (optional: "
                                   "without it the top-k cache keeps its tokens by their text)")
    threads: int | None = option(None, "CPU threads for a llama.cpp teacher (a .gguf or packaged "
                                 "name; default: the usable cores) or a PyTorch one", check=AT_LEAST_1)
    engine: str = option("llamacpp", "where a .gguf or packaged teacher runs: llamacpp (one request "
                         "at a time), torch (converted once, --batch-size inputs per forward; "
                         "faster on CPUs with bf16 matrix units and on GPUs), or auto: the faster "
                         "of the two here", choices=models.ENGINES)
    trust_remote_code: bool = option(False, "allow a model folder that ships its own code (auto_map)",
                                     wired=True)

    def __post_init__(self):
        try:  # max_new_tokens, temperature, top_p, seed, topk_logprobs: the backends' own ranges
            check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.topk_logprobs)
        except ValueError as e:
            raise flag_error(e, self, {"max_tokens": "max_new_tokens", "logprobs": "topk_logprobs"}) from None
        self.engine = models.pick_engine(self.engine)
        check_options(self)
        if self.on_missing_logprobs not in MISSING_LOGPROBS:
            raise UsageError(f"--on-missing-logprobs must be one of {', '.join(MISSING_LOGPROBS)}")
        if self.inputs and self.topics:
            raise UsageError("give --inputs or --topics, not both")


# --------------------------------------------------------------------------- text helpers

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def input_text(task: Task, row: dict) -> str:
    """The input fields of a row joined (what the teacher reads, without the template)."""
    return "\n".join(row[f] for f in task.fields())


def row_id(row: dict, task: Task) -> str:
    """A stable id: the row's own `id` (or DialogSum's `fname`), else a hash of its input fields."""
    for key in ("id", "fname"):
        if isinstance(row.get(key), (str, int)) and str(row[key]):
            return str(row[key])
    return "h" + hashlib.sha1(input_text(task, row).encode()).hexdigest()[:12]


_rouge = None


def rouge_l(prediction: str, reference: str) -> tuple[float, float]:
    """(precision, F1) of ROUGE-L, stemmed, as in the summarisation papers."""
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    s = _rouge.score(reference, prediction)["rougeL"]
    return s.precision, s.fmeasure


# --------------------------------------------------------------------------- validators

def template_markers(task: Task) -> list[str]:
    """Phrases from the template's fixed text that must not appear in an answer (leakage)."""
    marks = []
    for literal, _, _, _ in string.Formatter().parse(task.template):
        first = literal.strip().split("\n")[0].strip()
        if len(first) >= 12:
            marks.append(" ".join(first.split()[:4]).lower())
    return marks + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>"]


def validate(task: Task, row: dict, answer: str) -> str | None:
    """The first reason this answer is unusable, or None when it passes every validator."""
    text = answer.strip()
    if not text:
        return "empty"
    low = text.lower()
    if any(m.lower() in low for m in template_markers(task)):
        return "template_leak"
    source = input_text(task, row)
    if task.name == "summarize":
        if len(words(text)) >= len(words(source)):
            return "not_shorter"
        if len(words(text)) >= 5 and rouge_l(text, source)[0] >= COPY_PRECISION:
            return "copy"
    if task.name == "grammar":
        if difflib.SequenceMatcher(None, source.lower(), low).ratio() < CLOSE_RATIO:
            return "not_close"
    return None


# --------------------------------------------------------------------------- dedup and decontam

class NearDup:
    """MinHash LSH over word 3-shingles; `seen(key, text)` is True when a near-duplicate of text
    (estimated Jaccard >= threshold) was added before, else it adds text and returns False.
    threshold 1 turns it off."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        # LSH needs >= 2 bands: above 0.95 it only proposes candidates, the estimate decides
        self.lsh = MinHashLSH(threshold=min(threshold, 0.95), num_perm=NUM_PERM)
        self.mh: dict = {}

    @staticmethod
    def minhash(text: str):
        from datasketch import MinHash

        toks = words(text)
        shingles = {" ".join(g) for g in ngrams(toks, SHINGLE)} or {" ".join(toks)}
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in shingles])
        return m

    def has(self, text: str) -> bool:
        """Whether a near-duplicate of text was added before (adds nothing)."""
        if self.threshold >= 1:
            return False
        m = self.minhash(text)
        # LSH candidates are approximate; confirm with the MinHash estimate itself
        return any(self.mh[k].jaccard(m) >= self.threshold for k in self.lsh.query(m))

    def seen(self, key: str, text: str) -> bool:
        """has(text); when it is new, add it under `key`."""
        if self.has(text):
            return True
        if self.threshold < 1 and key not in self.mh:
            self.mh[key] = self.minhash(text)
            self.lsh.insert(key, self.mh[key])
        return False


class EvalIndex:
    """Word 8-grams of an eval set; `overlap(text)` is the share of text's 8-grams found in it
    (texts shorter than 8 words: 1.0 when they equal a whole eval text, word for word, unless
    `short=False`: then 0.0, as for answers, where a stock reply such as "No." or "The passage
    does not say." equals eval answers but carries no eval example)."""

    def __init__(self, path: str | Path):
        from slmkit.data import read_jsonl

        self.grams: set[tuple[str, ...]] = set()
        self.short: set[str] = set()
        for _, row in read_jsonl(path):
            if row.get("split") == "train":
                continue
            for key, value in row.items():
                texts = value if isinstance(value, list) else [value]
                for t in texts:
                    if isinstance(t, str) and key not in ("id", "fname", "split", "topic"):
                        toks = words(t)
                        self.grams |= ngrams(toks, NGRAM)
                        self.short |= {" ".join(toks)}

    def overlap(self, text: str, short: bool = True) -> float:
        toks = words(text)
        if len(toks) < NGRAM:
            joined = " ".join(toks)
            return 1.0 if short and joined and joined in self.short else 0.0
        grams = ngrams(toks, NGRAM)
        return sum(g in self.grams for g in grams) / len(grams)


# --------------------------------------------------------------------------- append-only output

class JsonlLog:
    """An append-only JSONL file that survives a kill: every line is flushed and fsynced as it
    is written, and a torn last line (no newline: the process died mid-write) is cut off on open,
    so its input is simply done again."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self.f = None
        if not path.is_file():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        try:  # before the cut below: a file we refuse is left as it is
            text = data[:end].decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise UsageError(f"{path}:{line}: not UTF-8 text (offset {e.start}), so the run cannot "
                             "resume from this file; choose another --out") from None
        if end < len(data):
            print(f"slm generate: {path}: dropping a half-written last line (an interrupted run); "
                  "its input is generated again", file=sys.stderr)
            os.truncate(path, end)
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{path}:{n}: not valid JSON, so the run cannot resume from this "
                                     "file; remove the line or choose another --out") from None

    def append(self, obj: dict) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def side_path(out: Path, suffix: str) -> Path:
    """OUT.jsonl -> OUT.SUFFIX.jsonl beside it (rejected inputs, teacher-written inputs)."""
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{suffix}.jsonl")


# --------------------------------------------------------------------------- inputs

@dataclass
class Item:
    id: str
    row: dict
    where: str


def file_inputs(path: str | Path, task: Task, limit: int | None = None) -> list[Item]:
    """Task inputs from JSONL, every line checked before anything is generated. Lines with
    `"split": "eval"` are never generated from (they are the eval set)."""
    from slmkit.data import read_jsonl

    items, first_line = [], {}
    for n, row in read_jsonl(path):
        if row.get("split") == "eval":
            continue
        where = f"{path}:{n}"
        task.check(row, where)
        item = Item(row_id(row, task), row, where)
        if item.id in first_line and not item.id.startswith("h"):
            raise UsageError(f"{where}: id `{item.id}` already used on line {first_line[item.id]}; "
                             "ids must be unique for a rerun to resume")
        first_line.setdefault(item.id, n)
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise UsageError(f"`{path}` has no inputs to generate from (every line is split=eval?)")
    return items


def read_topics(path: str | Path, task: Task) -> list[str]:
    path = check_file(path, "--topics")
    if task.name not in INPUT_WRITERS or get_task(task.name) != task:
        raise UsageError(f"--topics: the teacher can write inputs for the presets "
                         f"{', '.join(INPUT_WRITERS)} only; give --inputs for task `{task.name}`")
    topics = [t.strip() for t in read_text(path, "--topics").splitlines()]
    topics = [t for t in topics if t and not t.startswith("#")]
    if not topics:
        raise UsageError(f"--topics `{path}` has no topics (one a line; # starts a comment)")
    return topics


def parse_written_input(task: Task, text: str) -> dict | None:
    """The teacher's text -> a row of the task's input fields, or None when it is unusable."""
    text = text.strip()
    if task.name == "qa":
        passage, sep, question = text.partition("Question:")
        if not sep or not passage.strip() or not question.strip():
            return None
        return {"passage": passage.strip(), "question": question.strip().splitlines()[0]}
    return {task.fields()[0]: text} if text else None


def topic_inputs(cfg: GenerateConfig, task: Task, backend, topics: list[str], bar_file=None) -> list[Item]:
    """Self-instruct: the teacher writes `inputs_per_topic` inputs per seed topic. They are kept
    in OUT.inputs.jsonl (appended per batch), so a rerun reuses them instead of writing new ones."""
    from tqdm import tqdm

    log = JsonlLog(side_path(Path(cfg.out), "inputs"))
    done_topics = {r["topic_index"] for r in log.rows}
    todo = [i for i in range(len(topics)) if i not in done_topics]
    writer = INPUT_WRITERS[task.name]
    with tqdm(total=len(topics), initial=len(topics) - len(todo), desc="writing inputs", unit="topic",
              file=bar_file or sys.stderr, dynamic_ncols=True) as bar:
        for chunk in batches(todo, cfg.batch_size):
            msgs = [[{"role": "user", "content": writer.format(topic=topics[i])}] for i in chunk]
            comps = backend.generate(msgs, n=cfg.inputs_per_topic, max_tokens=max(16, 4 * cfg.max_new_tokens),
                                     temperature=max(cfg.temperature, 0.7), top_p=cfg.top_p, seed=cfg.seed)
            for k, i in enumerate(chunk):
                for j in range(cfg.inputs_per_topic):
                    row = parse_written_input(task, comps[k * cfg.inputs_per_topic + j].text)
                    log.append({"id": f"topic{i}-{j}", "topic": topics[i], "topic_index": i,
                                **(row or {}), "unusable": row is None})
            bar.update(len(chunk))
    log.close()
    items = [Item(r["id"], r, f"{log.path}:{n}") for n, r in enumerate(JsonlLog(log.path).rows, 1)
             if not r.get("unusable")]
    if cfg.limit:
        items = items[:cfg.limit]
    if not items:
        raise UsageError(f"the teacher wrote no usable inputs for the topics in {cfg.topics} "
                         f"(see {log.path}); try another teacher or more topics")
    return items


def batches(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# --------------------------------------------------------------------------- scoring

def reference_score(task: Task, row: dict, answer: str) -> float | None:
    """The task's own metric of the answer against the row's reference(s), in [0, 1]."""
    from slmkit import metrics

    refs = task.references(row)
    if not refs:
        return None
    if task.metric == "f1":
        return metrics.token_f1(answer, refs)
    if task.metric == "exact":
        return metrics.exact_match(answer, refs)
    if task.metric == "gleu":
        return metrics.gleu([input_text(task, row)], [answer], [refs], iterations=20)
    return metrics.rouge([answer], [refs])["rougeL"]


def judge_prompt(task: Task, row: dict, answer: str, rating: bool) -> list[dict]:
    rubric = RUBRICS.get(task.name, DEFAULT_RUBRIC)
    ask = ("Rate the answer from 1 (useless) to 5 (excellent). Reply with the number only."
           if rating else "Reply Yes or No.")
    return [{"role": "user", "content": f"{task.prompt(row)}\n\nAnswer: {answer.strip()}\n\n{rubric} {ask}"}]


class Judge:
    """The teacher as judge. With log-probs: P(Yes) / (P(Yes) + P(No)) of the first answer
    token (the top-20 alternatives, any casing). Without (an endpoint that returns none): a 1-5
    rating, (r - 1) / 4. Either way a score in [0, 1], or None when the reply says neither."""

    def __init__(self, backend, task: Task, fits):
        self.backend, self.task, self.fits = backend, task, fits
        self.rating = False
        self.unclear = 0  # judge replies that gave no usable score

    def scores(self, pairs: list[tuple[dict, str]]) -> list[float | None]:
        out: list[float | None] = [None] * len(pairs)
        prompts = [judge_prompt(self.task, row, ans, self.rating) for row, ans in pairs]
        idx = [i for i, p in enumerate(prompts) if self.fits(p, 4)]
        if not idx:
            return out
        if not self.rating:
            comps = self.backend.generate([prompts[i] for i in idx], max_tokens=1, temperature=0.0,
                                          logprobs=20)
            if all(c.logprobs is None and c.finish_reason != "error" for c in comps):
                print("slm generate: the teacher returns no log-probs; judging by a 1-5 rating instead",
                      file=sys.stderr)
                self.rating = True
                return self.scores(pairs)
            for i, c in zip(idx, comps):
                out[i] = yes_share(c.logprobs[0].top) if c.logprobs else None
        else:
            comps = self.backend.generate([prompts[i] for i in idx], max_tokens=4, temperature=0.0)
            for i, c in zip(idx, comps):
                m = re.search(r"[1-5]", c.text)
                out[i] = (int(m.group()) - 1) / 4 if m else None
        self.unclear += sum(out[i] is None for i in idx)
        return out


def yes_share(top: list[tuple[int, str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) over the alternatives (id, text, logprob); None if neither is there."""
    mass = Counter()
    for _, text, lp in top:
        word = text.strip().lower()
        if word in ("yes", "no"):
            mass[word] += math.exp(lp)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


def combine(scores: dict[str, float | None]) -> float | None:
    """A candidate's score: the mean of the components it has (each in [0, 1])."""
    vals = [v for v in scores.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- the run

def teacher_backend(cfg: GenerateConfig):
    """`openai:NAME@URL` -> the HTTP backend; anything else -> slmkit.backends.load_backend."""
    if cfg.teacher.startswith("openai:"):
        from slmkit.backends.openai import OpenAIBackend

        return OpenAIBackend.from_spec(cfg.teacher, concurrency=cfg.concurrency, retries=cfg.retries)
    from slmkit.backends import load_backend, model_name

    if cfg.engine == "torch" and cfg.teacher != models.DEFAULT and models.gguf_path(cfg.teacher):
        # held in the dtype its forward computes in (bf16 under autocast: 3 GB for a 1.5B)
        dtype = models.compute_dtype("auto", models.pick_device())
        folder = models.resolve(cfg.teacher, dtype=dtype)
        return load_backend(str(folder), name=model_name(cfg.teacher), dtype=dtype,
                            n_threads=cfg.threads)
    return load_backend(cfg.teacher, n_threads=cfg.threads, trust_remote_code=cfg.trust_remote_code)


def prompt_fits(backend):
    """fits(prompt, max_new_tokens) for a local model; an HTTP endpoint checks it itself."""
    from slmkit.backends.openai import OpenAIBackend

    if isinstance(backend, OpenAIBackend):
        return lambda prompt, new: True
    return lambda prompt, new: len(backend.prompt_ids(prompt)) + min(new, 8) < backend.context_length


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@dataclass
class Candidate:
    """A valid, distinct answer of the teacher and its scores, each in [0, 1] (None: not measured,
    e.g. no reference or no judge)."""

    completion: Completion
    scores: dict[str, float | None]

    @property
    def text(self) -> str:
        return self.completion.text.strip()

    @property
    def score(self) -> float | None:
        return combine(self.scores)


@dataclass
class Candidates:
    """An input's valid candidates, and the failed ones counted by reason."""

    item: Item
    valid: list[Candidate]
    rejected: Counter


@dataclass
class Drop:
    """Why an input yields no example, and what its line in OUT.rejected.jsonl adds."""

    reason: str
    extra: dict = field(default_factory=dict)


def screen(item: Item, task: Task, cfg: GenerateConfig, eval_index: EvalIndex | None, dedup: NearDup,
           fits) -> str | None:
    """Why an input is not worth generating from (contaminated, a near-duplicate, too long), or None."""
    text = input_text(task, item.row)
    if eval_index and eval_index.overlap(text) >= cfg.decontam_threshold:
        return "contaminated_input"
    if dedup.has(text):
        return "duplicate"
    if not fits(user(task.prompt(item.row)), cfg.max_new_tokens):
        return "prompt_too_long"
    return None


def no_logprobs(cfg: GenerateConfig) -> str:
    return (f"the teacher `{cfg.teacher}` returned no log-probs although --topk-logprobs "
            f"{cfg.topk_logprobs} asked for them")


def sample(backend, cfg: GenerateConfig, task: Task, items: list[Item]) -> list[Completion]:
    """cfg.n completions per item, item k's at [k * n, (k + 1) * n). Raises when the teacher refused
    the whole batch (a systematic problem, not one prompt), or returned no log-probs that
    --on-missing-logprobs stop requires."""
    comps = backend.generate([user(task.prompt(it.row)) for it in items], n=cfg.n,
                             max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=cfg.seed, logprobs=cfg.topk_logprobs)
    if all(c.finish_reason == "error" for c in comps):
        raise UsageError(f"the teacher refused every request of a batch: {backend.last_error}")
    if (cfg.topk_logprobs and cfg.on_missing_logprobs == "stop"
            and any(c.logprobs is None for c in comps)):
        raise UsageError(no_logprobs(cfg) + "; rerun with --on-missing-logprobs continue to write the "
                         "data without them, or with --topk-logprobs 0")
    return comps


def candidates(task: Task, item: Item, comps: list[Completion]) -> Candidates:
    """The item's completions through the validators, repeats removed, each valid one scored
    against the row's reference (None without one)."""
    valid, rejected, seen = [], Counter(), set()
    for c in comps:
        # `error`: the endpoint refused this request (e.g. the prompt is too long for it)
        reason = "teacher_error" if c.finish_reason == "error" else validate(task, item.row, c.text)
        if reason is None and c.text.strip() in seen:
            reason = "same_as_other_candidate"
        if reason:
            rejected[reason] += 1
            continue
        seen.add(c.text.strip())
        valid.append(Candidate(c, {"reference": reference_score(task, item.row, c.text.strip())}))
    return Candidates(item, valid, rejected)


def judge_candidates(judge: Judge, groups: list[Candidates]) -> None:
    """Set every candidate's `judge` score, all of them in one batch of judge prompts."""
    flat = [(g.item.row, c) for g in groups for c in g.valid]
    for (_, c), score in zip(flat, judge.scores([(row, c.text) for row, c in flat])):
        c.scores["judge"] = score


def keep_best(group: Candidates, task: Task, cfg: GenerateConfig, eval_index: EvalIndex | None,
              dedup: NearDup) -> Candidate | Drop:
    """The candidate with the highest combined score (unscored ones last; the first of equals),
    or why the input is dropped: nothing valid, the best under --threshold, a contaminated answer,
    or a near-copy of an input kept earlier in this batch. A kept input is added to `dedup`."""
    best = max(group.valid, key=lambda c: -1 if c.score is None else c.score, default=None)
    if best is None:
        return Drop("no_valid_candidate", {"candidates": dict(group.rejected)})
    if best.score is not None and best.score < cfg.threshold:
        return Drop("below_threshold", {"score": round(best.score, 4)})
    if eval_index and eval_index.overlap(best.text, short=False) >= cfg.decontam_threshold:
        return Drop("contaminated_output")
    if dedup.seen(group.item.id, input_text(task, group.item.row)):
        return Drop("duplicate")
    return best


def kept_row(task: Task, cfg: GenerateConfig, group: Candidates, best: Candidate) -> dict:
    """The output line: the input row with the answer as its target, and `meta` (provenance)."""
    it = group.item
    row = {k: v for k, v in it.row.items() if k not in ("split", "unusable", "topic_index")}
    if task.references(it.row):
        row["reference"] = task.answer(it.row)  # the original, kept beside ours
    row.update({"id": it.id, task.target: best.text, "split": "train"})
    row["meta"] = {
        "teacher": cfg.teacher,
        "sampling": {"n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
        "score": None if best.score is None else round(best.score, 4),
        "scores": {k: None if v is None else round(v, 4) for k, v in best.scores.items()},
        "candidates": len(group.valid), "reasons": dict(group.rejected),
        "finish_reason": best.completion.finish_reason}
    if cfg.topk_logprobs and best.completion.logprobs is not None:
        row["teacher_topk"] = topk_record(best.completion)
    return row


@dataclass
class Tally:
    """What one generate() run did, for its stats."""

    kept: int = 0
    tokens: int = 0  # generated by the teacher
    gen_seconds: float = 0.0
    judge_seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)  # inputs, by reason
    rejected: Counter = field(default_factory=Counter)  # candidates, by reason


def generate(cfg: GenerateConfig) -> dict:
    """Run the teacher over the inputs; append kept examples to cfg.out. Returns the stats:
    {"inputs", "done_before", "kept", "dropped": {reason: count}, "candidates_rejected":
    {reason: count}, "tokens", "tokens_per_s", ...}. Every input error is raised before the
    teacher is loaded."""
    from tqdm import tqdm

    task = cfg.task if isinstance(cfg.task, Task) else get_task(cfg.task)
    out = Path(cfg.out)
    if out.is_dir():  # found now, not when the first kept answer is written
        raise UsageError(f"--out `{out}` is a folder; give the output file, e.g. "
                         f"--out {out / 'train.jsonl'}")
    topics = read_topics(cfg.topics, task) if cfg.topics else None
    items = None if topics else file_inputs(cfg.inputs or preset_data(task.name), task, cfg.limit)
    eval_index = EvalIndex(cfg.decontaminate) if cfg.decontaminate else None
    kept_log, rejected_log = JsonlLog(out), JsonlLog(side_path(out, "rejected"))
    done = {r.get("id") for r in kept_log.rows} | {r.get("id") for r in rejected_log.rows}
    dedup = NearDup(cfg.dedup_threshold)
    for r in kept_log.rows:  # what earlier runs kept still counts for near-duplicates
        if all(isinstance(r.get(f), str) for f in task.fields()) and isinstance(r.get(task.target), str):
            dedup.seen(str(r.get("id")), input_text(task, r))

    backend = teacher_backend(cfg)
    if topics:
        items = topic_inputs(cfg, task, backend, topics)
    fits = prompt_fits(backend)
    judge = Judge(backend, task, fits) if cfg.judge else None
    todo = [it for it in items if it.id not in done]
    tally, warned_logprobs = Tally(), False

    def reject(it: Item, reason: str, **extra):
        tally.dropped[reason] += 1
        rejected_log.append({"id": it.id, "reason": reason, **extra})

    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="generate", unit="input",
               file=sys.stderr, dynamic_ncols=True)
    try:
        for chunk in batches(todo, cfg.batch_size):
            ready = []
            for it in chunk:
                reason = screen(it, task, cfg, eval_index, dedup, fits)
                if reason:
                    reject(it, reason)
                else:
                    ready.append(it)
            bar.update(len(chunk) - len(ready))
            if not ready:
                continue
            t0 = time.perf_counter()
            comps = sample(backend, cfg, task, ready)
            tally.gen_seconds += time.perf_counter() - t0
            tally.tokens += sum(c.completion_tokens for c in comps)
            if cfg.topk_logprobs and not warned_logprobs and any(c.logprobs is None for c in comps):
                print(f"slm generate: {no_logprobs(cfg)}; continuing without them "
                      "(--on-missing-logprobs continue)", file=sys.stderr)
                warned_logprobs = True
            # validators first: only valid, distinct candidates are judged
            groups = [candidates(task, it, comps[k * cfg.n:(k + 1) * cfg.n]) for k, it in enumerate(ready)]
            if judge:
                t0 = time.perf_counter()
                judge_candidates(judge, groups)
                tally.judge_seconds += time.perf_counter() - t0
            for group in groups:
                tally.rejected.update(group.rejected)
                best = keep_best(group, task, cfg, eval_index, dedup)
                if isinstance(best, Drop):
                    reject(group.item, best.reason, **best.extra)
                else:
                    kept_log.append(kept_row(task, cfg, group, best))
                    tally.kept += 1
            bar.update(len(ready))
            bar.set_postfix(kept=tally.kept, dropped=sum(tally.dropped.values()),
                            tok_s=f"{tally.tokens / tally.gen_seconds:.0f}" if tally.gen_seconds else "-")
    finally:
        bar.close()
        kept_log.close()
        rejected_log.close()
    return run_stats(cfg, out, len(items), len(items) - len(todo), tally, judge)


def run_stats(cfg: GenerateConfig, out: Path, inputs: int, done_before: int, tally: Tally,
              judge: Judge | None) -> dict:
    """generate()'s return value; with --topk-logprobs the teacher's top-k cache is written first."""
    topk = {}
    if cfg.topk_logprobs:
        tok = None  # an HTTP teacher's tokens are known by their text
        if not cfg.teacher.startswith("openai:") or cfg.tokenizer:
            folder = models.resolve(cfg.tokenizer or cfg.teacher, trust_remote_code=cfg.trust_remote_code)
            tok = models.load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code)
        topk = write_topk_cache(out, cfg.task, tok, cfg.teacher)
    seconds = tally.gen_seconds
    return topk | {
        "out": str(out), "inputs": inputs, "done_before": done_before, "kept": tally.kept,
        "dropped": dict(tally.dropped), "candidates_rejected": dict(tally.rejected),
        "kept_total": len(JsonlLog(out).rows), "tokens": tally.tokens,
        "generation_seconds": round(seconds, 2), "judge_seconds": round(tally.judge_seconds, 2),
        "tokens_per_s": round(tally.tokens / seconds, 1) if seconds else None,
        "judge": None if judge is None else ("rating 1-5" if judge.rating else "P(Yes)"),
        "judge_unclear": 0 if judge is None else judge.unclear,
        "thresholds": {"score": cfg.threshold, "dedup_jaccard": cfg.dedup_threshold,
                       "decontam_8gram_share": cfg.decontam_threshold if cfg.decontaminate else None},
    }


def topk_record(c) -> dict:
    """The teacher's top-k per generated token, kept in the output line until the cache is
    written: generated token ids (None for an HTTP teacher, which gives only text), their texts,
    and per token the alternatives' ids (-1 from HTTP), texts and log-probs, most likely first."""
    http = any(t.id < 0 for t in c.logprobs)
    rec = {"token_ids": None if http else [t.id for t in c.logprobs],
           "tokens": [t.token for t in c.logprobs],
           "ids": None if http else [[j for j, _, _ in t.top] for t in c.logprobs],
           "logprobs": [[round(v, 4) for _, _, v in t.top] for t in c.logprobs]}
    if http:
        rec["texts"] = [[s for _, s, _ in t.top] for t in c.logprobs]
    return rec


def write_topk_cache(out: Path, task_arg, tokenizer, teacher: str) -> dict:
    """Write the teacher's top-k of every line of `out` that carries `teacher_topk` to
    OUT.topk.safetensors, distill's offline teacher (slmkit.topk_cache, `slmkit-topk-v2`): keyed
    by the line's text, so a student of any tokenizer reads it (slm distill --teacher-cache).

    The teacher's generated tokens are its tokens of the answer; their bytes (from `tokenizer`,
    the teacher's, when the backend gave ids; from the token text for an HTTP teacher, None here)
    spell the raw completion, of which the stored answer is the stripped part: each token's byte
    range follows. A completion reports no row for the end-of-sequence token after the answer:
    the student's EOS position then has no teacher prediction (CE only). A line whose tokens do
    not spell its answer is filed with no tokens (the student gets CE only on it)."""
    from slmkit import align, topk_cache
    from slmkit.data import read_jsonl, to_example

    task = task_arg if isinstance(task_arg, Task) else get_task(task_arg)
    vocab = align.token_bytes(tokenizer) if tokenizer is not None else None
    writer, aligned, total = None, 0, 0
    for n, row in read_jsonl(out):
        rec = row.get("teacher_topk")
        if not rec:
            continue
        k = max((len(r) for r in rec["logprobs"]), default=1)
        if writer is None:
            writer = topk_cache.Writer(k, teacher, "generate", vocab,
                                       [tokenizer.eos_token_id] if tokenizer is not None else ())
            hidden = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        by_id = vocab is not None and rec.get("token_ids") is not None
        example = to_example(row, f"{out}:{n}", task, need_answer=True)
        answer = align.aligned_text(example)
        total += 1
        if by_id:
            tokens, alts, lps = rec["token_ids"], rec["ids"], rec["logprobs"]
            spans = byte_spans([b"" if i in hidden else vocab[i] or b"" for i in tokens], answer)
        else:  # an HTTP teacher: tokens by their text; a piece of a character reads U+FFFD
            tokens = [writer.intern(t.encode()) for t in rec["tokens"]]
            alts = [[writer.intern(t.encode()) for t in ts] for ts in rec["texts"]]
            lps = [[v if "\ufffd" not in t else float("-inf") for t, v in zip(ts, vs)]
                   for ts, vs in zip(rec["texts"], rec["logprobs"])]
            spans = align.text_spans(rec["tokens"], answer)
            if spans is not None:  # only a run's first piece is predicted from known text
                for u in range(1, len(spans)):
                    if "\ufffd" in rec["tokens"][u] and "\ufffd" in rec["tokens"][u - 1]:
                        lps[u] = [float("-inf")] * len(lps[u])
        # the tokens inside the answer (an HTTP run's empty pieces too: they hold its place)
        size = len(answer.encode())
        keep = [u for u, (a, b) in enumerate(spans or []) if a < b or (not by_id and 0 < a < size)]
        aligned += bool(keep)
        rows_ids = [[max(j, 0) for j in alts[u]] for u in keep]
        rows_lp = [[v if j >= 0 else float("-inf") for j, v in zip(alts[u], lps[u])] for u in keep]
        writer.add(align.text_key(example), [tokens[u] for u in keep], [spans[u] for u in keep],
                   rows_ids or [[]], rows_lp or [[]])
    if writer is None or not len(writer):
        return {"topk_cache": None, "topk_aligned": 0, "topk_lines": 0}
    dest = side_path(out, "topk").with_suffix(".safetensors")
    writer.save(dest)
    return {"topk_cache": str(dest), "topk_aligned": aligned, "topk_lines": total}


def byte_spans(pieces: list[bytes], answer: str) -> list[tuple[int, int]] | None:
    """Byte spans in `answer` of generated tokens of these bytes (a special token: b"", as the
    decoded answer leaves it out), or None where they do not spell it. The answer is the
    completion's text, stripped; bytes that are no valid UTF-8 (a character cut at
    max_new_tokens, a random model's) read as U+FFFD there, as they do in the answer."""
    ends, raw = [], b""
    for piece in pieces:
        raw += piece
        ends.append(len(raw.decode(errors="replace").encode()))
    target = answer.encode()
    shift = raw.decode(errors="replace").encode().find(target) if target else -1
    if shift < 0:
        return None
    out, pos = [], 0
    for end in ends:
        out.append((min(max(pos - shift, 0), len(target)), min(max(end - shift, 0), len(target))))
        pos = max(pos, end)
    return out


# --------------------------------------------------------------------------- CLI

def add_arguments(p):
    add_config_arguments(p, GenerateConfig)
    p.add_argument("--json", action="store_true", help="print the stats as JSON")


def run(args) -> int:
    cfg = config_from_args(GenerateConfig, args)
    stats = generate(cfg)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"kept {stats['kept']} of {stats['inputs'] - stats['done_before']} inputs this run "
          f"({stats['kept_total']} in {stats['out']}; {stats['done_before']} done before)")
    for reason, count in sorted(stats["dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  dropped {count:>5}  {reason}")
    for reason, count in sorted(stats["candidates_rejected"].items(), key=lambda kv: -kv[1]):
        print(f"  candidates rejected {count:>5}  {reason}")
    if stats["tokens_per_s"]:
        print(f"generated {stats['tokens']} tokens at {stats['tokens_per_s']} tokens/s")
    if stats.get("topk_cache"):
        print(f"teacher top-k for {stats['topk_lines']} lines in {stats['topk_cache']} "
              f"({stats['topk_aligned']} aligned token by token; read it with "
              "`slm distill --teacher-cache`)")
    print(f"thresholds: {json.dumps(stats['thresholds'])}")
    return 0
