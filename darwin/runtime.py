"""Where work runs: device choice shared by every phase."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from darwin.errors import DarwinError

# Where darwin keeps what outlives a run: fetched models, fitness results, demo parents (DARWIN_CACHE moves it).
CACHE_ROOT = Path(os.environ.get("DARWIN_CACHE", Path.home() / ".cache" / "darwin"))


# What a device may be written as, on the command line and in a run config
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


def pick_device(device: str = "auto") -> str:
    if device == "cpu":  # without importing torch: `darwin merge` on CPU runs without it
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DarwinError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise DarwinError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)")
    return device


def cpu_threads() -> int:
    """How many threads CPU work may use: torch's intra-op count where torch is loaded (callers pin it, e.g. one per
    Phase 2 worker), else what torch would take (OMP_NUM_THREADS, or the CPUs this process may run on)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    return int(os.environ.get("OMP_NUM_THREADS") or allowed or 1)


# transformers 5.23's from_pretrained is not thread-safe: two threads loading at once can leave a tied lm_head on the
# meta device or freshly initialised, which silently ruins every score after it (seen in the demo's held-out
# scoring). Every model load in darwin goes through this lock; loads are short next to what follows them.
MODEL_LOAD_LOCK = threading.Lock()


def load_pretrained(model_cls, source, **kwargs):
    """`model_cls.from_pretrained(source, **kwargs)`, one load at a time in this process."""
    with MODEL_LOAD_LOCK:
        return model_cls.from_pretrained(source, **kwargs)
