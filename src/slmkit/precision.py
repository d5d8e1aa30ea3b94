"""The precision rule: one for every verb that runs a model (distill and --cache-teacher,
generate and serve through the HF backend, eval's generation, log-likelihoods, perplexity and
safety, speed, prune calibration).

1. Weights are stored in `--dtype` (float32 unless asked otherwise).
2. The forward pass runs under bf16 autocast where the device has native bf16: CUDA, and CPUs
   with AVX-512 BF16 or AMX. Elsewhere autocast is off and the pass runs in the weights' dtype.
   `SLMKIT_AUTOCAST` overrides the device rule: `bf16` forces bf16 autocast on any CPU (slow
   without native support; the tests use it to run the path bf16 machines take by default),
   `off` disables it (bit-for-bit float32 on a bf16 machine), `auto` (the default) is the rule.
   `slm distill --no-bf16` turns it off for one run.
3. Only integer tensors (token ids, masks) enter the autocast region from outside; float data
   read from elsewhere (a teacher cache's float16 log-probs) is cast to float32 outside it,
   because CPU autocast refuses to mix float16 with bf16.
4. Everything that leaves it is float32: logits are cast with `.float()` before any softmax, so
   cached log-probs, losses, perplexities and metrics are computed and stored in float32 (a
   cache stores float16 log-probs, converted from float32 at the end).

Tolerances the tests state: float32 paths agree with a reference to ~1e-5 relative; paths under
bf16 autocast to ~2e-2 (bf16 keeps 8 bits of mantissa, ~3 significant digits, per matmul).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

ENV = "SLMKIT_AUTOCAST"
MODES = ("auto", "bf16", "off")


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mode() -> str:
    """The `SLMKIT_AUTOCAST` setting: auto, bf16 or off."""
    from slmkit.errors import UsageError

    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UsageError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    return value


def autocast_dtype(device, enabled: bool = True):
    """torch.bfloat16 when the forward pass on `device` runs under autocast, else None."""
    import torch

    device = torch.device(device) if not isinstance(device, torch.device) else device
    m = mode()
    if not enabled or m == "off" or device.type not in ("cuda", "cpu"):
        return None
    if m == "bf16" or device.type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast(device, enabled: bool = True):
    """The context a forward pass on `device` runs in (rule 2 above)."""
    import torch

    dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return nullcontext()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.autocast(device.type, dtype=dtype)


def describe(device, enabled: bool = True) -> str:
    """`bf16-autocast` or `off`: what rule 2 picks here (recorded with runs and checkpoints)."""
    return "bf16-autocast" if autocast_dtype(device, enabled) is not None else "off"
