"""Retry policy shared by darwin's tasks."""

from __future__ import annotations

from darwin.errors import DarwinError


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes, CUDA OOM and lost workers; a bad genome or mismatched parents fails at once."""
    try:
        state.result()
    except DarwinError:
        return False
    except Exception:
        return True
    return False
