"""Training checkpoints as safetensors and JSON only: nothing in a checkpoint folder is ever
unpickled, so resuming from a folder someone else made cannot run their code.

A checkpoint folder holds:
  model.safetensors        the student's weights (tied tensors stored once)
  optimizer.safetensors    the optimizer's state tensors, keyed `{param index}.{name}`
  optimizer.json           its param groups and any non-tensor state values
  (under --fsdp: model-{rank}.safetensors and optimizer-{rank}.*, each process's shards)
  scheduler.json           the LR scheduler's state_dict
  rng-{rank}.safetensors   torch's CPU (and CUDA) generator states of process `rank`
  rng-{rank}.json          Python's and NumPy's generator states of process `rank`
  trainer_state.json       step, tokens, elapsed, fingerprint; written last, after everything
                           else is on disk, so a folder that has it is complete
Folders are written beside the live one as `.checkpoint.tmp`, fsynced, then swapped in; a
crash between the two renames of the swap leaves a complete folder that `recover` falls back to.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

LIVE, TMP, OLD = "checkpoint", ".checkpoint.tmp", ".checkpoint.old-"  # OLD: models.replace_dir's aside name
STATE = "trainer_state.json"


def recover(work: Path) -> Path | None:
    """The live checkpoint folder under `work` (OUT.work), or None. When a crash interrupted a
    save (a complete `.checkpoint.tmp` or `.checkpoint.old-*` folder and no live one, or a newer
    complete temporary one), the newest complete folder becomes the live one first."""
    complete = [c for c in (work / LIVE, work / TMP, *work.glob(OLD + "*")) if (c / STATE).is_file()]
    if not complete:
        return None
    best = max(complete, key=lambda c: (read_state(c)["step"], c.name == LIVE))
    if best.name != LIVE:
        if (work / LIVE).exists():
            shutil.rmtree(work / LIVE)
        os.replace(best, work / LIVE)
    return work / LIVE


FIX = "delete that checkpoint folder (the run then starts over) or restore it"


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file; a damaged one is a one-line error naming it."""
    from slmkit.models import read_json as read

    return read(path, fix=FIX)


def read_state(folder: Path) -> dict:
    return read_json(folder / STATE)


# --------------------------------------------------------------------------- pieces

def save_optimizer(optimizer, folder: Path, name: str = "optimizer") -> None:
    """The optimizer's state as NAME.safetensors + NAME.json. Sharded (FSDP) state is saved as
    this process's shards (give each process its own NAME), and their keys listed."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, other, sharded = {}, {}, []
    for index, state in sd["state"].items():
        for key, value in state.items():
            if hasattr(value, "to_local"):  # a DTensor shard
                sharded.append(f"{index}.{key}")
                value = value.to_local()
            if hasattr(value, "detach"):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                other[f"{index}.{key}"] = value
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"param_groups": sd["param_groups"],
                                                     "values": other, "sharded": sharded}))


def load_optimizer(optimizer, folder: Path, name: str = "optimizer") -> None:
    from safetensors.torch import load_file

    meta = read_json(folder / f"{name}.json")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = set(meta.get("sharded", ()))
    state: dict[int, dict] = {}
    for key, value in [*load_file(str(folder / f"{name}.safetensors")).items(),
                       *meta["values"].items()]:
        index, item = key.split(".", 1)
        if key in sharded:  # back into a shard laid out like its parameter
            from torch.distributed.tensor import DTensor

            p = params[int(index)]
            value = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, run_check=False)
        state.setdefault(int(index), {})[item] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(folder: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    (folder / f"rng-{rank}.json").write_text(json.dumps({
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached]}))


def load_rng(folder: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    states = read_json(folder / f"rng-{rank}.json")
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, then the folder itself, so a rename after it is durable."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
