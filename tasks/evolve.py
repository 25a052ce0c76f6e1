"""Prefect tasks of the evolution: one task per genome (merge in memory + lm-eval), one per finished generation, one
per model of the held-out report."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from darwin import evolution, fitness
from darwin.evaluate import EvalResult
from darwin.genome import Genome
from darwin.parents import Parents
from darwin.report import write_atomic
from tasks.policy import retry_unless_user_error


def _candidate_name() -> str:
    from prefect.runtime import task_run

    return f"eval-{task_run.parameters['genome'].hash[:12]}"


@task(retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.3, retry_condition_fn=retry_unless_user_error,
      task_run_name=_candidate_name, cache_policy=NO_CACHE)
def evaluate_candidate(genome: Genome, parents: Parents, scoring: fitness.Scoring,
                       inputs: dict[str, str | None]) -> fitness.FitnessRecord:
    return fitness.evaluate_genome(parents, genome, scoring.tasks, scoring.limit, scoring.batch_size, scoring.device,
                                   fitness.FitnessCache(scoring.cache), inputs)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error,
      task_run_name="score-heldout-{role}", cache_policy=NO_CACHE)
def score_heldout(role: str, model: str, scoring: fitness.Scoring) -> EvalResult:
    return fitness.score_model(model, scoring.tasks, scoring.limit, scoring.batch_size, scoring.device)


@task(task_run_name="phase1-heuristic", cache_policy=NO_CACHE)
def run_heuristic_phase(state: evolution.PhaseState, steps: int, prescription: dict[str, float], run_dir: str
                        ) -> evolution.PhaseState:
    """Phase 1 on the cards' heuristic: thousands of formula evaluations, one task (no merge is involved)."""
    return evolution.heuristic_phase(state, steps, prescription, evolution.RunLayout(Path(run_dir)))


@task(task_run_name="record-phase{phase}-generation{generation}", cache_policy=NO_CACHE)
def record_generation(state: evolution.PhaseState, phase: int, generation: int, steps: int, run_dir: str,
                      progress_id: str | None) -> None:
    """Persist the generation (state first, then history and plot) and move the progress artifact."""
    layout = evolution.RunLayout(Path(run_dir))
    state.save(layout.state(phase))
    evolution.write_history(state.rows, layout.history)
    write_atomic(layout.path("evolution.png"), evolution.evolution_png(state.rows))
    best = evolution.best_row(state.rows, phase)
    get_run_logger().info("phase %d generation %d/%d: best fitness %.4f (%s)", phase, generation + 1, steps,
                          best["fitness"], best["genome_hash"][:12])
    if progress_id:
        update_progress_artifact(progress_id, progress=100.0 * (generation + 1) / max(1, steps))


def start_progress(phase: int, steps: int, done: int) -> str | None:
    return str(create_progress_artifact(progress=100.0 * done / max(1, steps), key=f"evolution-phase{phase}",
                                        description=f"Phase {phase}: generations done out of {steps}"))


@task(task_run_name="report-evolution", cache_policy=NO_CACHE)
def report_evolution(rows: list[dict], version: str, blocks: int, run_dir: str, spearman: dict) -> list[dict]:
    top = evolution.top_genomes(rows, version, blocks)
    create_table_artifact(key="top-genomes", table=top, description="the fittest genomes of the last phase")
    plot = Path(run_dir) / "evolution.png"
    lines = ["### Evolution\n", f"Best and mean fitness per generation:\n\n![evolution]({plot.resolve().as_uri()})\n",
             "Proxy ranking against Phase 2 fitness (Spearman): " +
             ", ".join(f"{name} {value:.3f}" for name, value in spearman.items() if value is not None)]
    create_markdown_artifact(key="evolution", markdown="\n".join(lines))
    return top
