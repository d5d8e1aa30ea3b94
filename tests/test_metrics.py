"""Each metric against values computed by hand (the arithmetic is in the comments)."""

import math
import random

import pytest

from slmkit import metrics

# A JFLEG-style sentence: the source has two errors, the hypothesis fixes one of them.
SRC = "yesterday i has a apple and a pear for lunch"
REF = "yesterday i had an apple and a pear for lunch"
HYP = "yesterday i had a apple and a pear for lunch"


def test_rouge_hand_computed():
    # unigrams: 5 of 6 shared each way -> 5/6; bigrams: the cat, on the, the mat of 5 -> 3/5;
    # longest common subsequence "the cat on the mat" = 5 of 6 -> 5/6
    r = metrics.rouge(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)


def test_rouge_stems_and_averages_and_takes_best_reference():
    # Porter stemming: cats -> cat, running/runs -> run, so the unigrams match fully
    assert metrics.rouge(["cats running"], [["cat runs"]])["rouge1"] == pytest.approx(1.0)
    r = metrics.rouge(["a b", "x y"], [["a b"], ["p q"]])  # 1 and 0 -> mean 0.5
    assert r["rougeL"] == pytest.approx(0.5)
    assert metrics.rouge(["a b"], [["p q", "a b"]])["rouge1"] == pytest.approx(1.0)


def test_agreement_is_rouge_l_against_teacher():
    assert metrics.agreement(["the cat sat on the mat", "x"],
                             ["the cat is on the mat", "x"]) == pytest.approx((5 / 6 + 1) / 2)


def test_gleu_stats_hand_computed():
    # n=1: H∩R = 9 (one of the two "a"), S\R = {has}, not in H -> 9 of 10
    # n=2: H∩R = 7, S\R = {i has, has a, a apple}; H has "a apple" -> 7-1 = 6 of 9
    # n=3: H∩R = 5 (y i had, apple and a, and a pear, a pear for, pear for lunch),
    #      H has "a apple and" from S\R -> 4 of 8
    # n=4: H∩R = 3, H has "a apple and a" from S\R -> 2 of 7
    stats = metrics.gleu_stats(SRC.split(), HYP.split(), REF.split())
    assert stats == [10, 10, 9, 10, 6, 9, 4, 8, 2, 7]
    expected = (0.9 * 6 / 9 * 4 / 8 * 2 / 7) ** 0.25  # no brevity penalty: c == r
    assert metrics.gleu_from_stats(stats) == pytest.approx(expected)
    assert expected == pytest.approx(0.541083, abs=1e-6)


def test_gleu_brevity_penalty_and_zero():
    # c=5, r=10 -> exp(1 - 10/5) = exp(-1); all precisions 1
    assert metrics.gleu_from_stats([5, 10, 5, 5, 4, 4, 3, 3, 2, 2]) == pytest.approx(math.exp(-1))
    assert metrics.gleu_from_stats([5, 5, 5, 5, 4, 4, 3, 3, 0, 2]) == 0.0


def test_gleu_corpus():
    # identical references: every random draw gives the same statistics
    assert metrics.gleu([SRC], [HYP], [[REF, REF, REF, REF]]) == pytest.approx(0.541083, abs=1e-6)
    # copying the source is worse than fixing one error; the full correction scores 1
    copied = metrics.gleu([SRC], [SRC], [[REF] * 4])
    assert copied < 0.541083
    assert metrics.gleu([SRC], [REF], [[REF] * 2]) == pytest.approx(1.0)
    # corpus level: statistics are summed before the GLEU, not averaged per sentence
    both = metrics.gleu([SRC, SRC], [HYP, REF], [[REF], [REF]])
    summed = [a + b for a, b in zip(metrics.gleu_stats(SRC.split(), HYP.split(), REF.split()),
                                    metrics.gleu_stats(SRC.split(), REF.split(), REF.split()))]
    assert both == pytest.approx(metrics.gleu_from_stats(summed))
    assert both != pytest.approx((0.541083 + 1) / 2, abs=1e-3)


def test_gleu_draws_references_like_jfleg_and_leaves_the_global_generator_alone():
    # two references: HYP scores 1 against itself and 0.541 against REF; round j uses
    # random.seed(j*101) then randint(0, 1) for the sentence
    state = random.getstate()
    picks = []
    for j in range(20):
        random.seed(j * 101)
        picks.append(random.randint(0, 1))
    random.setstate(state)
    expected = sum(1.0 if p == 0 else 0.541083 for p in picks) / 20
    random.seed(7)
    before = random.getstate()
    assert metrics.gleu([SRC], [HYP], [[HYP, REF]], iterations=20) == pytest.approx(expected, abs=1e-6)
    assert random.getstate() == before  # neither reseeded nor advanced
    assert 0 < picks.count(0) < 20  # the draw really mixes both references


def test_gleu_draws_one_reference_per_sentence_in_order_like_jfleg():
    # JFLEG's eval/gleu.py, literally: each round seeds the global generator with j*101, then
    # draws every sentence's reference index in corpus order; GLEU of the summed statistics
    srcs, hyps = [SRC, SRC, SRC], [HYP, REF, SRC]
    refs = [[HYP, REF, SRC], [REF, SRC, HYP], [SRC, HYP, REF]]
    state = random.getstate()
    rounds, scores = [], []
    for j in range(30):
        random.seed(j * 101)
        rounds.append([random.randint(0, 2) for _ in hyps])
        stats = [metrics.gleu_stats(s.split(), h.split(), rs[k].split())
                 for s, h, rs, k in zip(srcs, hyps, refs, rounds[-1])]
        scores.append(metrics.gleu_from_stats([sum(col) for col in zip(*stats)]))
    random.setstate(state)
    assert any(len(set(r)) > 1 for r in rounds)  # sentences of one round draw different refs
    assert metrics.gleu(srcs, hyps, refs, iterations=30) == pytest.approx(sum(scores) / 30, abs=1e-12)


def test_paired_mean_difference_hand_computed():
    # d = b - a = [0.1, 0.4, 0.0]: mean 1/6; sd^2 = ((-1/15)^2 + (7/30)^2 + (1/6)^2) / 2 = 13/300
    out = metrics.paired_mean_difference([0.1, 0.5, 0.3], [0.2, 0.9, 0.3])
    assert out["diff"] == pytest.approx(1 / 6)
    assert out["se"] == pytest.approx(math.sqrt(13 / 300 / 3))
    assert metrics.paired_mean_difference([0.2, 0.4], [0.2, 0.4]) == {"diff": 0.0, "se": 0.0}
    with pytest.raises(ValueError):
        metrics.paired_mean_difference([0.1], [0.1, 0.2])


def test_rouge_l_each_averages_to_rouge():
    preds, refs = ["the cat sat", "a dog ran far"], [["a cat sat"], ["the dog ran", "a dog ran far"]]
    each = metrics.rouge_l_each(preds, refs)
    assert each[1] == pytest.approx(1.0)  # the best of two references
    assert sum(each) / 2 == pytest.approx(metrics.rouge(preds, refs)["rougeL"])


def test_vectorised_gleu_equals_gleu_from_stats():
    # the bootstrap's numpy GLEU against the scalar one, brevity penalty and zero statistics included
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    rows = [[rng.randint(1, 30), rng.randint(1, 30)] + [rng.randint(0, 9) for _ in range(8)]
            for _ in range(200)]
    rows += [[5, 10, 5, 5, 4, 4, 3, 3, 2, 2], [5, 5, 5, 5, 4, 4, 3, 3, 0, 2]]
    got = metrics._gleu_of_totals(np.array(rows, dtype=np.float64), 4)
    assert got.tolist() == pytest.approx([metrics.gleu_from_stats(r) for r in rows], abs=1e-12)


def test_gleu_paired_bootstrap():
    # sentences where b fixes one more error than a on some, none on others: a spread to measure
    srcs = [SRC, "she go to school by bus", "he have two cat", "we is happy"]
    refs = [[REF], ["she goes to school by bus"], ["he has two cats"], ["we are happy"]]
    a = [SRC, "she go to school by bus", "he has two cat", "we is happy"]
    b = [HYP, "she goes to school by bus", "he has two cat", "we are happy"]
    out = metrics.gleu_paired(srcs, a, b, refs, resamples=400)
    assert out["diff"] == pytest.approx(metrics.gleu(srcs, b, refs) - metrics.gleu(srcs, a, refs))
    assert out["diff"] > 0 and out["se"] > 0
    same = metrics.gleu_paired(srcs, a, a, refs, resamples=50)
    assert same == {"diff": 0.0, "se": 0.0}
    # four times the sentences: the same difference, about half the error (1 / sqrt(4); a bit
    # less at 8 sentences, where the ratio of sums is far from its large-sample behaviour)
    small = metrics.gleu_paired(srcs * 2, a * 2, b * 2, refs * 2, resamples=400)
    big = metrics.gleu_paired(srcs * 8, a * 8, b * 8, refs * 8, resamples=400)
    assert small["diff"] == pytest.approx(out["diff"]) and big["diff"] == pytest.approx(out["diff"])
    assert 0.3 < big["se"] / small["se"] < 0.6


def test_squad_exact_match_and_f1():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert metrics.token_f1("in Paris", ["Paris, France"]) == pytest.approx(0.5)  # p=r=1/2
    assert metrics.token_f1("w b c d", ["b c"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # p=2/4, r=1
    assert metrics.token_f1("a b c d", ["b c"]) == pytest.approx(0.8)  # "a" is an article: p=2/3
    assert metrics.token_f1("x", ["y", "x"]) == 1.0  # best reference
    s = metrics.short_answer(["Paris", "Rome"], [["paris"], ["Milan"]])
    assert s == {"exact": 0.5, "f1": 0.5}


def test_choice_accuracy_acc_vs_acc_norm():
    # item 1: ll -4 vs -6 -> acc picks 0; per character -4/2=-2 vs -6/6=-1 -> acc_norm picks 1
    # item 2: both pick 0
    out = metrics.choice_accuracy([[-4.0, -6.0], [-1.0, -3.0]], [["ab", "abcdef"], ["x", "y"]], [1, 0])
    assert out == {"acc": 0.5, "acc_norm": 1.0}


def test_bad_lengths():
    with pytest.raises(ValueError):
        metrics.rouge(["a"], [])
    with pytest.raises(ValueError):
        metrics.gleu(["a b"], ["a b"], [["a b"], ["c"]])


def test_says_not_given_and_answerability_split():
    assert metrics.says_not_given("The passage does not say.") and metrics.says_not_given("It doesn't mention that")
    assert metrics.says_not_given("That is not stated in the passage.")
    assert not metrics.says_not_given("No more than 3 tablets.") and not metrics.says_not_given("Say it twice.")
    preds = ["The passage does not say.", "3 tablets", "Take 2 tablets.", "The passage does not say."]
    refs = [["The passage does not say."], ["No more than 3 tablets."], ["The passage does not say."],
            ["Two tablets."]]
    split = metrics.answerability(preds, refs)
    assert split["n_unanswerable"] == 2 and split["n_answerable"] == 2
    assert split["unanswerable_acc"] == 0.5          # the first says so, the third answers anyway
    f1_second = metrics.token_f1("3 tablets", ["No more than 3 tablets."])  # 2 / 3 of the gold tokens
    assert split["f1_answerable"] == pytest.approx((f1_second + 0.0) / 2)  # a refusal scores 0
    assert metrics.answerability(["Paris"], [["Paris"]]) == {}  # nothing unanswerable: nothing to split
