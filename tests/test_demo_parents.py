"""The demo's parents: deterministic skills with disjoint splits, the character tokenizer, and a reduced build
whose father and mother each lead on their own skill."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
import yaml

from darwin.demo import skills
from darwin.demo.parents import build_parents
from darwin.demo.tokenizer import build_tokenizer
from darwin.demo.train import accuracy


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
    assert len(docs) == skills.SIZES["dev"]
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
def test_parents_are_cached_and_each_leads_on_its_skill(demo_parents):
    out = demo_parents["base"].parent
    built = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in demo_parents.items()}
    assert build_parents(out, seed=0) == demo_parents
    assert torch.get_num_threads() == 1  # the suite's pinning (conftest), restored after training on its own counts
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in demo_parents.items()} == built
    tokenizer = tf.AutoTokenizer.from_pretrained(demo_parents["father"])
    scores = {}
    for name in ("base", "father", "mother"):
        model = tf.AutoModelForCausalLM.from_pretrained(demo_parents[name])
        assert type(model).__name__ == "Qwen3_5ForCausalLM"
        scores[name] = {s: accuracy(model, tokenizer, skills.splits(s, 0)["dev"][:200]) for s in skills.SKILLS}
    a, b = skills.SKILL_A, skills.SKILL_B
    # each fine-tune taught its own skill's rule on names it never saw, and kept what the base knew of the other
    assert scores["father"][a] > scores["base"][a] + 0.15 and scores["father"][a] > scores["mother"][a] + 0.15, scores
    assert scores["mother"][b] > scores["base"][b] + 0.15 and scores["mother"][b] > scores["father"][b] + 0.15, scores
    assert scores["father"][b] > scores["base"][b] - 0.1 and scores["mother"][a] > scores["base"][a] - 0.1, scores
