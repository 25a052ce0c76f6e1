"""The demo at reduced size (its shipped parents, small budgets, 100 questions per split): the whole pipeline and
its held-out report.

The full demo's figures are in the README; this run asserts the same claim at its size (the child's held-out
fitness above both parents'), distinct skills, a consistent report and a complete release.
"""

import json

import pytest

from darwin.demo.skills import SKILL_A, SKILL_B, task_name


@pytest.mark.slow
def test_small_demo_runs_the_whole_pipeline(prefect_api, tmp_path_factory):
    from flows.demo import demo_flow

    root = tmp_path_factory.mktemp("demo")
    run = root / "run"
    summary = demo_flow(str(run), seed=0, small=True)
    on_disk = json.loads((run / "summary.json").read_text())
    assert set(on_disk) >= {"heldout", "genome", "genome_hash", "proxy_spearman", "seconds"}
    report = json.loads((run / "evolution" / "best" / "merge_report.json").read_text())
    assert report["genome_hash"] == on_disk["genome_hash"] == summary["genome_hash"]
    heldout = summary["heldout"]
    assert (heldout["split"], heldout["questions"]) == ("test", 200)
    assert json.loads((run / "evolution" / "summary.json").read_text())["heldout"] == on_disk["heldout"]
    scores, fitness = heldout["scores"], heldout["fitness"]
    skill_a, skill_b = task_name(SKILL_A), task_name(SKILL_B)
    # the skills are real and distinct: each parent is clearly better on its own skill than the other parent
    assert scores["father"][skill_a] > scores["mother"][skill_a] + 0.2
    assert scores["mother"][skill_b] > scores["father"][skill_b] + 0.2
    # held-out fitness is the mean over both skills
    for role in ("father", "mother", "child"):
        assert fitness[role] == pytest.approx((scores[role][skill_a] + scores[role][skill_b]) / 2)
    # the demo's claim: the child chosen on dev questions beats both parents on the held-out ones
    assert fitness["child"] > max(fitness["father"], fitness["mother"])
    assert all(0.0 < p <= 1.0 for p in heldout["p_values"].values())
    history = (run / "evolution" / "history.parquet")
    assert history.exists() and (run / "evolution" / "evolution.png").exists()
    if summary["health"] == "pass":
        assert (run / "release" / "manifest.json").exists()
        assert "## Held-out scores" in (run / "release" / "README.md").read_text()
