"""Where work runs: device choice shared by every phase."""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

from darwin.errors import DarwinError

# Where darwin keeps what outlives a run: fetched models, fitness results, demo parents (DARWIN_CACHE moves it).
CACHE_ROOT = Path(os.environ.get("DARWIN_CACHE", Path.home() / ".cache" / "darwin"))


# What a device may be written as, on the command line and in a run config
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


def pick_device(device: str = "auto") -> str:
    """The device to run on; `auto` is a GPU this thread leases (`lease`), else the CPU."""
    if device == "cpu":  # without importing torch: `darwin merge` on CPU runs without it
        return device
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        slots = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]
        return f"cuda:{lease(slots)}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DarwinError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise DarwinError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)")
    return device


# Where a host's darwin processes lease their GPUs (DARWIN_LEASES moves it; one directory per host, not shared)
LEASES = Path(os.environ.get("DARWIN_LEASES", Path(tempfile.gettempdir()) / "darwin-leases"))
_leased: dict[str, int] = {}  # slot -> the descriptor of its lock, for this process's life
_users: Counter = Counter()  # slot -> live threads of this process on it
_lease_lock = threading.RLock()  # reentrant: a seat's finalizer may run while this thread holds it
_thread = threading.local()


class _Seat:
    """A thread's place on its slot, kept in the thread's locals: they are dropped when the thread ends, and with
    them its count on the slot, so the threads of a later pool share the slots the live threads use least."""

    def __init__(self, slot: str):
        self.slot = slot
        _users[slot] += 1
        weakref.finalize(self, _leave, slot)


def _leave(slot: str) -> None:
    with _lease_lock:
        _users[slot] -= 1


def lease(slots: list[str], poll: float = 0.5) -> int:
    """The index of the slot (a GPU, by its UUID) this thread runs on, the same for the thread's life.

    A slot belongs to one process of the host at a time: an exclusive flock on LEASES/<slot>, which the kernel drops
    when the process dies (a killed worker frees its GPU). A thread takes a slot no process holds; when the process
    already holds every slot it can get, its threads share them (fewest threads first) instead of waiting on
    themselves; a process holding none waits for one to free. So two flow runs on one host never share a GPU, and
    a run's own tasks never deadlock over them.
    """
    seat = getattr(_thread, "seat", None)
    if seat is not None and seat.slot in slots:
        return slots.index(seat.slot)
    LEASES.mkdir(parents=True, exist_ok=True)
    while True:
        with _lease_lock:
            slot = next((s for s in slots if s not in _leased and _try_lock(s)), None)
            if slot is None:
                own = [s for s in slots if s in _leased]
                slot = min(own, key=lambda s: _users[s]) if own else None
            if slot is not None:
                _thread.seat = _Seat(slot)
                return slots.index(slot)
        time.sleep(poll)


def _try_lock(slot: str) -> bool:
    descriptor = os.open(LEASES / slot, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return False
    _leased[slot] = descriptor
    return True


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
