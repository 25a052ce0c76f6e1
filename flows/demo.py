"""The demo: three tiny Qwen3.5 parents with distinct skills, the whole pipeline on them, and the child against both
on held-out questions.

    darwin demo [--out RUN] [--seed 0] [--small] [--rebuild-parents [--parents DIR]]

Offline, on CPU: the parents the package ships (or, with --rebuild-parents, trained here by their recipe and
cached), then the whole `darwin evolve` run on them: Phase 0 MRI, Phase 1 and Phase 2 evolution (fitness = mean
acc_norm of both skills on their dev questions), the best child, health check, the held-out report (father,
mother and child on the test questions, McNemar p-values) and the NVFP4A16 release published to RUN/release.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from darwin import evolution
from darwin.config import parse_config
from darwin.demo import run as demo
from darwin.demo.parents import SHIPPED, build_parents, parents_stamp, shipped_parents
from darwin.demo.skills import write_skill_tasks
from darwin.errors import DarwinError
from darwin.report import write_json
from darwin.runtime import CACHE_ROOT
from flows.evolve import evolve_flow

DEFAULT_CACHE = CACHE_ROOT / "demo"


@task(task_run_name="build-demo-parents", cache_policy=NO_CACHE)
def build_demo_parents(directory: str | None) -> dict[str, Path]:
    """The recipe and seed of the shipped parents, trained afresh into `directory` (default: the cache)."""
    seed = parents_stamp(SHIPPED)["seed"]
    return build_parents(directory or DEFAULT_CACHE / f"seed{seed}", seed=seed)


@flow(name="darwin-demo", log_prints=True)
def demo_flow(out: str, seed: int = 0, small: bool = False, rebuild_parents: bool = False,
              parents_dir: str | None = None) -> dict:
    """`seed` seeds the search; the parents' skills come from the seed their recipe was trained with."""
    started = time.perf_counter()
    run = Path(out)
    parents = build_demo_parents(parents_dir) if rebuild_parents else shipped_parents()
    built = time.perf_counter()
    tasks = write_skill_tasks(run / "tasks", parents_stamp(parents)["seed"])
    config = parse_config(demo.demo_config(parents, tasks, small, seed, release_dest=run / "release"))
    # a second demo into the same RUN resumes its evolution
    evolution.prepare_run(config, run / "evolution", resume=False)
    evolved = evolve_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
        config.model_dump(mode="json"), str(run / "evolution"))
    report = evolved["heldout"]
    genome = evolved["best"]["genome"]
    summary = {"heldout": report, "genome": genome, "genome_hash": evolved["best"]["genome_hash"],
               "dev_fitness": evolved["best"]["fitness"], "proxy_spearman": evolved["proxy_spearman"],
               "health": evolved["health"], "release": evolved["release"],
               "seconds": {"parents": round(built - started, 1), **evolved["seconds"],
                           "total": round(time.perf_counter() - started, 1)}}
    write_json(run / "summary.json", summary)
    text = demo.table(report, genome)
    create_markdown_artifact(key="demo", markdown=f"### darwin demo\n\n```\n{text}\n```\n")
    print(text)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="RUN", help="run directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="the search's seed (CMA-ES); the parents stay")
    parser.add_argument("--small", action="store_true", help="CI-sized budgets and fewer questions, same parents")
    parser.add_argument("--rebuild-parents", action="store_true",
                        help="train the parents here with their recipe (~5 min on 2 cores) instead of the shipped ones")
    parser.add_argument("--parents", metavar="DIR", help=f"with --rebuild-parents: where they are built and cached "
                                                         f"(default {DEFAULT_CACHE}/seed<N>)")


def command(args: argparse.Namespace) -> int:
    if args.parents and not args.rebuild_parents:
        raise DarwinError("--parents DIR goes with --rebuild-parents (the shipped parents need no directory)")
    demo_flow(args.out, args.seed, args.small, args.rebuild_parents, args.parents)
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
