"""Where work runs: device choice shared by every phase."""

from __future__ import annotations

import torch

from darwin.errors import DarwinError


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DarwinError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise DarwinError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)")
    return device
