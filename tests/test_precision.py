"""The precision rule (slmkit.precision): SLMKIT_AUTOCAST forces either path on any CPU, and the
forced bf16 path really computes in bf16."""

from __future__ import annotations

import pytest
import torch

from slmkit import precision
from slmkit.errors import UsageError


def test_env_forces_each_path(monkeypatch):
    monkeypatch.setenv("SLMKIT_AUTOCAST", "bf16")
    assert precision.autocast_dtype("cpu") is torch.bfloat16
    assert precision.autocast_dtype("cpu", enabled=False) is None  # --no-bf16 wins
    assert precision.describe(torch.device("cpu")) == "bf16-autocast"
    monkeypatch.setenv("SLMKIT_AUTOCAST", "off")
    assert precision.autocast_dtype("cpu") is None and precision.describe("cpu") == "off"
    monkeypatch.setenv("SLMKIT_AUTOCAST", "auto")
    want = torch.bfloat16 if precision.cpu_has_bf16() else None
    assert precision.autocast_dtype("cpu") is want


def test_forced_bf16_runs_matmuls_in_bf16(monkeypatch):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    monkeypatch.setenv("SLMKIT_AUTOCAST", "bf16")
    with precision.autocast("cpu"):
        assert lin(x).dtype == torch.bfloat16
    monkeypatch.setenv("SLMKIT_AUTOCAST", "off")
    with precision.autocast("cpu"):
        assert lin(x).dtype == torch.float32


def test_bad_setting_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("SLMKIT_AUTOCAST", "fp8")
    with pytest.raises(UsageError, match="SLMKIT_AUTOCAST='fp8'"):
        precision.autocast_dtype("cpu")
