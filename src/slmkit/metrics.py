"""Task quality metrics: pure functions of predictions and references, scores in [0, 1].

    rouge(["the cat sat"], [["a cat sat"]])           # {"rouge1": .., "rouge2": .., "rougeL": ..}
    gleu(sources, hypotheses, references)              # JFLEG's corpus GLEU, several references
    exact_match("The Eiffel Tower!", ["eiffel tower"]) # 1.0 (SQuAD normalisation)
    token_f1("in Paris", ["Paris, France"])            # 0.5
    agreement(student_predictions, teacher_predictions)  # mean ROUGE-L F of student vs teacher
    paired_mean_difference(teacher_f1s, student_f1s)   # {"diff": .., "se": ..}, same examples
    gleu_paired(sources, teacher_out, student_out, references)  # the same, by paired bootstrap
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# --------------------------------------------------------------------------- ROUGE

def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (Porter stemming, as rouge_score's `use_stemmer=True`).
    With several references an example takes its best one (rouge_score's `score_multi`)."""
    each = _rouge_each(predictions, references, ROUGE_TYPES)
    return {k: sum(e[k] for e in each) / len(each) for k in ROUGE_TYPES}


def rouge_l_each(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Each example's ROUGE-L F (best reference), the terms whose mean is rouge()["rougeL"]."""
    return [e["rougeL"] for e in _rouge_each(predictions, references, ("rougeL",))]


def _rouge_each(predictions, references, types) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    out = []
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, pred) if len(refs) > 1 else scorer.score(refs[0], pred)
        out.append({k: scores[k].fmeasure for k in types})
    return out


def agreement(predictions: list[str], teacher_predictions: list[str]) -> float:
    """How closely a student says what the teacher said: mean ROUGE-L F of each student output
    against the teacher's output for the same input (1.0 = identical wording)."""
    return rouge(predictions, [[t] for t in teacher_predictions])["rougeL"]


# --------------------------------------------------------------------------- GLEU (JFLEG)

def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) + 1 - n))


def gleu_stats(source: list[str], hypothesis: list[str], reference: list[str], order: int = 4) -> list[int]:
    """Sufficient statistics of one hypothesis against one reference, as JFLEG's gleu.py:
    [hyp_len, ref_len, match_1, total_1, ..., match_order, total_order], where
    match_n = max(0, |H∩R| - |H∩(S\\R)|) (n-grams the source has and the reference lacks count
    against the hypothesis), total_n = max(0, hyp_len + 1 - n)."""
    stats = [len(hypothesis), len(reference)]
    for n in range(1, order + 1):
        h, s, r = _ngrams(hypothesis, n), _ngrams(source, n), _ngrams(reference, n)
        # S\R drops every n-gram *type* the reference has, whatever its count (as gleu.py does)
        s_not_r = Counter({g: c for g, c in s.items() if g not in r})
        matches = sum((h & r).values()) - sum((h & s_not_r).values())
        stats += [max(matches, 0), max(len(hypothesis) + 1 - n, 0)]
    return stats


def gleu_from_stats(stats: list[int], order: int = 4) -> float:
    """GLEU from summed statistics: brevity penalty x geometric mean of n-gram precisions;
    0 when any statistic is 0 (corpus level, no smoothing)."""
    if any(s == 0 for s in stats):
        return 0.0
    c, r = stats[0], stats[1]
    log_prec = sum(math.log(m / t) for m, t in zip(stats[2::2], stats[3::2])) / order
    return math.exp(min(0.0, 1.0 - r / c) + log_prec)


def gleu(sources: list[str], hypotheses: list[str], references: list[list[str]],
         iterations: int = 500, order: int = 4) -> float:
    """Corpus GLEU (Napoles et al. 2015, the 2016 multi-reference update), exactly as JFLEG's
    eval/gleu.py reports it: in each of `iterations` rounds every sentence is scored against one
    of its references drawn at random (round j seeds Python's `random` with j*101), statistics
    are summed over the corpus, and the GLEU of the sums is averaged over the rounds.
    Texts are split on whitespace, so give them tokenised alike (JFLEG is pre-tokenised).
    Every sentence needs the same number of references, as the corpus files have."""
    per_ref = _gleu_table(sources, hypotheses, references, order)
    return _gleu_mean(per_ref, _reference_draws(len(hypotheses), len(references[0]), iterations), order)


def _gleu_table(sources, hypotheses, references, order: int) -> list[list[list[int]]]:
    """gleu_stats of every (sentence, reference) pair: [sentence][reference] -> statistics."""
    _check_lengths(hypotheses, references)
    if len(sources) != len(hypotheses):
        raise ValueError(f"{len(sources)} sources for {len(hypotheses)} hypotheses")
    num_refs = len(references[0])
    if num_refs == 0 or any(len(r) != num_refs for r in references):
        raise ValueError("every sentence needs the same (non-zero) number of references")
    return [[gleu_stats(s.split(), h.split(), r.split(), order) for r in rs]
            for s, h, rs in zip(sources, hypotheses, references)]


def _reference_draws(sentences: int, num_refs: int, iterations: int) -> list[list[int]]:
    """One reference index per sentence per round, drawn as gleu.py draws them."""
    draws = []
    for j in range(iterations):
        rng = random.Random(j * 101)  # the same draws as gleu.py's random.seed(j * 101), and the
        draws.append([rng.randint(0, num_refs - 1) for _ in range(sentences)])  # global one untouched
    return draws


def _gleu_mean(per_ref, draws: list[list[int]], order: int) -> float:
    """The mean over the rounds of `draws` of the GLEU of the corpus sums (gleu())."""
    scores = []
    for round_ in draws:
        totals = [0] * (2 * order + 2)
        for i, ref in enumerate(round_):
            totals = [a + b for a, b in zip(totals, per_ref[i][ref])]
        scores.append(gleu_from_stats(totals, order))
    return sum(scores) / len(scores)


def _gleu_of_totals(totals, order: int):
    """gleu_from_stats over the last axis of an array of summed statistics (numpy)."""
    import numpy as np

    c, r = totals[..., 0], totals[..., 1]
    m, t = totals[..., 2::2], totals[..., 3::2]
    ok = (totals > 0).all(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_prec = np.log(np.where(ok[..., None], m / np.where(t > 0, t, 1), 1)).sum(-1) / order
        value = np.exp(np.minimum(0.0, 1.0 - r / np.where(c > 0, c, 1)) + log_prec)
    return np.where(ok, value, 0.0)


# --------------------------------------------------------------------------- paired differences

def paired_mean_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """b minus a for a metric that is a mean of per-example scores, on the same examples:
    {"diff": mean(b - a), "se": its standard error, sd(b - a) / sqrt(n)}. Pairing removes what
    makes one example hard for both, so the error is smaller than either mean's."""
    if len(a) != len(b) or not a:
        raise ValueError(f"{len(a)} and {len(b)} scores: need the same examples, at least one")
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return {"diff": mean, "se": math.sqrt(var / len(d))}


def gleu_paired(sources: list[str], hyp_a: list[str], hyp_b: list[str], references: list[list[str]],
                resamples: int = 1000, rounds: int = 50, seed: int = 0, iterations: int = 500,
                order: int = 4) -> dict[str, float]:
    """b minus a in corpus GLEU on the same sentences: {"diff": gleu(b) - gleu(a), "se"}. GLEU is
    a ratio of corpus sums, not a mean, so its standard error comes from the paired bootstrap
    (Koehn 2004): resample the sentences with replacement, score both systems on each resample
    (each averaged over `rounds` of gleu.py's reference draws), take the spread of b - a."""
    import numpy as np

    table_a = _gleu_table(sources, hyp_a, references, order)
    table_b = _gleu_table(sources, hyp_b, references, order)
    n = len(sources)
    full = _reference_draws(n, len(references[0]), iterations)
    diff = _gleu_mean(table_b, full, order) - _gleu_mean(table_a, full, order)
    stats_a, stats_b = np.array(table_a, dtype=np.float64), np.array(table_b, dtype=np.float64)
    draws = np.array(full[:rounds])  # (rounds, n): gleu.py's first draws
    counts = np.random.default_rng(seed).multinomial(n, [1 / n] * n, size=resamples)  # (B, n)

    def resampled(stats):  # (n, refs, k) -> GLEU of each resample, averaged over the rounds: (B,)
        chosen = stats[np.arange(n)[None, :], draws]  # (rounds, n, k)
        totals = np.einsum("bn,rnk->brk", counts, chosen)
        return _gleu_of_totals(totals, order).mean(1)

    spread = resampled(stats_b) - resampled(stats_a)
    return {"diff": diff, "se": float(spread.std(ddof=1))}


# --------------------------------------------------------------------------- short answers (SQuAD)

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD token F1: overlap of normalised tokens (a bag), best over the references."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for ref in references:
        gold = normalize_answer(ref).split()
        if not pred or not gold:  # both empty counts as a match, one empty as a miss
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def short_answer(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean exact match and token F1 over a set."""
    _check_lengths(predictions, references)
    n = len(predictions)
    return {"exact": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
            "f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n}


NOT_GIVEN = re.compile(r"\b(does|do|did) ?n[o']?t (say|mention|state|specify|contain|give|include)\b"
                       r"|\bnot (mentioned|stated|specified|given|said)\b")
"""An answer saying the passage does not give it (matched on SQuAD-normalised text)."""


def says_not_given(text: str) -> bool:
    """Whether an answer says the passage does not give the answer ("The passage does not say.")."""
    return bool(NOT_GIVEN.search(normalize_answer(text)))


def answerability(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Unanswerable questions (a reference says the passage does not say) apart from answerable
    ones: `unanswerable_acc`, the share of unanswerable questions whose answer says so, and
    `f1_answerable`, token F1 on the others, with their counts. {} when no question is
    unanswerable (the overall F1 says it all)."""
    _check_lengths(predictions, references)
    no = [i for i, refs in enumerate(references) if any(says_not_given(r) for r in refs)]
    if not no:
        return {}
    yes = [i for i in range(len(predictions)) if i not in set(no)]
    out = {"unanswerable_acc": sum(says_not_given(predictions[i]) for i in no) / len(no),
           "n_unanswerable": len(no), "n_answerable": len(yes)}
    if yes:
        out["f1_answerable"] = sum(token_f1(predictions[i], references[i]) for i in yes) / len(yes)
    return out


# --------------------------------------------------------------------------- multiple choice

def choice_accuracy(logliks: list[list[float]], choices: list[list[str]],
                    gold: list[int]) -> dict[str, float]:
    """lm-evaluation-harness's multiple-choice metrics from summed continuation log-likelihoods:
    `acc` picks the most likely choice, `acc_norm` the most likely per character of the choice."""
    acc = acc_norm = 0
    for ll, ch, g in zip(logliks, choices, gold):
        acc += max(range(len(ll)), key=lambda i: ll[i]) == g
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / max(len(ch[i]), 1)) == g
    n = len(gold)
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
