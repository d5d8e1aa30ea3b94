"""How much of a student's answer the text path pairs with a teacher prediction, and how the
teacher's vocabulary maps onto the student's (slmkit.align), for two real tokenizers on real
text. Tokenizers only: no model runs, seconds on any machine.

    python bench/alignment_coverage.py STUDENT_FOLDER TEACHER_FOLDER DATA.jsonl [--task grammar]

Prints: the share of the student's answer predictions (answer tokens + EOS) that have a
teacher prediction after the same text; the teacher's vocabulary mapped exactly / by the
longest student prefix / not at all; the time to build the map.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import align, models  # noqa: E402
from slmkit.data import Example, encode, read_jsonl, to_example  # noqa: E402
from slmkit.tasks import get_task  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student")
    ap.add_argument("teacher")
    ap.add_argument("data")
    ap.add_argument("--task", default=None)
    ap.add_argument("--limit", type=int, default=300)
    args = ap.parse_args()
    s_tok, t_tok = (models.load_tokenizer(models.resolve(m)) for m in (args.student, args.teacher))
    t0 = time.perf_counter()
    s_vocab, t_vocab = align.token_bytes(s_tok), align.token_bytes(t_tok)
    vmap = align.VocabMap(s_tok, s_vocab)
    table = vmap.table(t_vocab, [t_tok.eos_token_id])
    seconds = time.perf_counter() - t0
    exact = sum(1 for b, j in zip(t_vocab, table) if j >= 0 and s_vocab[j] == b)
    mapped = sum(j >= 0 for j in table)
    print(f"vocabularies: student {len(s_vocab)}, teacher {len(t_vocab)}; teacher tokens mapped "
          f"exactly {100 * exact / len(t_vocab):.1f} %, by prefix {100 * (mapped - exact) / len(t_vocab):.1f} %, "
          f"none {100 * (len(t_vocab) - mapped) / len(t_vocab):.1f} % ({seconds:.1f} s)")
    task = get_task(args.task) if args.task else None
    paired = total = 0
    for n, row in read_jsonl(args.data)[:args.limit]:
        if task is None and "references" in row:  # JFLEG: the first correction is the answer
            ex = Example(prompt=row["input"], answer=row["references"][0], where=f"{args.data}:{n}")
        else:
            ex = to_example(row, f"{args.data}:{n}", task, need_answer=True)
        (si, sm), (ti, tm) = encode(ex, s_tok), encode(ex, t_tok)
        got = align.prediction_pairs(align.position_spans(ex, s_tok, si, sm, s_vocab),
                                     align.position_spans(ex, t_tok, ti, tm, t_vocab))
        paired += sum(p >= 0 for p in got)
        total += len(got)
    print(f"student answer predictions paired with a teacher prediction: {100 * paired / total:.1f} % "
          f"of {total}")
    from slmkit import results

    results.write("alignment_coverage", {
        "student": args.student, "teacher": args.teacher, "data": Path(args.data).name,
        "student_vocab": len(s_vocab), "teacher_vocab": len(t_vocab),
        "mapped_exactly": exact / len(t_vocab), "mapped_by_prefix": (mapped - exact) / len(t_vocab),
        "unmapped": (len(t_vocab) - mapped) / len(t_vocab), "map_seconds": round(seconds, 2),
        "predictions": total, "paired": paired / total},
        summary=f"{Path(args.data).name}: {100 * paired / total:.1f} % of {total} answer predictions "
                f"paired; teacher tokens {100 * exact / len(t_vocab):.1f} % exact, "
                f"{100 * (mapped - exact) / len(t_vocab):.1f} % by prefix",
        tag=f"{Path(args.student).name}-{Path(args.teacher).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
