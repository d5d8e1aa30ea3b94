"""FSDP2 for `slm distill --fsdp`: the student's parameters, gradients and AdamW state are sharded
over the processes of `accelerate launch` / torchrun, each decoder layer its own unit and the rest
(embeddings, final norm, output projection) the root unit. Only the student is sharded: every
process holds the frozen teacher whole (a teacher too big for that belongs in --teacher-cache).

Checkpoints stay safetensors + JSON (slmkit.checkpoint), one file per process for the sharded
parts (`model-{rank}.safetensors`, `optimizer-{rank}.*`), so they resume with the same number of
processes; the finished student is gathered and saved whole, as without FSDP.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from slmkit.errors import UsageError


def shard(model):
    """Apply FSDP2 to an HF causal LM in place (needs an initialised process group)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("--fsdp shards the student over the processes of `accelerate launch` or "
                         "torchrun; start slm distill with one of them")
    for layer in model.model.layers:  # every architecture slmkit supports keeps them there
        fully_shard(layer)
    fully_shard(model)
    return model


@contextmanager
def no_sync(model, skip: bool):
    """Accumulate gradients without reduce-scattering them (all micro-batches but the last)."""
    model.set_requires_gradient_sync(not skip)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the sharded gradients by their global norm; returns that norm (all processes agree)."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save_model_shard(model, folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    save_file({n: p.detach().to_local().contiguous() for n, p in model.named_parameters()},
              str(folder / f"model-{rank}.safetensors"))


def load_model_shard(model, folder: Path, rank: int) -> None:
    import torch
    from safetensors.torch import load_file

    shards = load_file(str(folder / f"model-{rank}.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(shards[name])


def full_state_dict(model) -> dict:
    """The whole student's state dict on the main process (empty elsewhere); every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model, state: dict):
    """A plain (unsharded) model of `model`'s class and config holding `state`, to save."""
    import copy

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain
