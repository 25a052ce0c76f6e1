"""The records of an evolution run: its directory layout, history table, saved search state and plot.

RUN/
  config.yaml          the validated config the run was started with
  mri/{father,mother}  Phase 0 static MRI;  probes/{father,mother,child}  probe importance (v6, health)
  state/phase{1,2}.pkl the CMA-ES search and history after the last finished generation (resume point)
  history.parquet      one row per evaluated genome;  evolution.png  best and mean fitness per generation
  best/                the best child (merged to disk once) with merge_report.json
  health/ quantized/   Phase 3 and release outputs;  summary.json  the result, with the held-out report
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from darwin.errors import DarwinError
from darwin.evaluate import EvalResult
from darwin.fitness import FitnessRecord
from darwin.genome import Genome, gene_names
from darwin.report import png, write_atomic, write_parquet
from darwin.search import Search, heuristic_fitness
from darwin.stats import mcnemar

if TYPE_CHECKING:
    from darwin.config import RunConfig

WORST_FITNESS = 0.0  # a genome whose merge or evaluation still fails after retries scores as the worst possible
WORST_MARGIN = -1e3  # the same on Phase 1's measured proxy, a margin in log-likelihood per character
DISTINCT_SPACING = 0.05  # how far apart (on some gene) the Phase 1 genomes handed to Phase 2 are


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def state(self, phase: int) -> Path:
        return self.root / "state" / f"phase{phase}.pkl"

    @property
    def history(self) -> Path:
        return self.root / "history.parquet"


def default_run_dir(config: RunConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{Path(config.father).name}x{Path(config.mother).name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run(config: RunConfig, run_dir: Path, resume: bool) -> None:
    """A new RUN gets the config; an existing one must have been started with the very same config."""
    saved = run_dir / "config.yaml"
    wanted = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)
    if saved.exists():
        if saved.read_text() != wanted:
            raise DarwinError(f"{run_dir} was started with a different config; use another --out or the same config")
        return
    if resume:
        raise DarwinError(f"nothing to resume: {run_dir} has no config.yaml")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(wanted)


@dataclass
class PhaseState:
    """What a resumed run needs: the search after its last tell, and every history row so far."""

    phase: int
    search: Search
    rows: list[dict]

    def save(self, path: Path) -> None:
        write_atomic(path, pickle.dumps(self))

    @staticmethod
    def load(path: Path) -> PhaseState | None:
        return pickle.loads(path.read_bytes()) if path.exists() else None


def history_row(phase: int, generation: int, record: FitnessRecord, proxies: dict[str, float]) -> dict:
    """A record as one row of history.parquet; `proxies`: the cheap scores of the genome (`proxy_heuristic`,
    `proxy_measured`) beside its fitness."""
    row = {"phase": phase, "generation": generation, "genome_hash": record.genome.hash, **record.genome.genes,
           "fitness": record.fitness, **proxies, "seconds": record.seconds, "merge_seconds": record.merge_seconds,
           "eval_seconds": record.eval_seconds, "worker": record.worker, "cached": record.cached,
           "failed": record.failed}
    row.update({f"score:{task}": value for task, value in record.scores.items()})
    return row


def heldout_report(results: dict[str, EvalResult], split: str) -> dict:
    """summary.json's `heldout` section (docs/method.md "Fitness and search"): father's, mother's and child's scores per
    task and fitness on `split`, and the child's exact McNemar p-value against each parent over every question of
    every task."""
    def flat(result: EvalResult) -> list[bool]:
        return [answer for task in sorted(result.per_question) for answer in result.per_question[task]]

    child = flat(results["child"])
    return {
        "split": split,
        "questions": len(child),
        "scores": {role: dict(result.scores) for role, result in results.items()},
        "metrics": dict(results["child"].metrics),  # what each task's score is
        "fitness": {role: result.fitness for role, result in results.items()},
        "p_values": {parent: mcnemar(child, flat(results[parent])) for parent in ("father", "mother")},
    }


def write_history(rows: list[dict], path: Path) -> None:
    write_parquet(pd.DataFrame(rows), path)


def search_summary(rows: list[dict], best: dict, genome: Genome, top: list, spearman: dict) -> dict:
    """summary.json's account of the search: the best genome with its fitness and scores, the top genomes, how well
    each proxy ranked Phase 2, and how many genomes each phase evaluated (Phase 2's from the cache too)."""
    return {
        "best": {"genome": dict(genome.genes), "genome_hash": genome.hash, "fitness": best["fitness"],
                 "scores": {k.removeprefix("score:"): v for k, v in best.items() if k.startswith("score:")}},
        "top_genomes": top, "proxy_spearman": spearman,
        "evaluations": {"phase1": sum(r["phase"] == 1 for r in rows), "phase2": sum(r["phase"] == 2 for r in rows),
                        "cached": sum(bool(r["cached"]) for r in rows if r["phase"] == 2)},
    }


def best_row(rows: list[dict], phase: int | None = None) -> dict:
    """The fittest genome of a phase (of the last phase that evaluated any when None); ties go to the first."""
    if phase is None:
        phase = max(row["phase"] for row in rows)
    candidates = [row for row in rows if row["phase"] == phase and not row["failed"]]
    return max(candidates, key=lambda row: row["fitness"])


def genome_of(row: dict, version: str, blocks: int) -> Genome:
    """The genome of a history row (the row holds its genes as columns)."""
    return Genome.from_dict({name: row[name] for name in gene_names(version, blocks)})


def distinct_best(rows: list[dict], phase: int, version: str, blocks: int, count: int,
                  spacing: float = DISTINCT_SPACING) -> list[list[float]]:
    """The gene vectors of a phase's fittest genomes, fittest first, each at least `spacing` away from every one
    before it on some gene: a converged phase's best rows are one genome to three decimals."""
    ranked = sorted((r for r in rows if r["phase"] == phase and not r["failed"]), key=lambda r: -r["fitness"])
    chosen: list[list[float]] = []
    for row in ranked:
        vector = genome_of(row, version, blocks).vector()
        if all(max(abs(x - y) for x, y in zip(vector, other)) >= spacing for other in chosen):
            chosen.append(vector)
            if len(chosen) == count:
                break
    return chosen


def top_genomes(rows: list[dict], version: str, blocks: int, count: int = 5) -> list[dict]:
    phase = max(row["phase"] for row in rows)
    ranked = sorted((r for r in rows if r["phase"] == phase and not r["failed"]), key=lambda r: -r["fitness"])
    unique = list({r["genome_hash"]: r for r in reversed(ranked)}.values())[::-1]
    unique.sort(key=lambda r: -r["fitness"])
    return [{"genome_hash": r["genome_hash"][:12], "fitness": round(r["fitness"], 4), "generation": r["generation"],
             **{k: round(v, 3) for k, v in genome_of(r, version, blocks).genes.items()}} for r in unique[:count]]


def evolution_png(rows: list[dict]) -> bytes:
    from matplotlib.figure import Figure

    frame = pd.DataFrame(rows)
    phases = sorted(frame["phase"].unique())
    fig = Figure(figsize=(5.5 * len(phases), 3.6))
    axes = fig.subplots(1, len(phases), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        per_generation = frame[frame["phase"] == phase].groupby("generation")["fitness"]
        ax.plot(per_generation.max().index, per_generation.max().cummax(), label="best so far", marker="o")
        ax.plot(per_generation.mean().index, per_generation.mean(), label="generation mean", linestyle="--")
        ax.set_xlabel("generation")
        ax.set_ylabel("fitness" if phase == 2 else "proxy fitness")
        ax.set_title(f"Phase {phase}")
        ax.grid(alpha=0.3)
        ax.legend()
    return png(fig)


def heuristic_phase(state: PhaseState, steps: int, prescription: dict[str, float], layout: RunLayout) -> PhaseState:
    """Phase 1 on the heuristic proxy (`darwin.search.heuristic_fitness`), saved after every generation; a resumed
    run whose Phase 1 is done returns at once (history.parquet already holds its rows)."""
    if state.search.generation >= steps:
        return state
    while state.search.generation < steps:
        genomes = state.search.ask()
        scores = [heuristic_fitness(g, prescription) for g in genomes]
        state.rows += [history_row(1, state.search.generation, FitnessRecord(g, s), {"proxy_heuristic": s})
                       for g, s in zip(genomes, scores)]
        state.search.tell(scores)
        state.save(layout.state(1))
    write_history(state.rows, layout.history)
    return state
