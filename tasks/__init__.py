"""darwin's Prefect tasks: thin wrappers around one core call each, with their retry and cache policy."""

import re


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def tracked(description: str, key: str, unit: str = "it"):
    """A darwin.progress.Tracker for a step inside a flow: the terminal bar, and a Prefect progress artifact `key`
    (made at the first report, moved every 5%) that the UI shows beside the run."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from darwin.progress import Tracker

    artifact = []

    def on_percent(percent: float) -> None:
        if not artifact:
            artifact.append(create_progress_artifact(progress=percent, key=artifact_key(key), description=description))
        else:
            update_progress_artifact(artifact[0], progress=percent)

    return Tracker(description, unit, on_percent)
