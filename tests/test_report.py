"""The report from a metrics dict: relative figures, the scorecard, self-contained HTML that
headless Chromium renders (skipped when no browser is installed)."""

import json
import shutil
import subprocess

import pytest

from slmkit import report


def _metrics():
    def model(name, params, rouge_l, decode, rss, ppl):
        return {"name": name, "path": f"/m/{name}", "parameters": params, "bytes_on_disk": 4 * params,
                "task": {"rouge1": rouge_l + 0.1, "rouge2": rouge_l - 0.1, "rougeL": rouge_l, "n": 10},
                "benchmarks": {"arc": {"score": 0.5, "acc": 0.5, "acc_norm": 0.6, "n": 4, "shots": 5,
                                       "groups": {"easy": {"acc": 0.5, "acc_norm": 0.6, "n": 4}}}},
                "benchmark_average": 0.5, "perplexity": ppl,
                "safety": {"score": 0.6, "groups": {"bakers": 0.6}, "dropped": {"sailors": "p=0.3"}},
                "speed": {"decode_tokens_per_s": decode, "peak_rss_bytes": rss, "ttft_s": 0.05,
                          "energy_j_per_token": 0.1, "energy_estimated": True}}
    m = {"reference": "teacher", "task": "summarize", "data": "d.jsonl", "n_examples": 10,
         "settings": {"max_new_tokens": 64, "device": "cpu"},
         "models": [model("teacher", 100_000_000, 0.40, 20.0, 800 * 2**20, 10.0),
                    model("student", 50_000_000, 0.30, 50.0, 400 * 2**20, 12.5)]}
    return report.add_relative(m)


def test_relative_values():
    m = _metrics()
    ref, student = m["models"]
    assert ref["relative"]["quality_pct"]["task.rougeL"] == pytest.approx(100)
    assert student["relative"]["quality_pct"]["task.rougeL"] == pytest.approx(75)  # 0.30 / 0.40
    assert student["relative"]["quality_pct"]["perplexity"] == pytest.approx(80)   # lower is better: 10 / 12.5
    assert student["relative"]["cost_x"]["decode_tokens_per_s"] == pytest.approx(2.5)
    assert student["relative"]["cost_x"]["parameters"] == pytest.approx(0.5)
    assert m["headline"] == "task.rougeL"


def test_scorecard_table():
    table = report.scorecard(_metrics())
    lines = table.splitlines()
    assert lines[0] == "|  | teacher (reference) | student |"
    assert "| ROUGE-L | 40.0 | 30.0 (75%) |" in lines
    assert "| decode tokens/s | 20.0 | 50.0 (2.50x) |" in lines
    assert "| parameters | 100.0M | 50.0M (0.50x) |" in lines
    assert any(line.startswith("| energy per token (estimate)") for line in lines)


def test_scorecard_paired_row_follows_its_metric():
    m = _metrics()
    m["models"][1]["task"]["paired"] = {"key": "rougeL", "diff": -0.031, "se": 0.017}
    lines = report.scorecard(m).splitlines()
    row = "| ROUGE-L minus the reference, paired (+- standard error) | - | -3.1 +- 1.7 |"
    assert lines[lines.index("| ROUGE-L | 40.0 | 30.0 (75%) |") + 1] == row
    assert not any("paired" in line for line in report.scorecard(_metrics()).splitlines())


def test_write_report_files(tmp_path):
    paths = report.write_report(_metrics(), tmp_path / "r")
    assert set(paths) == {"html", "md", "json"}
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 3  # quality, kept vs size, speed
    assert "src=\"http" not in html and "<link" not in html  # nothing to fetch: self-contained
    md = paths["md"].read_text()
    assert "| ROUGE-L | 40.0 | 30.0 (75%) |" in md and "sailors (p=0.3)" in md
    assert json.loads(paths["json"].read_text())["models"][1]["name"] == "student"
    assert (tmp_path / "r" / "plots" / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_html_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    paths = report.write_report(_metrics(), tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1600", f"--screenshot={shot}", paths["html"].as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file()
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors and len(colors) > 50  # text, table and plots drawn, not a blank page


def test_safety_compares_the_groups_every_model_keeps():
    # each model's own score averages its own kept groups; % of reference must compare like with
    # like: here the teacher keeps {a, b}, the student {b, c}, so only b is compared
    models = [{"name": "teacher", "safety": {"score": 0.7, "groups": {"a": 0.9, "b": 0.5}, "dropped": {}}},
              {"name": "student", "safety": {"score": 0.5, "groups": {"b": 0.4, "c": 0.6}, "dropped": {}}}]
    m = report.add_relative({"models": models})
    teacher, student = m["models"]
    assert teacher["safety"]["common_groups"] == ["b"] and teacher["safety"]["common_score"] == 0.5
    assert report.quality_values(student)["safety"][1] == 0.4
    assert student["relative"]["quality_pct"]["safety"] == pytest.approx(80)  # 0.4 / 0.5, not 0.5 / 0.7
    assert "1 group every model keeps" in report.quality_values(student)["safety"][0]


def test_speed_on_a_busy_machine_is_flagged():
    """A model timed while the load average exceeded the cores gets a note naming it; a quiet
    measurement gets none."""
    m = _metrics()
    m["models"][0]["speed"] |= {"load_average": 1.2, "cores": 2}
    m["models"][1]["speed"] |= {"load_average": 5.5, "cores": 2}
    note = [line for line in report.details_md(m) if "busy machine" in line]
    assert len(note) == 1 and "5.5 on 2 cores while student ran" in note[0]
    m["models"][1]["speed"]["load_average"] = 2.9  # its own 2 threads and a little more
    assert not [line for line in report.details_md(m) if "busy machine" in line]
