"""The demo's parents: deterministic skills with disjoint splits, the character tokenizer, and a reduced build
whose father and mother each lead on their own skill."""

from __future__ import annotations

import json

import pytest
import transformers as tf
import yaml

from darwin.demo import skills
from darwin.demo.parents import build_parents, known_questions, recipe_for
from darwin.demo.tokenizer import build_tokenizer
from darwin.demo.train import accuracy


def test_skills_are_deterministic_and_seeded():
    for name in skills.SKILLS:
        assert skills.splits(name, 0) == skills.splits(name, 0)
        assert skills.splits(name, 0)["dev"] != skills.splits(name, 1)["dev"]


def test_splits_are_disjoint_and_well_formed():
    for name in skills.SKILLS:
        parts = skills.splits(name, 0)
        assert (len(parts["dev"]), len(parts["test"])) == (skills.DEV_SIZE, skills.TEST_SIZE)
        dev_q = {row["question"] for row in parts["dev"]}
        test_q = {row["question"] for row in parts["test"]}
        assert len(dev_q) == skills.DEV_SIZE and len(test_q) == skills.TEST_SIZE and not dev_q & test_q
        # train is the whole fact table: each dev and test question is answered there the same way
        table = {row["question"]: skills.answer_text(row) for row in parts["train"]}
        assert all(table[row["question"]] == skills.answer_text(row) for row in parts["dev"] + parts["test"])
        for row in parts["dev"] + parts["test"]:
            assert row["choices"]["label"] == list(skills.LABELS) and len(set(row["choices"]["text"])) == 4
    answers = [set(skill.answers) for skill in skills.SKILLS.values()]
    assert not answers[0] & answers[1]


def test_task_files_load_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    written = skills.write_skill_tasks(tmp_path / "tasks")
    for name, paths in written.items():
        rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
        assert rows == skills.splits(name, 0)["test"]
        config = yaml.safe_load(paths["dev_yaml"].read_text())
        assert config["dataset_kwargs"]["data_files"]["test"] == str(paths["dev"])
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    task_name = skills.task_name(skills.SKILL_A, "dev")
    task = manager.load_task_or_group([task_name])[task_name]
    docs = list(task.test_docs())
    assert len(docs) == skills.DEV_SIZE
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
def test_small_parents_each_lead_on_their_skill(tmp_path):
    paths = build_parents(tmp_path / "parents", seed=0, small=True)
    built = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in paths.items()}
    assert build_parents(tmp_path / "parents", seed=0, small=True) == paths
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in paths.items()} == built
    tokenizer = tf.AutoTokenizer.from_pretrained(paths["father"])
    known = known_questions(recipe_for(small=True))  # the reduced build learns the first dev and test facts
    scores = {}
    for name in ("father", "mother"):
        model = tf.AutoModelForCausalLM.from_pretrained(paths[name])
        assert type(model).__name__ == "Qwen3_5ForCausalLM"
        scores[name] = {s: accuracy(model, tokenizer, skills.splits(s, 0)["dev"][:known])
                        for s in skills.SKILLS}
    assert scores["father"][skills.SKILL_A] > scores["mother"][skills.SKILL_A] + 0.05, scores
    assert scores["mother"][skills.SKILL_B] > scores["father"][skills.SKILL_B] + 0.05, scores
