"""`runner: ray`: the evolve flow's Phase 2 on prefect-ray's RayTaskRunner, here a local Ray on CPU."""

import os
import time

import pandas as pd
import pytest
from test_evolve import config_for

from darwin.errors import DarwinError
from flows import evolve, runner


@pytest.fixture
def local_ray(prefect_api, monkeypatch):
    """A local Ray whose workers report to the test's Prefect API: they read PREFECT_API_URL from the environment
    they inherit at ray.init (without it each worker would start its own temporary Prefect server)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")
    pytest.importorskip("prefect_ray", reason="prefect-ray is not installed (pip install '.[ray]')")
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except (RuntimeError, OSError) as exc:  # a sandbox without shared memory or sockets for the raylet
        pytest.skip(f"a local Ray cannot start here: {exc}")
    print(f"ray.init: {time.perf_counter() - started:.1f} s")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_runner_runs_the_evolve_flow(local_ray, pico_family, tmp_path):
    config = config_for(pico_family, phase1__steps=0, phase2__steps=1, phase2__popsize=2, runner={"kind": "ray"})
    started = time.perf_counter()
    summary = evolve.run_evolution(config, tmp_path / "run", cache_dir=str(tmp_path / "cache"))
    print(f"evolve flow on Ray: {time.perf_counter() - started:.1f} s")
    frame = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert len(frame) == 2 and not frame["failed"].any() and frame["fitness"].between(0, 1).all()
    pids = {int(worker.split(":")[1]) for worker in frame["worker"]}
    assert os.getpid() not in pids  # evaluated in Ray worker processes, not in the driver's threads
    assert summary["best"]["fitness"] == frame["fitness"].max()


def test_ray_runner_needs_a_prefect_server(monkeypatch, pico_family):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(DarwinError, match="PREFECT_API_URL"):
        runner.task_runner(config_for(pico_family, runner={"kind": "ray"}))
