"""The demo's run: its evolution config over the demo parents, and the table it ends with.

Fitness during evolution is the mean acc_norm of both skills on their dev questions (the tasks' validation split);
the evolution's held-out report scores father, mother and child on the test questions only, with an exact McNemar
test of the child against each parent over the per-question correctness of both skills.
"""

from __future__ import annotations

from pathlib import Path

# Budgets: "full" is the README's demo; "small" (the same parents) keeps a CI-sized run honest in a few minutes.
# `questions`: how many of each dev and test split are scored (None: all).
BUDGETS = {
    "full": {"phase1": {"steps": 40, "popsize": 12}, "phase2": {"steps": 5, "popsize": 6}, "questions": None},
    "small": {"phase1": {"steps": 10, "popsize": 8}, "phase2": {"steps": 2, "popsize": 4}, "questions": 100},
}
METHOD = {"method": "dare-ties", "genome": "v6", "blocks": 2}


def demo_config(parents: dict[str, Path], tasks: dict[str, dict[str, Path]], small: bool = False, seed: int = 0,
                release_dest: Path | None = None) -> dict:
    budget = BUDGETS["small" if small else "full"]
    return {
        "father": str(parents["father"]), "mother": str(parents["mother"]), "base": str(parents["base"]),
        **METHOD, "seed": seed,
        "phase1": {**budget["phase1"], "proxy": "heuristic"},
        "phase2": {**budget["phase2"], "tasks": [str(paths["yaml"]) for paths in tasks.values()],
                   "split": "validation", "limit": budget["questions"], "batch_size": 64, "device": "cpu"},
        "heldout": {"split": "test", "limit": budget["questions"]},
        "release": {"scheme": "nvfp4a16", "dest": str(release_dest) if release_dest else None},
        "runner": {"kind": "local", "workers": 1},
    }


def table(report: dict, genome: dict) -> str:
    """The table the demo ends with, from the evolution's held-out report: per skill and mean, father / mother /
    child, and the p-values."""
    tasks = sorted(report["scores"]["child"])
    width = max(len(t) for t in tasks + ["held-out mean"]) + 2
    lines = [f"{'':{width}}{'father':>9}{'mother':>9}{'child':>9}"]
    for task in tasks:
        lines.append(f"{task:{width}}" + "".join(f"{report['scores'][r][task]:9.3f}" for r in ("father", "mother",
                                                                                                 "child")))
    lines.append(f"{'held-out mean':{width}}" + "".join(f"{report['fitness'][r]:9.3f}" for r in ("father", "mother",
                                                                                                  "child")))
    lines.append(f"McNemar p (child vs father) = {report['p_values']['father']:.2g}, "
                 f"(child vs mother) = {report['p_values']['mother']:.2g}, over {report['questions']} questions")
    fitness = report["fitness"]
    if fitness["child"] <= max(fitness["father"], fitness["mother"]):
        verdict = "does not beat both parents"
    elif max(report["p_values"].values()) < 0.05:
        verdict = "beats both parents (p < 0.05 against each)"
    else:
        verdict = "beats both parents, not significantly"
    lines.append(f"verdict: the child {verdict}")
    lines.append("genome: " + ", ".join(f"{k}={v:.3f}" for k, v in genome.items()))
    return "\n".join(lines)
