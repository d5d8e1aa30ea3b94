"""results/: the writer every bench uses and the page it regenerates."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest

from slmkit import results

BENCH = Path(__file__).resolve().parents[1] / "bench"
WHEN = datetime.datetime(2026, 12, 6, 2, 30, tzinfo=datetime.timezone.utc)
CPU = {"cpu": "Intel(R) Xeon(R) Processor", "simd": "AVX-512 BF16 + AMX", "cores": 2, "ram_gib": 7.7,
       "gpu": None, "load_1min": 1.5}


def test_write_names_the_file_by_date_commit_machine_and_regenerates_the_page(tmp_path):
    path = results.write("prune", {"rows": [{"name": "width", "ppl": 418.6}]}, summary="width ppl 418.6",
                         argv=["bench/prune.py", "--target", "0.5"], root=tmp_path, when=WHEN,
                         commit_id=("abc1234", False), machine_info=CPU)
    assert path == tmp_path / "prune" / "2026-12-06-abc1234-2c-avx512bf16.json"
    record = json.loads(path.read_text())
    assert record["numbers"]["rows"][0]["ppl"] == 418.6
    assert (record["date"], record["commit"], record["machine"]["cores"]) == ("2026-12-06", "abc1234", 2)
    assert record["command"] == "bench/prune.py --target 0.5"
    page = (tmp_path / "README.md").read_text()
    assert ("- [2026-12-06-abc1234-2c-avx512bf16.json](prune/2026-12-06-abc1234-2c-avx512bf16.json): "
            "2026-12-06, commit abc1234, 2-core Intel(R) Xeon(R) Processor (AVX-512 BF16 + AMX): "
            "width ppl 418.6") in page
    assert not list(tmp_path.rglob(".*"))  # no temporary file left behind


def test_the_page_has_one_line_per_file_newest_first_and_marks_uncommitted_runs(tmp_path):
    gpu = CPU | {"cores": 16, "simd": "AVX2", "gpu": "1 x NVIDIA H100 80GB HBM3"}
    results.write("serve", {"x": 1}, summary="old", root=tmp_path, when=WHEN - datetime.timedelta(days=3),
                  commit_id=("1111111", False), machine_info=CPU)
    results.write("serve", {"x": 2}, summary="new", root=tmp_path, when=WHEN,
                  commit_id=("2222222", True), machine_info=gpu)
    results.write("serve", {"x": 3}, summary="new again", root=tmp_path, when=WHEN,
                  commit_id=("2222222", True), machine_info=gpu)  # same day, commit, machine: replaced
    lines = [ln for ln in (tmp_path / "README.md").read_text().splitlines() if ln.startswith("- [")]
    assert len(lines) == 2 == len(list((tmp_path / "serve").glob("*.json")))
    assert lines[0].startswith("- [2026-12-06-2222222-16c-avx2-h100.json]")
    assert "commit 2222222 (uncommitted changes)" in lines[0] and lines[0].endswith("new again")
    assert ", 1 x NVIDIA H100 80GB HBM3:" in lines[0]
    assert lines[1].endswith(": old")


def test_an_unreadable_file_is_a_line_that_says_so(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "broken.json").write_text("{")
    assert "- [broken.json](x/broken.json): unreadable" in results.page(tmp_path)


def test_machine_describes_this_one():
    m = results.machine()
    assert m["cores"] >= 1 and m["cpu"] and m["simd"]
    assert re.fullmatch(r"\d+c-[a-z0-9_]+(-[a-z0-9]+)?", results.machine_slug(m))


def test_a_bench_name_is_one_safe_word(tmp_path):
    with pytest.raises(ValueError):
        results.write("../x", {}, root=tmp_path, commit_id=("a", False), machine_info=CPU)


def test_scorecard_summary_gives_each_models_headline():
    metrics = {"models": [{"name": "teacher", "task": {"rougeL": 0.313}},
                          {"name": "student", "task": {"rougeL": 0.305}}]}
    assert results.scorecard_summary(metrics) == "teacher ROUGE-L 31.3, student ROUGE-L 30.5"


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_every_bench_writes_its_results_through_the_writer(script):
    """A bench that printed its numbers only would leave the docs nothing to quote."""
    assert re.search(rf"results\.write\(\s*\"{script.stem}\"", script.read_text()), (
        f"{script.name} does not call results.write(\"{script.stem}\", ...)")
