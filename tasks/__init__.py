"""darwin's Prefect tasks: thin wrappers around one core call each, with their retry and cache policy."""

import re


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
