import argparse
import json
import pickle
import shutil

import numpy as np

import pandas as pd
import pytest
import yaml

import darwin.fitness
from darwin.config import load_config, parse_config
from darwin.errors import DarwinError
from darwin.evaluate import multiple_choice_task_file
from darwin.fitness import FitnessRecord
from darwin import evolution
from darwin.genome import Genome, gene_names
from darwin.parents import Parents
from darwin.search import PRIOR, Search, heuristic_fitness
from flows import evolve
from flows.cli import main


def config_for(family, **overrides):
    raw = {"father": str(family["father"]), "mother": str(family["mother"]), "base": str(family["base"]),
           "method": "dare-ties", "genome": "v6", "blocks": 2, "seed": 3,
           "phase1": {"steps": 2, "popsize": 4}, "runner": {"workers": 1},
           "phase2": {"steps": 2, "popsize": 3, "tasks": [str(family["task"])], "device": "cpu"}}
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw[section] = {**raw[section], leaf: value}
        else:
            raw[key] = value
    return parse_config(raw)


def history(run):
    return pd.read_parquet(run / "history.parquet")


def test_config_defaults_and_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("father: a\nmother: b\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.phase1.steps, config.phase1.popsize, config.phase2.steps, config.phase2.popsize) == (200, 20, 10, 8)
    assert config.phase2.tasks == ["arc_challenge"] and config.method == "darwin-v5" and config.runner.kind == "local"
    (tmp_path / "bad.yaml").write_text("father: a\nmother: b\nphase2: {popsize: 1, colour: red}\nmethod: dare-ties\n")
    with pytest.raises(DarwinError) as error:
        load_config(tmp_path / "bad.yaml")
    message = str(error.value)
    assert "phase2.popsize" in message and "phase2.colour: unknown key" in message and "\n" not in message
    with pytest.raises(DarwinError, match="darwin-v6 needs genome: v6"):
        parse_config({"father": "a", "mother": "b", "method": "darwin-v6"})
    assert load_config(tmp_path / "c.yaml", {"phase2.steps": 3}).phase2.steps == 3
    assert (config.phase2.split, config.heldout.split, config.phase2.sigma0, config.health.noise) == \
        ("validation", "test", 0.15, 0.0)
    with pytest.raises(DarwinError, match="phase2.split and heldout.split are both 'test'"):
        load_config(tmp_path / "c.yaml", {"phase2.split": "test"})
    assert load_config(tmp_path / "c.yaml", {"phase2.split": "test", "heldout.split": None}).heldout.split is None
    # lm-eval's options, validated with the rest
    assert (config.phase2.num_fewshot, config.phase2.apply_chat_template, config.phase2.metrics) == (None, False, {})
    options = load_config(tmp_path / "c.yaml", {"phase2.batch_size": "auto", "phase2.num_fewshot": 5,
                                                "phase2.metrics": {"gsm8k": "exact_match,strict-match"}})
    assert options.phase2.batch_size == "auto"
    assert options.phase2.eval_options().metrics == (("gsm8k", "exact_match,strict-match"),)
    for key, value, said in (("phase2.batch_size", "huge", "phase2.batch_size"),
                             ("phase2.num_fewshot", -1, "phase2.num_fewshot"),
                             ("phase2.fewshot_as_multiturn", True, "needs apply_chat_template")):
        with pytest.raises(DarwinError, match=said):
            load_config(tmp_path / "c.yaml", {key: value})


def test_a_task_without_the_asked_split_is_refused_before_any_work(pico_family, tmp_path):
    path = tmp_path / "c.yaml"
    config = config_for(pico_family).model_dump(mode="json")
    config["phase2"]["tasks"] = [str(multiple_choice_task_file("only_val", {"validation": pico_family["task"].parent /
                                                                           "toy_validation.jsonl"}, tmp_path))]
    path.write_text(yaml.safe_dump(config))
    assert main(["evolve", str(path), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    with pytest.raises(DarwinError, match="task only_val has no test split"):
        evolve.command(argparse.Namespace(config=str(path), set=[], out=str(tmp_path / "run"), resume=False,
                                          force_release=False))
    for override, said in (("phase2.metrics={only_val: f1}", "task only_val computes no .f1."),
                           ("phase2.apply_chat_template=true", "has no chat template")):
        assert main(["evolve", str(path), "--set", "heldout.split=null", "--set", override, "--out",
                     str(tmp_path / "run")]) == 2
        with pytest.raises(DarwinError, match=said):
            evolve.command(argparse.Namespace(config=str(path), set=["heldout.split=null", override],
                                              out=str(tmp_path / "run"), resume=False, force_release=False))
    assert not (tmp_path / "run").exists()


def test_search_resumes_exactly(tmp_path):
    def fitness(genome):
        return -sum((v - 0.3) ** 2 for v in genome.vector())

    straight = Search("v6", 2, 5, seed=7)
    asked = []
    for _ in range(4):
        genomes = straight.ask()
        asked.append([g.hash for g in genomes])
        straight.tell([fitness(g) for g in genomes])
    resumed = Search("v6", 2, 5, seed=7)
    for _ in range(2):
        genomes = resumed.ask()
        resumed.tell([fitness(g) for g in genomes])
    saved = pickle.dumps(resumed)  # as PhaseState saves it after every generation
    np.random.seed(12345)  # someone else using numpy's global RNG between runs must not matter
    resumed = pickle.loads(saved)
    for generation in (2, 3):
        genomes = resumed.ask()
        assert [g.hash for g in genomes] == asked[generation]
        resumed.tell([fitness(g) for g in genomes])
    assert all(0.0 <= v <= 1.0 for g in genomes for v in g.vector())


PRESCRIPTION = {"global_ratio": 0.5, "attn_ratio": 0.42, "ffn_ratio": 0.58, "embed_ratio": 0.5}


def heuristic_phase1(steps=200, popsize=20):
    search, rows = Search("v6", 6, popsize, seed=0), []
    for generation in range(steps):
        genomes = search.ask()
        scores = [heuristic_fitness(g, PRESCRIPTION) for g in genomes]
        rows += [evolution.history_row(1, generation, FitnessRecord(g, f), {}) for g, f in zip(genomes, scores)]
        search.tell(scores)
    return search, rows


def test_heuristic_has_no_optimum_on_a_bound():
    best = Genome.from_dict({**PRESCRIPTION, **{f"block_{k}": 0.5 for k in range(6)}, **PRIOR})
    top = heuristic_fitness(best, PRESCRIPTION)
    for gene in best.genes:
        for bound in (0.0, 1.0):
            moved = Genome.from_dict({**best.genes, gene: bound})
            assert heuristic_fitness(moved, PRESCRIPTION) < top, (gene, bound)


def test_phase2_starts_from_phase1s_best_and_searches():
    phase1, rows = heuristic_phase1()
    assert phase1.sigma < 0.01  # converged: carried over as it was, Phase 2 would evaluate one genome
    best = evolution.distinct_best(rows, 1, "v6", 6, 4)
    assert best[0] == evolution.genome_of(evolution.best_row(rows, 1), "v6", 6).vector()
    assert all(max(abs(x - y) for x, y in zip(a, b)) >= 0.05 for i, a in enumerate(best) for b in best[:i])
    phase2 = phase1.follow_on(8, 0.15, best)
    assert phase2.sigma == 0.15
    genomes = phase2.ask()
    assert [g.vector() for g in genomes[:4]] == [Genome.from_vector("v6", x, 6).vector() for x in best]
    assert len({g.hash for g in genomes}) == 8
    genes = list(gene_names("v6", 6))
    spans = [max(g[name] for g in genomes) - min(g[name] for g in genomes) for name in genes]
    assert max(spans) >= 0.05
    for genome in genomes:
        assert genome["density_a"] < 1.0 and genome["density_b"] < 1.0
    assert 0.8 < genomes[0]["density_a"] < 0.95 and 0.8 < genomes[0]["density_b"] < 0.95  # the heuristic's optimum


def test_short_evolution_writes_history_best_and_plot(prefect_api, pico_family, tmp_path):
    run = tmp_path / "run"
    summary = evolve.run_evolution(config_for(pico_family), run, cache_dir=str(tmp_path / "cache"))
    frame = history(run)
    genes = list(gene_names("v6", 2))
    assert {"phase", "generation", "genome_hash", "fitness", "seconds", "worker", *genes} <= set(frame.columns)
    assert (frame["phase"] == 1).sum() == 2 * 4 and (frame["phase"] == 2).sum() == 2 * 3
    phase2 = frame[frame["phase"] == 2]
    assert phase2["fitness"].between(0, 1).all() and not phase2["failed"].any()
    assert summary["best"]["fitness"] == phase2["fitness"].max()
    report = json.loads((run / "best" / "merge_report.json").read_text())
    assert report["genome_hash"] == summary["best"]["genome_hash"]
    # dare-ties with a v6 genome: the parents were probed and the V6 formula's probe term reached the prescription
    assert (run / "probes" / "father" / "probes.parquet").exists()
    assert any("probe_father" in row for row in report["tensors"].values())
    assert (run / "evolution.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "summary.json").read_text())["health"] in ("pass", "fail")
    assert set(summary["proxy_spearman"]) == {"proxy_heuristic", "proxy_measured"}


def test_cache_prevents_reevaluation(prefect_api, pico_family, tmp_path, monkeypatch):
    config = config_for(pico_family, phase1__steps=0)
    cache = str(tmp_path / "cache")
    first = evolve.run_evolution(config, tmp_path / "one", cache_dir=cache)
    calls = []
    real = darwin.fitness.merge_into_model
    monkeypatch.setattr(darwin.fitness, "merge_into_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = evolve.run_evolution(config, tmp_path / "two", cache_dir=cache)
    assert calls == []
    assert history(tmp_path / "two")[lambda f: f.phase == 2]["cached"].all()
    assert second["best"] == first["best"]


def test_runs_differing_in_method_or_a_late_tensor_share_no_cache_entry(pico_family, tmp_path):
    from darwin.checkpoint import Checkpoint
    from darwin.evaluate import fitness_cache_key

    def key(parents):
        return fitness_cache_key(darwin.fitness.run_inputs(parents), "g" * 64, [str(pico_family["task"])], None)

    paths = {role: str(pico_family[role]) for role in ("father", "mother", "base")}
    v5 = Parents(paths["father"], paths["mother"], "darwin-v5", paths["base"])
    dare = Parents(paths["father"], paths["mother"], "dare-ties", paths["base"])
    assert key(v5) != key(dare)
    # the mother in one shard, and a copy of it whose last tensor differs in one value, far past its first 64 KiB
    from safetensors.torch import load_file, save_file

    tensors = {}
    for shard in Checkpoint(pico_family["mother"]).shards:
        tensors.update(load_file(pico_family["mother"] / shard))
    one, late = tmp_path / "one-shard", tmp_path / "late-change"
    for directory in (one, late):
        directory.mkdir()
        shutil.copy(pico_family["mother"] / "config.json", directory)
        save_file(tensors, directory / "model.safetensors")
    size = (late / "model.safetensors").stat().st_size
    assert size > 1 << 17
    with open(late / "model.safetensors", "r+b") as handle:
        handle.seek(size - 2)
        value = handle.read(1)
        handle.seek(size - 2)
        handle.write(bytes([value[0] ^ 1]))
    same, changed = (Parents(paths["father"], str(d), "dare-ties", paths["base"]) for d in (one, late))
    assert key(same) != key(changed)
    assert key(Parents(paths["father"], str(one), "dare-ties", paths["base"])) == key(same)  # stable


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_and_matches(prefect_api, pico_family, tmp_path, monkeypatch):
    config = config_for(pico_family, phase2__steps=3)
    straight = evolve.run_evolution(config, tmp_path / "straight", cache_dir=str(tmp_path / "cache-a"))

    real_record = evolve.record_generation

    def record_then_stop(state, phase, generation, *args, **kwargs):
        real_record(state, phase, generation, *args, **kwargs)
        if phase == 2 and generation == 0:
            raise Interrupted("killed after generation 0")

    monkeypatch.setattr(evolve, "record_generation", record_then_stop)
    with pytest.raises(Exception):
        evolve.run_evolution(config, tmp_path / "resumed", cache_dir=str(tmp_path / "cache-b"))
    monkeypatch.setattr(evolve, "record_generation", real_record)
    calls = []
    real = darwin.fitness.merge_into_model
    monkeypatch.setattr(darwin.fitness, "merge_into_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = evolve.run_evolution(config, tmp_path / "resumed", resume=True, cache_dir=str(tmp_path / "cache-b"))
    assert len(calls) == 2 * 3  # generations 1 and 2 only: generation 0 is neither repeated nor re-read
    columns = ["phase", "generation", "genome_hash", "fitness"]
    pd.testing.assert_frame_equal(history(tmp_path / "straight")[columns], history(tmp_path / "resumed")[columns])
    assert resumed["best"] == straight["best"]
    again = evolve.run_evolution(config, tmp_path / "resumed", resume=True, cache_dir=str(tmp_path / "cache-b"))
    assert len(calls) == 2 * 3 and again["best"] == straight["best"]  # a finished run resumes to the same end
    pd.testing.assert_frame_equal(history(tmp_path / "straight")[columns], history(tmp_path / "resumed")[columns])


def test_failed_merge_is_retried_and_a_hopeless_genome_scores_worst(prefect_api, pico_family, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(evolve, "evaluate_candidate", evolve.evaluate_candidate.with_options(retry_delay_seconds=0))
    real = darwin.fitness.merge_into_model
    attempts = {}

    def flaky(plan, model, device="cpu"):
        key = plan.genome.hash
        attempts[key] = attempts.get(key, 0) + 1
        if len(attempts) == 1 and attempts[key] == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        if len(attempts) == 2:
            raise RuntimeError("worker lost (injected, every attempt)")
        return real(plan, model, device)

    monkeypatch.setattr(darwin.fitness, "merge_into_model", flaky)
    evolve.run_evolution(config_for(pico_family, phase1__steps=0, phase2__steps=1), tmp_path / "run",
                         cache_dir=str(tmp_path / "cache"))
    first, second = list(attempts)[:2]
    assert attempts[first] == 2 and attempts[second] == 3  # retried once; tried 1 + 2 retries, then given up
    frame = history(tmp_path / "run").set_index("genome_hash")
    assert not frame.loc[first, "failed"] and frame.loc[first, "fitness"] > 0
    assert frame.loc[second, "failed"] and frame.loc[second, "fitness"] == 0.0
    assert len(frame) == 3


def test_a_generation_that_fails_entirely_stops_the_run_in_one_line(prefect_api, pico_family, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(evolve, "evaluate_candidate", evolve.evaluate_candidate.with_options(retry_delay_seconds=0))

    def broken(plan, model, device="cpu"):
        raise RuntimeError("no parameter for 73 checkpoint tensors (injected)")

    monkeypatch.setattr(darwin.fitness, "merge_into_model", broken)
    with pytest.raises(DarwinError) as error:
        evolve.run_evolution(config_for(pico_family, phase1__steps=0, phase2__steps=2), tmp_path / "run",
                             cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert message.startswith("every genome of the generation failed; the first (") and "\n" not in message
    assert "no parameter for 73 checkpoint tensors (injected)" in message


def test_cli_refuses_a_different_config_for_an_existing_run(prefect_api, pico_family, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("father: somebody-else\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_for(pico_family).model_dump(mode="json")))
    assert main(["evolve", str(path), "--out", str(run)]) == 2
    assert main(["evolve", str(path), "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert not (tmp_path / "fresh").exists()
