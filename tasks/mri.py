"""Prefect tasks of Phase 0's static MRI: one task per shard, one to write the profile and its artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from darwin import mri
from darwin.checkpoint import Checkpoint
from tasks import artifact_key


@task(retries=2, retry_delay_seconds=[2, 10], task_run_name="mri-{shard}", tags=["io"])
def profile_shard(model_dir: str, shard: str, device: str = "cpu") -> list[dict]:
    return mri.profile_shard(Checkpoint(model_dir), shard, device)


@task(task_run_name="write-mri-{label}")
def write_profile(rows_per_shard: list[list[dict]], out: str, label: str) -> str:
    frame = mri.to_frame([row for rows in rows_per_shard for row in rows])
    path = mri.write_profile(frame, Path(out))
    create_table_artifact(key=artifact_key("mri", label), table=mri.summary_table(frame),
                          description=f"MRI of {label}: {len(frame)} tensors, statistics per kind ({path})")
    create_markdown_artifact(key=artifact_key("mri", label, "heatmap"), markdown=(
        f"### MRI heatmap of {label}\n\nEntropy and std per layer and kind:\n\n"
        f"![mri-{label}]({(Path(out) / 'mri.png').resolve().as_uri()})\n"))
    return str(path)
