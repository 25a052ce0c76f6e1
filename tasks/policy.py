"""Retry and GPU-slot policy shared by darwin's tasks."""

from __future__ import annotations

import socket
from contextlib import nullcontext

from darwin.errors import DarwinError


def gpu_tag() -> str:
    """This host's GPU slots: the tag concurrency limit `gpu:<host>` (infra/limits.sh sets it to the host's GPUs),
    as in Prefect's per-worker limits; within the host, darwin.runtime.lease gives each task its own GPU."""
    return f"gpu:{socket.gethostname()}"


def on_gpu(device: str):
    """Where flows call tasks that may use a GPU: each takes one of this host's slots, unless it runs on the CPU."""
    from prefect import tags

    return nullcontext() if device == "cpu" else tags(gpu_tag())


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes, CUDA OOM, lost workers and interruptions a rerun resumes; a bad genome, mismatched parents or
    a missing bucket fails at once."""
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        return False
    return not isinstance(error, DarwinError) or error.retryable
