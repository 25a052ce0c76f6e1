"""Retry policy shared by darwin's tasks."""

from __future__ import annotations

from darwin.errors import DarwinError


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes, CUDA OOM, lost workers and interruptions a rerun resumes; a bad genome, mismatched parents or
    a missing bucket fails at once."""
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        return False
    return not isinstance(error, DarwinError) or error.retryable
