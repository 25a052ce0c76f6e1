"""The demo's parents: deterministic skills with disjoint splits, the character tokenizer, the shipped parents (each
leads on its own skill, and the recipe still trains as it did for them), and the cached build."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
import yaml

from darwin.demo import skills
from darwin.demo.parents import TRACE_STEPS, Recipe, build_parents, parents_stamp, recipe_key, replay_trace
from darwin.demo.tokenizer import build_tokenizer
from darwin.demo.train import accuracy
from darwin.errors import DarwinError


def test_skills_are_deterministic_and_seeded():
    for name in skills.SKILLS:
        assert skills.splits(name, 0) == skills.splits(name, 0)
        assert skills.splits(name, 0)["dev"] != skills.splits(name, 1)["dev"]


def entity_of(skill: skills.Skill, question: str) -> str:
    head, tail = skill.template.split("{entity}")
    assert question.startswith(head) and question.endswith(tail)
    return question[len(head):len(question) - len(tail)]


def test_splits_follow_the_rule_on_disjoint_names():
    for name, skill in skills.SKILLS.items():
        parts, rule, keyed = skills.splits(name, 0), skills.rule(name, 0), skills.names(name)
        assert {split: len(rows) for split, rows in parts.items()} == skills.SIZES
        entities = {split: [entity_of(skill, row["question"]) for row in rows] for split, rows in parts.items()}
        everyone = [entity for found in entities.values() for entity in found]
        assert len(set(everyone)) == len(everyone)  # dev and test names appear in no training text
        for split, rows in parts.items():
            for row, entity in zip(rows, entities[split], strict=True):
                assert skills.answer_text(row) == rule[keyed[entity]]
                assert row["choices"]["label"] == list(skills.LABELS) and len(set(row["choices"]["text"])) == 4
        # the base is taught half of each rule: only names that start with a known onset
        assert {keyed[e][0] for e in entities["base"]} == set(skill.onsets[:skills.KNOWN_ONSETS])
        assert {keyed[e][0] for e in entities["test"]} == set(skill.onsets)
    answers = [set(skill.answers) for skill in skills.SKILLS.values()]
    assert not answers[0] & answers[1]


def test_every_name_has_one_answer():
    for name, skill in skills.SKILLS.items():
        keyed = skills.names(name)
        assert len(keyed) > sum(skills.SIZES.values())
        for entity, (onset, coda) in list(keyed.items())[:500]:
            assert entity.lower().startswith(onset) and entity.endswith(coda)


def test_task_files_load_in_lm_eval(tmp_path):
    from darwin.evaluate import TaskSet

    written = skills.write_skill_tasks(tmp_path / "tasks")
    for name, paths in written.items():
        rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
        assert rows == skills.splits(name, 0)["test"]
        config = yaml.safe_load(paths["yaml"].read_text())
        assert config["dataset_kwargs"]["data_files"] == {"validation": str(paths["dev"]), "test": str(paths["test"])}
    task_file = str(written[skills.SKILL_A]["yaml"])
    for split, size in (("validation", skills.SIZES["dev"]), ("test", skills.SIZES["test"])):
        task = TaskSet([task_file], split).loaded()["tasks"][skills.task_name(skills.SKILL_A)]
        docs = list(task.eval_docs)
        assert len(docs) == size
        assert docs[0]["id"] == f"{skills.SKILL_A}/{'dev' if split == 'validation' else split}/0"
        assert task.doc_to_text(docs[0]) == skills.prompt(docs[0]["question"])
        assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])] == skills.answer_text(docs[0])


def test_tokenizer_round_trips(tmp_path):
    tokenizer = build_tokenizer()
    text = "Question: Which town is Galmarwen from?\nAnswer: Holt"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    again = tf.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert (again.eos_token, again.pad_token) == ("<eos>", "<pad>")


@pytest.mark.slow
def test_shipped_parents_each_lead_on_their_skill(demo_parents):
    seed = parents_stamp(demo_parents)["seed"]
    tokenizer = tf.AutoTokenizer.from_pretrained(demo_parents["father"])
    scores = {}
    for name in ("base", "father", "mother"):
        model = tf.AutoModelForCausalLM.from_pretrained(demo_parents[name])
        assert type(model).__name__ == "Qwen3_5ForCausalLM"
        scores[name] = {s: accuracy(model, tokenizer, skills.splits(s, seed)["dev"][:200]) for s in skills.SKILLS}
    a, b = skills.SKILL_A, skills.SKILL_B
    # each fine-tune taught its own skill's rule on names it never saw, and kept what the base knew of the other
    assert scores["father"][a] > scores["base"][a] + 0.15 and scores["father"][a] > scores["mother"][a] + 0.15, scores
    assert scores["mother"][b] > scores["base"][b] + 0.15 and scores["mother"][b] > scores["father"][b] + 0.15, scores
    assert scores["father"][b] > scores["base"][b] - 0.1 and scores["mother"][a] > scores["base"][a] - 0.1, scores


@pytest.mark.slow
def test_the_recipe_still_trains_as_it_did_for_the_shipped_parents(demo_parents):
    """The first steps of the base, father and mother trainings, replayed on one thread, give the losses the build
    of the shipped parents recorded: recipe, data, initialisation and libraries still train as they did (floats
    of another CPU or thread count differ in the last digits only)."""
    stamp = parents_stamp(demo_parents)
    assert stamp["key"] == recipe_key(stamp["seed"], Recipe())
    replayed = replay_trace(demo_parents)
    assert set(replayed) == set(stamp["trace"]) == {"base", "father", "mother"}
    for role, losses in stamp["trace"].items():
        assert len(losses) == TRACE_STEPS
        assert replayed[role] == pytest.approx(losses, rel=1e-4), role


def test_a_changed_recipe_refuses_the_shipped_parents(monkeypatch):
    from darwin.demo import parents

    monkeypatch.setattr(parents, "CODE_VERSION", parents.CODE_VERSION + 1)
    with pytest.raises(DarwinError, match="another recipe"):
        parents.shipped_parents()


@pytest.mark.slow
def test_parents_are_built_once_and_cached(tmp_path, monkeypatch):
    from darwin.demo import train

    monkeypatch.setattr(train, "PROGRESS_EVERY", 1)
    recipe = Recipe(hidden=32, base_steps=3, father_steps=2, mother_steps=2, lora_rank=2)
    lines = []
    built = build_parents(tmp_path, seed=5, recipe=recipe, log=lines.append)
    # progress while it trains, not only when it is done
    assert [line.split(",")[0] for line in lines if line.startswith("base: step")] == \
        ["base: step 1/3", "base: step 2/3", "base: step 3/3"]
    assert sum(line.startswith(("father: step", "mother: step")) for line in lines) == 4
    stamp = parents_stamp(built)
    assert (stamp["seed"], stamp["key"]) == (5, recipe_key(5, recipe))
    assert {role: len(losses) for role, losses in stamp["trace"].items()} == {"base": 3, "father": 2, "mother": 2}
    assert torch.get_num_threads() == 1  # the suite's pinning (conftest), restored after training on its own counts
    times = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in built.items()}
    assert build_parents(tmp_path, seed=5, recipe=recipe) == built
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in built.items()} == times
