"""The demo: build three tiny Qwen3.5 parents with distinct skills, run the whole pipeline on them, and show the
child beats both on held-out questions.

    darwin demo [--out RUN] [--seed 0] [--small]

Offline, on CPU: parents (built once, then cached), Phase 0 MRI, Phase 1 and Phase 2 evolution (fitness = mean
acc_norm of both skills on their dev split), the best child, health check, NVFP4A16 release published to RUN/release,
then father, mother and child scored on the held-out test split with McNemar p-values.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from darwin.config import parse_config
from darwin.demo import run as demo
from darwin.demo.parents import build_parents
from darwin.demo.skills import write_skill_tasks
from darwin.evaluate import EvalResult, evaluate
from darwin.report import write_json
from darwin.runtime import CACHE_ROOT, load_pretrained
from flows.evolve import evolve_flow, prepare_run

DEFAULT_CACHE = CACHE_ROOT / "demo"


@task(task_run_name="build-demo-parents", cache_policy=NO_CACHE)
def build_demo_parents(directory: str, seed: int) -> dict[str, Path]:
    return build_parents(directory, seed=seed)


@task(task_run_name="score-held-out-{role}", cache_policy=NO_CACHE, retries=1)
def score_held_out(role: str, model_dir: str, tasks: list[str], limit: int | None) -> EvalResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_pretrained(AutoModelForCausalLM, model_dir).eval()
    return evaluate(model, AutoTokenizer.from_pretrained(model_dir), tasks, limit=limit, batch_size=64)


@flow(name="darwin-demo", log_prints=True)
def demo_flow(out: str, seed: int = 0, small: bool = False, parents_dir: str | None = None) -> dict:
    started = time.perf_counter()
    run = Path(out)
    parents = build_demo_parents(parents_dir or str(DEFAULT_CACHE / f"seed{seed}"), seed)
    built = time.perf_counter()
    tasks = write_skill_tasks(run / "tasks", seed)
    limit = demo.BUDGETS["small" if small else "full"]["questions"]
    config = parse_config(demo.demo_config(parents, tasks, small, seed, release_dest=run / "release"))
    prepare_run(config, run / "evolution", resume=False)  # a second demo into the same RUN resumes its evolution
    evolved = evolve_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
        config.model_dump(mode="json"), str(run / "evolution"))
    evolved_at = time.perf_counter()
    test_tasks = [str(paths["test_yaml"]) for paths in tasks.values()]
    models = {"father": parents["father"], "mother": parents["mother"], "child": evolved["best_dir"]}
    futures = {role: score_held_out.submit(role, str(path), test_tasks, limit) for role, path in models.items()}
    report = demo.held_out_report({role: future.result() for role, future in futures.items()})
    genome = evolved["best"]["genome"]
    summary = {**report, "genome": genome, "genome_hash": evolved["best"]["genome_hash"],
               "dev_fitness": evolved["best"]["fitness"], "health": evolved["health"],
               "release": evolved["release"],
               "seconds": {"parents": round(built - started, 1), **evolved["seconds"],
                           "held_out": round(time.perf_counter() - evolved_at, 1),
                           "total": round(time.perf_counter() - started, 1)}}
    write_json(run / "summary.json", summary)
    text = demo.table(report, genome)
    create_markdown_artifact(key="demo", markdown=f"### darwin demo\n\n```\n{text}\n```\n")
    print(text)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="RUN", help="run directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="CI-sized budgets and fewer questions, same parents")
    parser.add_argument("--parents", metavar="DIR", help=f"where the parents are built and cached "
                                                         f"(default {DEFAULT_CACHE}/seed<N>)")


def command(args: argparse.Namespace) -> int:
    demo_flow(args.out, args.seed, args.small, args.parents)
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
