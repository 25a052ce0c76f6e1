"""Prefect task around the merge engine: retried on failure, idempotent because OUT is keyed by genome_hash."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from darwin.genome import Genome
from darwin.merge import existing_merge, merge_to_dir
from darwin.parents import Parents
from tasks import tracked
from tasks.policy import retry_unless_user_error


def _run_name() -> str:
    from prefect.runtime import task_run

    return f"merge-{task_run.parameters['genome'].hash[:12]}"


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_jitter_factor=0.3, retry_condition_fn=retry_unless_user_error,
      task_run_name=_run_name)
def merge_child(parents: Parents, genome: Genome, out: str, device: str = "cpu") -> str:
    if existing_merge(out, genome, parents.method):
        return out
    plan = parents.open().plan(genome)
    with tracked(f"merge {genome.hash[:12]}", f"merge-{genome.hash[:12]}", unit="B") as progress:
        return str(merge_to_dir(plan, Path(out), device=device, overwrite=True, progress=progress))
