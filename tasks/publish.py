"""Prefect task of the release's last step: upload with checksums and a manifest written last, retried on
interruption."""

from __future__ import annotations

import json

import fsspec
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from darwin.publish import publish
from tasks import tracked
from tasks.policy import retry_unless_user_error


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_unless_user_error, task_run_name="publish-{dest}", tags=["io"])
def publish_release(source_dir: str, dest: str, card: str | None = None, extra: dict | None = None) -> str:
    logger = get_run_logger()
    with tracked(f"publish to {dest}", "publish", unit="B") as progress:

        def uploaded(rel: str, done: int, total: int) -> None:
            logger.info("uploaded %s (%.1f of %.1f MiB)", rel, done / 2**20, total / 2**20)
            progress(done, total)

        url = publish(source_dir, dest, card=card, extra=extra, on_uploaded=uploaded)
    with fsspec.open(url, "rt") as handle:
        manifest = json.load(handle)
    size = manifest["total_size"] / 2**20
    create_markdown_artifact(key="release", description=f"release at {dest}", markdown=(
        f"### Release\n\n{len(manifest['files'])} files, {size:.1f} MiB, at `{dest}`\n\n"
        f"Manifest (sha256 of every file, written last): [{url}]({url})\n"))
    return url
