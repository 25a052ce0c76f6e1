"""Phase 3 health check: a child equal to a parent passes; a child with a destroyed layer fails on that layer."""

import json

import pandas as pd
import pico
import picotok
import pytest
from test_probes import SHORT_PROBES, make_identity

from darwin import health, probes
from darwin.errors import DarwinError
from flows.cli import main

DESTROYED = 2


def curves(values: dict[int, float]) -> pd.DataFrame:
    """A probe table with two probes whose mean per layer is `values`."""
    rows = [(layer, probe, v + delta) for layer, v in values.items() for probe, delta in (("A", 0.01), ("B", -0.01))]
    return pd.DataFrame(rows, columns=["layer", "probe", "importance"])


@pytest.fixture(scope="module")
def family_tables():
    tokenizer, prompts = picotok.build(), SHORT_PROBES
    father = probes.layer_importance(pico.build("qwen3"), tokenizer, prompts)
    mother = probes.layer_importance(pico.perturbed(pico.build("qwen3"), 1), tokenizer, prompts)
    broken = probes.layer_importance(make_identity(pico.build("qwen3"), DESTROYED), tokenizer, prompts)
    return father, mother, broken


def test_child_equal_to_father_passes(family_tables):
    father, mother, _ = family_tables
    report = health.health_check(father, father, mother)
    assert report["verdict"] == "pass"
    assert [row["child"] for row in report["layers"]] == [row["father"] for row in report["layers"]]
    assert report["interference"] == report["function_loss"] == []


def test_child_with_a_destroyed_layer_fails_on_that_layer(family_tables):
    father, mother, broken = family_tables
    report = health.health_check(broken, father, mother)
    assert report["verdict"] == "fail"
    assert report["function_loss"] == [DESTROYED]
    assert report["layers"][DESTROYED]["child"] < 1e-5 < report["layers"][DESTROYED]["father"]


def test_flags_follow_the_thresholds():
    father = curves({0: 0.40, 1: 0.20, 2: 0.30})
    mother = curves({0: 0.30, 1: 0.25, 2: 0.30})
    child = curves({0: 0.61, 1: 0.09, 2: 0.30})
    report = health.health_check(child, father, mother)
    assert (report["interference"], report["function_loss"]) == ([0], [1])
    loose = health.health_check(child, father, mother, health.Thresholds(interference=1.6, function_loss=0.4))
    assert loose["verdict"] == "pass"


def test_spec_rule_by_default_and_an_opt_in_noise_floor():
    """Layer 1 is near zero in all three (child 10x its parents); layer 2's child is at zero. The rule flags
    both; with noise 0.05 both sit below the floor (5% of the 0.5 peak) and nothing is flagged."""
    father = curves({0: 0.5, 1: 0.002, 2: 0.02})
    mother = curves({0: 0.5, 1: 0.001, 2: 0.02})
    child = curves({0: 0.5, 1: 0.02, 2: 0.0})
    exact = health.health_check(child, father, mother)
    assert (exact["verdict"], exact["interference"], exact["function_loss"]) == ("fail", [1], [2])
    assert exact["thresholds"]["noise_floor"] == 0.0
    floored = health.health_check(child, father, mother, health.Thresholds(noise=0.05))
    assert floored["verdict"] == "pass"
    assert floored["thresholds"]["noise_floor"] == pytest.approx(0.05 * 0.5)


def test_mismatched_layers_and_bad_thresholds_are_user_errors():
    father = curves({0: 0.5, 1: 0.2})
    with pytest.raises(DarwinError, match="same layers"):
        health.health_check(curves({0: 0.5}), father, father)
    with pytest.raises(DarwinError, match="out of range"):
        health.Thresholds(interference=0.9)


def test_health_command_exits_3_on_a_broken_child_and_0_on_a_healthy_one(prefect_api, tmp_path_factory):
    saved = {}
    for role, model in (("father", pico.build("qwen3")), ("mother", pico.perturbed(pico.build("qwen3"), 1)),
                        ("broken", make_identity(pico.build("qwen3"), DESTROYED))):
        saved[role] = str(picotok.save_beside(pico.save(model, tmp_path_factory.mktemp(role))))
    probe_dir = tmp_path_factory.mktemp("probes")
    for name, prompts in SHORT_PROBES.items():
        (probe_dir / f"{name.lower()}.txt").write_text("\n".join(prompts))
    out = tmp_path_factory.mktemp("health")
    code = main(["health", saved["broken"], "--father", saved["father"], "--mother", saved["mother"],
                 "--out", str(out), "--probes", str(probe_dir), "--device", "cpu"])
    assert code == 3
    report = json.loads((out / "health.json").read_text())
    assert report["verdict"] == "fail" and report["function_loss"] == [DESTROYED]
    assert (out / "health.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "father" / "probes.parquet").exists()

    again = tmp_path_factory.mktemp("health-again")
    code = main(["health", saved["father"], "--father", saved["father"], "--mother", saved["mother"],
                 "--father-probes", str(out / "father"), "--mother-probes", str(out / "mother"), "--out", str(again),
                 "--probes", str(probe_dir)])
    assert code == 0
    assert json.loads((again / "health.json").read_text())["verdict"] == "pass"
    assert not (again / "father").exists()
