"""The Prefect task of the Phase 3 health check over three importance tables: a table and a markdown artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from darwin import health, probes


@task(task_run_name="health-check")
def health_check(child: str, father: str, mother: str, out: str, thresholds: health.Thresholds) -> dict:
    report = health.health_check(*(probes.read_importance(path) for path in (child, father, mother)), thresholds)
    health.write_health(report, out)
    create_table_artifact(key="health", table=report["layers"], description=f"health check: {report['verdict']}")
    create_markdown_artifact(key="health-summary", markdown=health.health_markdown(report))
    return report
