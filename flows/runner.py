"""Where a run's tasks go: the task runner the run config asks for (local threads, or a Ray cluster) and where each
Phase 2 candidate is placed on it."""

from __future__ import annotations

import os

from prefect.task_runners import ThreadPoolTaskRunner

from darwin.config import RunConfig
from darwin.errors import DarwinError
from tasks.policy import on_gpu

PREFECT_CLIENT_ENV = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY")


def default_workers() -> int:
    """One genome per GPU; on CPU a few workers, but never more than half the cores (torch uses the rest)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def task_runner(config: RunConfig):
    if config.runner.kind == "ray":
        if not os.environ.get("PREFECT_API_URL"):
            raise DarwinError("runner: ray needs PREFECT_API_URL pointing at a Prefect server (without one every "
                              "Ray worker starts its own temporary server): run `prefect server start` and export "
                              "PREFECT_API_URL=http://127.0.0.1:4200/api")
        from prefect_ray import RayTaskRunner

        # the workers report to the same Prefect API, authenticated as the driver is
        client = {key: os.environ[key] for key in PREFECT_CLIENT_ENV if os.environ.get(key)}
        return RayTaskRunner(address=config.runner.address, init_kwargs={"runtime_env": {"env_vars": client}})
    return ThreadPoolTaskRunner(max_workers=config.runner.workers or default_workers())


def candidate_placement(config: RunConfig):
    """On Ray each genome claims one GPU (or one CPU on a CPU-only cluster); locally one of the host's GPU slots."""
    if config.runner.kind != "ray":
        return on_gpu(config.phase2.device)
    import ray
    from prefect_ray.context import remote_options

    has_gpu = config.phase2.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    return remote_options(num_gpus=1) if has_gpu else remote_options(num_cpus=1)
