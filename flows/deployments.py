"""Deployable entry points: flows whose parameters are plain strings, so a schedule or the UI can start them.

`evolve_from_file` is what `deployments/prefect.yaml` schedules: it reads a run config file with darwin.config (the
same validation as `darwin evolve CONFIG.yaml`) and runs the evolve flow as its subflow, so the UI shows one parent
run per scheduled evolution with the whole DAG under it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from darwin import evolution
from darwin.config import load_config
from flows.evolve import run_evolution


@flow(name="darwin-evolve-from-file", log_prints=True)
def evolve_from_file(config_path: str, run_dir: str | None = None, runs_root: str = "runs",
                     cache_dir: str | None = None, force_release: bool = False) -> dict:
    """Evolve the config at CONFIG_PATH into RUN_DIR (default RUNS_ROOT/<father>x<mother>-<time>); re-running into
    an existing RUN_DIR resumes it. CACHE_DIR, shared between runs, keeps a genome from being evaluated twice."""
    config = load_config(config_path)
    run = Path(run_dir) if run_dir else evolution.default_run_dir(config, runs_root)
    summary = run_evolution(config, run, force_release=force_release, cache_dir=cache_dir)
    return {"run_dir": str(run), **summary}
