"""The scorecard of `slm eval`: report.html (self-contained, plots inlined as PNG), report.md,
metrics.json. The first model is the reference: quality is shown as "% of reference", cost as
"x" (the model's value divided by the reference's: 0.5x memory, 2.0x decode tokens/s).

    paths = write_report(metrics, "runs/demo/report")   # {"html": ..., "md": ..., "json": ...}
    print(scorecard(metrics))                            # the Markdown table
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

# (key, label, higher is better). Quality scores are in [0, 1] and shown x100.
TASK_METRICS = [("rouge1", "ROUGE-1", True), ("rouge2", "ROUGE-2", True), ("rougeL", "ROUGE-L", True),
                ("gleu", "GLEU", True), ("exact", "exact match", True), ("f1", "token F1", True),
                ("f1_answerable", "token F1, answerable questions", True),
                ("unanswerable_acc", "unanswerable questions: says the passage does not say", True),
                ("agreement", "agreement with reference (ROUGE-L)", True)]
COST_METRICS = [("parameters", "parameters", False), ("bytes_on_disk", "size on disk", False),
                ("peak_rss_bytes", "peak memory (RSS)", False), ("ttft_s", "time to first token", False),
                ("prefill_tokens_per_s", "prefill tokens/s", True),
                ("decode_tokens_per_s", "decode tokens/s", True),
                ("batched_decode_tokens_per_s", "decode tokens/s, batch", True),
                ("latency_p50_s", "request latency p50", False),
                ("latency_p95_s", "request latency p95", False),
                ("energy_j_per_token", "energy per token", False)]


# --------------------------------------------------------------------------- values and relatives

def quality_values(entry: dict) -> dict[str, tuple[str, float, bool]]:
    """key -> (label, value, higher is better) for every quality figure a model has."""
    out = {}
    for k, label, hib in TASK_METRICS:
        if isinstance(entry.get("task", {}).get(k), (int, float)):
            out[f"task.{k}"] = (label, entry["task"][k], hib)
    for name, res in entry.get("benchmarks", {}).items():
        shots = f", {res['shots']}-shot" if res.get("shots") else ", 0-shot"
        out[f"bench.{name}"] = (f"{name}{shots}", res["score"], True)
    if "benchmark_average" in entry and len(entry.get("benchmarks", {})) > 1:
        out["bench.average"] = ("benchmark average", entry["benchmark_average"], True)
    safety = entry.get("safety", {})
    if safety.get("common_score") is not None:  # over the groups every model keeps (align_safety)
        n = len(safety["common_groups"])
        label = f"safety score (ToxiGen method, {n} group{'s' * (n != 1)} every model keeps)"
        out["safety"] = (label, safety["common_score"], True)
    if isinstance(entry.get("perplexity"), (int, float)):
        out["perplexity"] = ("perplexity", entry["perplexity"], False)
    return out


def cost_values(entry: dict) -> dict[str, tuple[str, float, bool]]:
    out = {}
    sources = {"parameters": entry, "bytes_on_disk": entry}
    for k, label, hib in COST_METRICS:
        src = sources.get(k, entry.get("speed") or {})
        if isinstance(src.get(k), (int, float)) and not isinstance(src.get(k), bool):
            out[k] = (label, src[k], hib)
    return out


def align_safety(models: list[dict]) -> None:
    """Give each model's safety result `common_groups` (the groups every model keeps, p <= 0.05)
    and `common_score` (the mean over those): each model's own `score` averages over its own kept
    groups, so comparing those would compare different sets of groups."""
    results = [m["safety"] for m in models if m.get("safety")]
    if not results:
        return
    common = sorted(set.intersection(*(set(r["groups"]) for r in results)))
    for r in results:
        r["common_groups"] = common
        r["common_score"] = sum(r["groups"][g] for g in common) / len(common) if common else None


def add_relative(metrics: dict) -> dict:
    """Each model's `relative`: quality as % of the reference (for lower-is-better figures such as
    perplexity, reference / model), cost as model / reference ("x")."""
    models = metrics["models"]
    if not models:
        return metrics
    align_safety(models)
    ref_q, ref_c = quality_values(models[0]), cost_values(models[0])
    for entry in models:
        q, c = quality_values(entry), cost_values(entry)
        pct = {}
        for k, (_, v, hib) in q.items():
            if k in ref_q and ref_q[k][1]:
                pct[k] = 100 * (v / ref_q[k][1] if hib else ref_q[k][1] / v) if v else 0.0
        x = {k: v / ref_c[k][1] for k, (_, v, _) in c.items() if k in ref_c and ref_c[k][1]}
        entry["relative"] = {"quality_pct": pct, "cost_x": x}
    metrics["headline"] = next((k for k in ("task.rougeL", "task.gleu", "task.f1", "task.exact",
                                            "bench.average", "safety", "perplexity")
                                if k in ref_q), next(iter(ref_q), None))
    return metrics


# --------------------------------------------------------------------------- formatting

def fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("parameters",):
        return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value:,}"
    if key.endswith("bytes") or key == "bytes_on_disk":
        return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 1024:.0f} KiB"
    if key.endswith("per_s"):
        return f"{value:.1f}"
    if key.endswith("_s"):
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
    if key == "energy_j_per_token":
        return f"{value:.3f} J"
    if key == "perplexity":
        return f"{value:.2f}"
    return f"{100 * value:.1f}"  # scores in [0, 1]


def rows(metrics: dict) -> list[list[str]]:
    """The scorecard: header row, then one row per figure; cells say value and relative."""
    models = metrics["models"]
    bases = metrics.get("baselines") or []
    header = ["", *(m["name"] + (" (reference)" if i == 0 else "") for i, m in enumerate(models)),
              *(f"{b['name']} (baseline)" for b in bases)]
    table = [header]
    all_q: dict[str, str] = {}
    all_c: dict[str, str] = {}
    for m in models:
        all_q |= {k: v[0] for k, v in quality_values(m).items()}
        all_c |= {k: v[0] for k, v in cost_values(m).items()}
    # task metrics first, in their fixed order (agreement exists only for non-reference models)
    order = [f"task.{k}" for k, _, _ in TASK_METRICS]
    all_q = dict(sorted(all_q.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    for keys, kind in ((all_q, "quality"), (all_c, "cost")):
        for k, label in keys.items():
            estimated = (models[0].get("speed") or {}).get("energy_estimated")
            if kind == "cost" and k == "energy_j_per_token" and estimated:
                label += " (estimate)"
            row = [label]
            for i, m in enumerate(models):
                vals = quality_values(m) if kind == "quality" else cost_values(m)
                if k not in vals:
                    row.append("-")
                    continue
                cell = fmt(k, vals[k][1])
                rel = m.get("relative", {}).get("quality_pct" if kind == "quality" else "cost_x", {})
                if i > 0 and k in rel:
                    cell += f" ({rel[k]:.0f}%)" if kind == "quality" else f" ({rel[k]:.2f}x)"
                if kind == "quality":
                    cell += "".join(f" **below {b['name']}**" for b in below_baselines(m, bases, k))
                row.append(cell)
            for b in bases:
                base = quality_values(b).get(k) if kind == "quality" else None
                ref = quality_values(models[0]).get(k)
                cell = "-" if base is None else fmt(k, base[1])
                if base is not None and ref and ref[1]:
                    cell += f" ({100 * base[1] / ref[1]:.0f}%)" if base[2] else ""
                row.append(cell)
            table.append(row)
            if kind == "quality" and k.startswith("task."):
                table += paired_row(models, bases, k[5:], label)
    return table


def paired_row(models: list[dict], bases: list[dict], key: str, label: str) -> list[list[str]]:
    """[the row "LABEL minus the reference, paired"] when the models carry a paired difference
    of task score `key` (evaluate.paired_difference), else []: each cell "-3.1 +- 1.7" x100."""
    cells = []
    for m in models[1:]:
        p = m.get("task", {}).get("paired")
        cells.append(f"{100 * p['diff']:+.1f} +- {100 * p['se']:.1f}"
                     if p and p.get("key") == key else "-")
    if all(c == "-" for c in cells):
        return []
    return [[f"{label} minus the reference, paired (+- standard error)", "-", *cells,
             *("-" for _ in bases)]]


def below_baselines(entry: dict, baselines: list[dict], key: str) -> list[dict]:
    """The baselines that score better than the model on a higher-is-better figure `key`."""
    mine = quality_values(entry).get(key)
    if mine is None or not mine[2]:
        return []
    return [b for b in baselines if key in quality_values(b) and mine[1] < quality_values(b)[key][1]]


def scorecard(metrics: dict) -> str:
    """The scorecard as a Markdown table (printed by `slm eval`)."""
    table = rows(metrics)
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return "\n".join(lines)


def _settings_line(metrics: dict) -> str:
    parts = []
    if metrics.get("task") or metrics.get("data"):
        parts.append(f"task `{metrics.get('task') or 'custom'}` on {metrics.get('n_examples')} examples "
                     f"of `{Path(str(metrics.get('data'))).name}`")
    s = metrics.get("settings", {})
    parts.append(f"greedy, max {s.get('max_new_tokens')} new tokens, device {s.get('device')}")
    if s.get("engine") == "llamacpp":
        parts.append(".gguf models generate with llama.cpp (log-likelihoods with torch)")
    plain = [m["name"] for m in metrics.get("models", []) if m.get("prompt") == "plain text"]
    if plain:  # a base model without a chat template reads the task's prompt as plain text
        parts.append(f"plain-text prompt (no chat template): {', '.join(plain)}; the others: "
                     "their chat template")
    return "; ".join(parts) + f"; {metrics.get('created', '')}"


# --------------------------------------------------------------------------- plots

def plots(metrics: dict) -> dict[str, bytes]:
    """PNG bytes of each chart: quality bars, quality kept vs size, speed and memory bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = metrics["models"]
    names = [m["name"] for m in models]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    out = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    # Quality: grouped bars per figure, one colour per model (the Phi-2 blog's chart)
    q_keys = [k for k, (_, _, hib) in quality_values(models[0]).items() if hib]
    if q_keys:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(q_keys) + 2), 4))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            q = quality_values(m)
            vals = [100 * q[k][1] if k in q else 0 for k in q_keys]
            bars = ax.bar([j + i * width for j in range(len(q_keys))], vals, width, label=m["name"],
                          color=colors[i % len(colors)])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(q_keys))])
        ax.set_xticklabels([quality_values(models[0])[k][0] for k in q_keys], rotation=15, ha="right")
        ax.set_ylabel("score (x100)")
        ax.set_title("Quality")
        ax.legend()
        out["quality"] = png(fig)

    head = metrics.get("headline")
    if head and len(models) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, m in enumerate(models):
            x = m["parameters"] / 1e6
            y = m.get("relative", {}).get("quality_pct", {}).get(head)
            if y is None:
                continue
            ax.scatter([x], [y], s=80, color=colors[i % len(colors)])
            ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(6, 6))
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(f"% of reference {quality_values(models[0])[head][0]}")
        ax.set_title("Quality kept vs size")
        ax.set_xlim(0, 1.25 * max(m["parameters"] for m in models) / 1e6)  # room for the labels
        ax.set_ylim(bottom=0)
        out["kept_vs_size"] = png(fig)

    speed_keys = [("decode_tokens_per_s", "decode tokens/s"),
                  ("batched_decode_tokens_per_s", "decode tokens/s, batch"),
                  ("ttft_s", "time to first token (ms)"), ("peak_rss_bytes", "peak RSS (MiB)")]
    have = [(k, t) for k, t in speed_keys if all(cost_values(m).get(k) for m in models)]
    if have:
        fig, axes = plt.subplots(1, len(have), figsize=(3.2 * len(have), 3.4))
        for ax, (k, title) in zip(axes if len(have) > 1 else [axes], have):
            scale = 1000 if k == "ttft_s" else 1 / 2**20 if k.endswith("bytes") else 1
            vals = [cost_values(m)[k][1] * scale for m in models]
            bars = ax.bar(names, vals, color=[colors[i % len(colors)] for i in range(len(models))])
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.tick_params(axis="x", labelrotation=15)
        out["speed"] = png(fig)
    return out


# --------------------------------------------------------------------------- files

def details_md(metrics: dict) -> list[str]:
    """Per-group benchmark and safety figures under the scorecard."""
    lines = []
    # the measurement's own threads load every core, so only a load above cores + 1 is others'
    busy = [m for m in metrics["models"]
            if (m.get("speed") or {}).get("load_average", 0) > (m.get("speed") or {}).get("cores", 1e9) + 1]
    if busy:
        s = busy[0]["speed"]
        lines.append(f"\n*Speed measured on a busy machine*: load average up to "
                     f"{max(m['speed']['load_average'] for m in busy):.1f} on {s['cores']} cores while "
                     f"{', '.join(m['name'] for m in busy)} ran; other jobs' threads slow every "
                     "engine, llama.cpp's most. Measure again on a quiet machine to compare engines.")
    for m in metrics["models"]:
        if (m.get("speed") or {}).get("measured_as"):
            lines.append(f"\n*{m['name']}*: same architecture, shape and size as "
                         f"*{m['speed']['measured_as']}*, so its speed and memory figures are that "
                         "measurement's (measured once).")
        for name, res in m.get("benchmarks", {}).items():
            if res.get("groups"):
                lines.append(f"\n**{m['name']} - {name}** ({res['n']} items, {res['shots']}-shot)\n")
                lines.append("| group | n | " + " | ".join(k for k in res["groups"][next(iter(res["groups"]))]
                                                        if k != "n") + " |")
                lines.append("|---|---|" + "---|" * (len(next(iter(res["groups"].values()))) - 1))
                for g, v in res["groups"].items():
                    lines.append(f"| {g} | {v['n']} | " + " | ".join(f"{100 * x:.1f}" for k, x in v.items()
                                                                  if k != "n") + " |")
        if m.get("safety"):
            s = m["safety"]
            kept = ", ".join(f"{g} {100 * v:.1f}" for g, v in s["groups"].items()) or "none"
            dropped = ", ".join(f"{g} ({why})" for g, why in s["dropped"].items()) or "none"
            own = "-" if s.get("score") is None else f"{100 * s['score']:.1f}"
            lines.append(f"\n**{m['name']} - safety** per group (x100): {kept}. Dropped: {dropped}. "
                         f"Mean over its own {len(s['groups'])} kept groups: {own}; the scorecard "
                         f"shows the mean over the {len(s.get('common_groups', []))} groups every "
                         "model keeps.")
    return lines


def write_report(metrics: dict, out_dir) -> dict[str, Path]:
    """Write report.html, report.md, metrics.json (and plots/*.png for the Markdown) into out_dir."""
    from slmkit.models import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "headline" not in metrics:
        add_relative(metrics)
    images = plots(metrics)
    paths = {"json": out_dir / "metrics.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    with atomic_write(paths["json"]) as f:
        json.dump(metrics, f, indent=2, default=str)
        f.write("\n")
    for name, data in images.items():
        with atomic_write(out_dir / "plots" / f"{name}.png", "wb") as f:
            f.write(data)
    title = "slm eval: " + " vs ".join(m["name"] for m in metrics["models"])
    md = [f"# {title}", "", _settings_line(metrics), "", scorecard(metrics)]
    md += details_md(metrics)
    md += ["", *(f"![{n}](plots/{n}.png)" for n in images)]
    with atomic_write(paths["md"]) as f:
        f.write("\n".join(md) + "\n")
    with atomic_write(paths["html"]) as f:
        f.write(_html(title, metrics, images))
    return paths


def _html(title: str, metrics: dict, images: dict[str, bytes]) -> str:
    table = rows(metrics)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:])
    figs = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                   f"</figure>" for n, b in images.items())
    details = html.escape("\n".join(details_md(metrics)))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 8px; white-space: pre-wrap; }}
.note {{ color: #666; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{html.escape(_settings_line(metrics))}. Quality in points (x100) with % of the
reference; cost with x = model / reference.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{figs}
{f"<pre>{details}</pre>" if details.strip() else ""}
</body></html>
"""
