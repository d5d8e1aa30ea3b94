"""Benchmark results: one JSON file per run, `results/<bench>/<date>-<commit>-<machine>.json`,
and a generated page, `results/README.md`, with one line per file. Every script in bench/ writes
through `write(...)`, so a number quoted in the docs names the file it came from: the date, the
commit it ran at, and the machine it ran on.

    from slmkit import results
    results.write("prune", {"rows": rows}, summary="width+importance ppl 418.6 vs random 131,681")

    python -m slmkit.results          # regenerate results/README.md from the files

A rerun of the same bench on the same day, commit and machine replaces its file (the newest run
of one code on one machine is the one worth quoting); another day, commit or machine adds one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

PAGE = "README.md"


def default_root() -> Path:
    """results/ of the source checkout this module is in, else of the current folder."""
    repo = Path(__file__).resolve().parents[2]
    return repo / "results" if (repo / "pyproject.toml").is_file() else Path.cwd() / "results"


def commit(repo: Path | None = None) -> tuple[str, bool]:
    """(short commit id, whether tracked files differ from it); ("unknown", False) outside git."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return sha, dirty


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return (model[1].strip() if model else platform.machine()), set(flags[1].split() if flags else ())


def _ram_gib() -> float | None:
    try:
        kib = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)[1])
    except (OSError, TypeError):
        return None
    return round(kib / 2**20, 1)


def _gpu() -> str | None:
    """The first CUDA device's name, asked only of a torch the bench already imported (importing
    torch here would cost seconds and a CUDA init on machines that have no use for it)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # a broken driver is not this file's business
        return None
    return None


def machine() -> dict:
    """What the numbers depend on: CPU model, its vector extension, cores, RAM, GPU if any."""
    cpu, flags = _cpuinfo()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        simd = "AVX-512 BF16" + (" + AMX" if "amx_bf16" in flags else "")
    elif "avx512f" in flags:
        simd = "AVX-512"
    elif "avx2" in flags:
        simd = "AVX2"
    else:
        simd = platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "simd": simd, "cores": cores, "ram_gib": _ram_gib(), "gpu": _gpu(),
            "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def machine_slug(m: dict) -> str:
    """A file-name word for a machine: `2c-avx512bf16`, `16c-avx2-h100`."""
    simd = m["simd"].split(" + ")[0].lower().replace("-", "").replace(" ", "")
    gpu = m.get("gpu")
    gpu_word = ""
    if gpu:
        name = gpu.split(" x ", 1)[-1]
        found = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name)
        gpu_word = "-" + re.sub(r"[^a-z0-9]+", "", (found[1] if found else name).lower())[:16]
    return f"{m['cores']}c-{simd}{gpu_word}"


def write(bench: str, numbers: dict, summary: str = "", argv: list[str] | None = None,
          root: Path | None = None, when: datetime.datetime | None = None,
          commit_id: tuple[str, bool] | None = None, machine_info: dict | None = None,
          tag: str | None = None) -> Path:
    """Write results/<bench>/<date>-<commit>-<machine>.json (atomically) and regenerate the page.

    numbers: what the bench measured (JSON-serialisable). summary: one line for the page, the
    headline a reader would quote. argv: the command line (default: this process's).
    when, commit_id, machine_info: the run's date, (commit, dirty) and machine, measured here
    unless given (a converted older result states its own)."""
    from slmkit.models import atomic_write

    if not re.fullmatch(r"[a-z0-9_]+", bench):
        raise ValueError(f"bench name {bench!r}: lower-case letters, digits and _ only")
    root = root or default_root()
    when = when or datetime.datetime.now(datetime.timezone.utc)
    sha, dirty = commit_id or commit()
    m = machine_info or machine()
    record = {"bench": bench, "date": when.strftime("%Y-%m-%d"), "time_utc": when.strftime("%H:%M"),
              "commit": sha, "dirty": dirty, "machine": m,
              "command": " ".join(argv if argv is not None else [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "summary": summary, "numbers": numbers}
    # tag: one run among several of the same bench at one commit (e.g. per student model)
    suffix = "-" + re.sub(r"[^a-z0-9.]+", "-", tag.lower()).strip("-") if tag else ""
    path = root / bench / f"{record['date']}-{sha}-{machine_slug(m)}{suffix}.json"
    with atomic_write(path) as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    write_page(root)
    print(f"results: {path}", file=sys.stderr)
    return path


def command_line(args: list, cwd: Path, scratch: Path | None = None) -> str:
    """`slm ARGS` as a result file records it: paths relative to `cwd`, `scratch` written $WORK
    (the machine's own paths are its business)."""
    command = "slm " + " ".join(str(a) for a in args)
    if scratch:
        command = command.replace(str(scratch), "$WORK")
    return command.replace(f"{Path(cwd).resolve()}/", "")


def run_slm(args: list, cwd: Path, scratch: Path | None = None) -> dict:
    """Run `slm ARGS` in a fresh process, as a bench measures a verb: wall seconds, its own peak
    RSS (GiB, from wait4: that process's, not the largest of all children so far), exit code and,
    when it failed, its last line of stderr. The command is recorded with `scratch` (a bench's
    temporary folder) written $WORK: its real path is this machine's business."""
    import os
    import subprocess
    import tempfile
    import time

    args = [str(a) for a in args]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "slmkit", *args], stdout=subprocess.DEVNULL,
                             stderr=err, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        last = (err.read().strip().splitlines() or ["?"])[-1]
    row = {"command": command_line(args, cwd, scratch),
           "seconds": round(time.monotonic() - start, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "exit": code}
    if code != 0:
        row["error"] = last[:300]
    print(f"{row['seconds']:>8.1f} s {row['peak_rss_gib']:>6.2f} GiB exit {row['exit']}  {row['command']}",
          flush=True)
    return row


def scorecard_summary(metrics: dict) -> str:
    """One line from an `slm eval` metrics.json: each model's headline figure
    ("teacher ROUGE-L 31.3, student ROUGE-L 30.5")."""
    from slmkit.report import add_relative, fmt, quality_values

    if "headline" not in metrics:
        add_relative(metrics)
    key, parts = metrics.get("headline"), []
    for entry in metrics.get("models", []):
        q = quality_values(entry)
        if key in q:
            label, value, _ = q[key]
            parts.append(f"{entry['name']} {label} {fmt(key.split('.')[-1], value)}")
    return ", ".join(parts)


def page(root: Path) -> str:
    """results/README.md: one line per result file, newest first within each bench."""
    lines = ["# Results", "",
             "Generated by `python -m slmkit.results` from the files beside it; do not edit.",
             "Each line: the file, its date, commit and machine, and the bench's one-line summary.",
             "The docs quote numbers from these files and name the file.", ""]
    for bench_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(bench_dir.glob("*.json"), reverse=True)
        if not files:
            continue
        lines.append(f"## {bench_dir.name}")
        lines.append("")
        for f in files:
            try:
                r = json.loads(f.read_text())
                m = r["machine"]
                where = f"{m['cores']}-core {m['cpu']} ({m['simd']})" + (f", {m['gpu']}" if m.get("gpu") else "")
                dirty = " (uncommitted changes)" if r.get("dirty") else ""
                lines.append(f"- [{f.name}]({bench_dir.name}/{f.name}): {r['date']}, commit "
                             f"{r['commit']}{dirty}, {where}: {r.get('summary') or '(no summary)'}")
            except (ValueError, KeyError, TypeError) as e:
                lines.append(f"- [{f.name}]({bench_dir.name}/{f.name}): unreadable ({e})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_page(root: Path | None = None) -> Path:
    from slmkit.models import atomic_write

    root = root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    with atomic_write(root / PAGE) as f:
        f.write(page(root))
    return root / PAGE


if __name__ == "__main__":
    print(write_page())
