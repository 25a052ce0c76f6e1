"""The whole run: Phase 0 MRI, Phase 1 CMA-ES on a proxy, Phase 2 CMA-ES on real merges scored by lm-eval on
`phase2.split`, the best child merged to disk, Phase 3 health check, the held-out report (father, mother and child
on `heldout.split`, McNemar p-values), and the release.

    darwin evolve CONFIG.yaml [--out RUN] [--resume] [--set phase2.steps=3 ...] [--force-release]

Phase 2 fans out one task per genome (merge in memory + lm-eval), over the local thread pool (one worker per GPU)
or a Ray cluster (`runner: ray`). Every generation is saved; re-running into the same RUN resumes after the last
finished generation with no evaluation repeated, and ends as an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, unmapped

from darwin import evolution, fitness, stats
from darwin.checkpoint import Checkpoint
from darwin.config import RunConfig, load_config, parse_config
from darwin.errors import DarwinError
from darwin.evaluate import TaskSet, check_chat_template, prepared_tasks
from darwin.genome import VERSIONS, Genome
from darwin.parents import Parents
from darwin.report import write_json
from darwin.runtime import pick_device
from darwin.search import Search, heuristic_fitness, prescription_by_gene
from flows.health import health_flow
from flows.mri import profile_flow
from flows.publish import publish_flow
from flows.quantize import release_flow
from flows.runner import candidate_placement, task_runner
from tasks.evolve import (
    evaluate_candidate,
    record_generation,
    report_evolution,
    run_heuristic_phase,
    score_heldout,
    start_progress,
)
from tasks.merge import merge_child
from tasks.policy import on_gpu
from tasks.probe import probe_model, routing_stats


def _gather(futures, genomes: list[Genome]) -> list[fitness.FitnessRecord]:
    """Results in ask order; a genome that failed after its retries scores the worst fitness, and the run goes on,
    unless every genome failed: then nothing the search could learn is left, and the run stops naming the first."""
    records = []
    for future, genome in zip(futures, genomes):
        future.wait()
        if future.state.is_completed():
            records.append(future.result())
            continue
        get_run_logger().warning("genome %s failed after retries (%s): worst fitness", genome.hash[:12],
                                 future.state.message)
        records.append(fitness.FitnessRecord(genome, evolution.WORST_FITNESS, failed=True,
                                             error=future.state.message))
    if all(record.failed for record in records):
        raise DarwinError(f"every genome of the generation failed; the first ({records[0].genome.hash[:12]}): "
                          f"{records[0].error}")
    return records


def run_generations(phase: int, state: evolution.PhaseState, steps: int, config: RunConfig, run_dir: str,
                    examined: Examined, limit: int | None, cache_dir: str | None) -> evolution.PhaseState:
    progress = start_progress(phase, steps, state.search.generation)
    scoring = fitness.Scoring(examined.tasks, limit, config.phase2.batch_size, config.phase2.device, cache_dir)
    while state.search.generation < steps:
        generation = state.search.generation
        genomes = state.search.ask()
        with candidate_placement(config):
            futures = evaluate_candidate.map(genomes, unmapped(examined.parents), unmapped(scoring),
                                             unmapped(examined.inputs))
        records = _gather(futures, genomes)
        for record in records:
            measured = record.measured() if not record.failed else None
            if phase == 1:  # the measured proxy is Phase 1's fitness
                record = replace(record, fitness=measured if measured is not None else evolution.WORST_MARGIN)
            state.rows.append(evolution.history_row(phase, generation, record, {
                "proxy_heuristic": heuristic_fitness(record.genome, examined.prescription),
                "proxy_measured": measured}))
        state.search.tell([row["fitness"] for row in state.rows[-len(records):]])
        record_generation(state, phase, generation, steps, run_dir, progress)
    return state


def proxy_rankings(rows: list[dict]) -> dict[str, float | None]:
    """How well each proxy ranks the Phase 2 candidates against their real fitness (Spearman)."""
    real = [r for r in rows if r["phase"] == 2 and not r["failed"]]
    fitness_values = [r["fitness"] for r in real]
    return {name: stats.spearman([r[name] for r in real], fitness_values) if len(real) > 2 else None
            for name in ("proxy_heuristic", "proxy_measured")}


class Clock:
    """Seconds per step of a run, for summary.json: `with clock("phase1"): ...`."""

    def __init__(self):
        self.started, self.seconds = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        mark = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = round(time.perf_counter() - mark, 2)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.started, 2)}


@dataclass(frozen=True)
class Examined:
    """What Phase 0 leaves the rest of the run."""

    parents: Parents  # checkpoints with their MRI, probe and routing tables
    probed: dict[str, str | None]  # role -> probe tables (the health check reuses them), None where none ran
    prescription: dict[str, float]  # Phase 1's heuristic reads it
    inputs: dict[str, str | None]  # what every fitness depends on besides genome and tasks
    tasks: TaskSet
    heldout_tasks: TaskSet | None


def examine_parents(cfg: RunConfig, layout: evolution.RunLayout) -> Examined:
    """Phase 0: static MRI of both parents (per-shard fan-out); probes where the genome version weighs them
    (whatever the method), MoE routing whenever a parent has experts (dead-expert transplant)."""
    device = cfg.phase2.device
    father = Checkpoint(cfg.father)
    sources = {"father": father.source, "mother": Checkpoint(cfg.mother).source}
    mri = {role: profile_flow(source, str(layout.path("mri", role)), device, role) for role, source in sources.items()}
    signals, probed = {"father": None, "mother": None}, {"father": None, "mother": None}
    for role, source in sources.items():
        out = str(layout.path("probes", role))
        if VERSIONS[cfg.genome].probes:
            with on_gpu(device):
                probe_model(source, out, device=device, label=role)
            probed[role] = out
        with on_gpu(device):
            routed = routing_stats(source, out, device=device, label=role)
        if routed or probed[role]:
            signals[role] = out
    parents = Parents(sources["father"], sources["mother"], cfg.method,
                              Checkpoint(cfg.base).source if cfg.base else None, mri["father"], mri["mother"],
                              signals["father"], signals["mother"])
    kinds = {name: father.kind(name)[0] for name in father.tensors}
    options = cfg.phase2.eval_options()
    return Examined(parents, probed, prescription_by_gene(*parents.profiles(), kinds, cfg.genome),
                    fitness.run_inputs(parents), prepared_tasks(tuple(cfg.phase2.tasks), cfg.phase2.split, options),
                    prepared_tasks(tuple(cfg.phase2.tasks), cfg.heldout.split, options) if cfg.heldout.split
                    else None)


def search_phase1(cfg: RunConfig, run_dir: str, examined: Examined, cache_dir: str | None) -> evolution.PhaseState:
    """Phase 1: CMA-ES on a proxy, the heuristic formula (one task) or measured on each task's first questions."""
    layout = evolution.RunLayout(Path(run_dir))
    phase1 = evolution.PhaseState.load(layout.state(1)) or evolution.PhaseState(
        1, Search(cfg.genome, cfg.blocks, cfg.phase1.popsize, cfg.seed), [])
    if cfg.phase1.proxy == "heuristic":
        return run_heuristic_phase(phase1, cfg.phase1.steps, examined.prescription, run_dir)
    limit = min(fitness.MEASURED_LIMIT, cfg.phase2.limit or fitness.MEASURED_LIMIT)
    return run_generations(1, phase1, cfg.phase1.steps, cfg, run_dir, examined, limit, cache_dir)


def search_phase2(cfg: RunConfig, run_dir: str, examined: Examined, phase1: evolution.PhaseState,
                  cache_dir: str | None) -> evolution.PhaseState:
    """Phase 2: CMA-ES from Phase 1's best genome, its best distinct genomes evaluated first, on real merges and
    lm-eval."""
    layout = evolution.RunLayout(Path(run_dir))
    phase2 = evolution.PhaseState.load(layout.state(2)) or evolution.PhaseState(
        2, phase1.search.follow_on(cfg.phase2.popsize, cfg.phase2.sigma0, evolution.distinct_best(
            phase1.rows, 1, cfg.genome, cfg.blocks, cfg.phase2.popsize // 2)), list(phase1.rows))
    return run_generations(2, phase2, cfg.phase2.steps, cfg, run_dir, examined, cfg.phase2.limit, cache_dir)


def score_heldout_split(cfg: RunConfig, examined: Examined, child: str) -> dict | None:
    """Father, mother and child on the split the search never scored, with McNemar p-values (None: no report)."""
    if examined.heldout_tasks is None:
        return None
    models = {"father": examined.parents.father, "mother": examined.parents.mother, "child": child}
    scoring = fitness.Scoring(examined.heldout_tasks, cfg.heldout.limit, cfg.phase2.batch_size, cfg.phase2.device)
    with on_gpu(cfg.phase2.device):
        futures = score_heldout.map(list(models), list(models.values()), unmapped(scoring))
    return evolution.heldout_report({role: future.result() for role, future in zip(models, futures)},
                                    cfg.heldout.split)


def quantize_child(cfg: RunConfig, layout: evolution.RunLayout, child: str, healthy: bool) -> dict:
    """The release's quantized child (release.scheme), unless the health check failed and nobody forced it."""
    if not cfg.release.scheme:
        return {}
    if not healthy:
        get_run_logger().warning("health check failed: release skipped (--force-release overrides)")
        return {}
    return {"quantized": release_flow(child, cfg.release.scheme, str(layout.path("quantized", cfg.release.scheme)),
                                      cfg.release.calibration_set(), device=cfg.phase2.device)}


@flow(name="darwin-evolve", log_prints=True)
def evolve_flow(config: dict, run_dir: str, force_release: bool = False, cache_dir: str | None = None) -> dict:
    cfg, layout, clock = parse_config(config), evolution.RunLayout(Path(run_dir)), Clock()
    with clock("phase0"):
        examined = examine_parents(cfg, layout)
    with clock("phase1"):
        phase1 = search_phase1(cfg, run_dir, examined, cache_dir)
    with clock("phase2"):
        phase2 = search_phase2(cfg, run_dir, examined, phase1, cache_dir)
    spearman = proxy_rankings(phase2.rows)
    top = report_evolution(phase2.rows, cfg.genome, cfg.blocks, run_dir, spearman)
    best = evolution.best_row(phase2.rows)
    genome = evolution.genome_of(best, cfg.genome, cfg.blocks)
    with clock("best"), on_gpu(cfg.phase2.device):  # the best child, merged to disk once
        best_dir = merge_child(examined.parents, genome, str(layout.path("best")), pick_device(cfg.phase2.device))
    with clock("health"):
        health = health_flow(best_dir, examined.parents.father, examined.parents.mother, str(layout.path("health")),
                             cfg.health.thresholds(), cfg.phase2.device, examined.probed)
    with clock("heldout"):
        heldout = score_heldout_split(cfg, examined, best_dir)
    with clock("quantize"):
        release = quantize_child(cfg, layout, best_dir, health["verdict"] == "pass" or force_release)
    summary = {**evolution.search_summary(phase2.rows, best, genome, top, spearman), "heldout": heldout,
               "health": health["verdict"], "best_dir": best_dir, "release": release, "seconds": clock.total()}
    write_json(layout.path("summary.json"), summary)  # before publishing: the release and its card include it
    if cfg.release.dest and release:
        with clock("publish"):
            release["manifest"] = publish_flow(run_dir, cfg.release.dest)
    summary["seconds"] = clock.total()
    write_json(layout.path("summary.json"), summary)
    return summary


def run_evolution(config: RunConfig, run_dir: Path, resume: bool = False, force_release: bool = False,
                  cache_dir: str | None = None) -> dict:
    evolution.prepare_run(config, run_dir, resume)
    runner = task_runner(config)
    return evolve_flow.with_options(task_runner=runner)(config.model_dump(mode="json"), str(run_dir),
                                                        force_release, cache_dir)


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise DarwinError(f"--set takes KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("--out", metavar="RUN", help="run directory (default runs/<father>x<mother>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue RUN after its last finished generation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set phase2.steps=3 (repeatable)")
    parser.add_argument("--force-release", action="store_true", help="release even if the health check fails")
    parser.add_argument("--fitness-cache", metavar="URL", default=os.environ.get("DARWIN_FITNESS_CACHE"),
                        help="where fitness results are kept: a directory, or an fsspec URL every node of a cluster "
                             "reaches (s3://bucket/prefix); default $DARWIN_FITNESS_CACHE, else DARWIN_CACHE/fitness")


def command(args: argparse.Namespace) -> int:
    config = load_config(args.config, dict(_parse_override(item) for item in args.set))
    for model in (config.father, config.mother, config.base):
        if model:
            Checkpoint(model)  # bad parents fail here, before Prefect starts
    # a task without the split, or a metric it does not compute, fails here
    prepared_tasks(tuple(config.phase2.tasks), config.phase2.split, config.phase2.eval_options())
    if config.heldout.split:
        prepared_tasks(tuple(config.phase2.tasks), config.heldout.split, config.phase2.eval_options())
    if config.phase2.apply_chat_template:
        check_chat_template(Checkpoint(config.father).path)
    config.release.calibration_set()  # an unreadable calibration file or task fails here
    run_dir = Path(args.out) if args.out else evolution.default_run_dir(config)
    summary = run_evolution(config, run_dir, args.resume, args.force_release, args.fitness_cache)
    best = summary["best"]
    print(f"{run_dir}: best fitness {best['fitness']:.4f} genome {best['genome_hash'][:12]}, "
          f"health {summary['health']}")
    return 0 if summary["health"] == "pass" else 3


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["evolve", *sys.argv[1:]]))
