"""Two synthetic multiple-choice skills in ARC format: look-ups in two fictional fact tables.

A skill is memorised knowledge, like a pretrained model's facts: the model can only answer about an entity it has
read about. So the `train` split is the whole table (one row per entity, the training text), and `dev` / `test`
ask about disjoint sets of entities (dev is the fitness during evolution, test is held out for the final report:
a genome chosen on dev is judged on facts it was never selected on). Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from darwin.evaluate import multiple_choice_task_file

LABELS = ("A", "B", "C", "D")
DEV_SIZE = 300
TEST_SIZE = 500


@dataclass(frozen=True)
class Skill:
    name: str
    template: str  # the question, with {entity}
    answers: tuple[str, ...]
    onsets: tuple[str, ...]  # syllables of the entity names: each skill has its own, so names never collide
    codas: tuple[str, ...]
    capitalised: bool


SKILLS = {
    "creature_colors": Skill(
        name="creature_colors",
        template="What color is the {entity}?",
        answers=("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
        onsets=("zor", "blat", "quim", "fen", "drub", "skav", "mol", "trel", "vop", "gark", "plin", "snu"),
        codas=("ax", "el", "ip", "ung", "orb", "ix", "ash", "ot"),
        capitalised=False,
    ),
    "wizard_towns": Skill(
        name="wizard_towns",
        template="Which town is {entity} from?",
        answers=("Brindle", "Carrow", "Dunmere", "Elsworth", "Fallow", "Greywick", "Holt", "Ivydale"),
        onsets=("al", "bre", "cor", "dov", "eth", "gal", "hes", "ir", "jan", "kel", "lor", "mar"),
        codas=("ric", "wen", "dor", "ith", "ana", "ulf", "ora", "en"),
        capitalised=True,
    ),
}
SKILL_A, SKILL_B = "creature_colors", "wizard_towns"


def _entities(skill: Skill, n: int, rng: random.Random) -> list[str]:
    """n distinct names of two or three onsets and a coda."""
    names: set[str] = set()
    ordered = []
    while len(ordered) < n:
        parts = rng.choices(skill.onsets, k=rng.choice((2, 3))) + [rng.choice(skill.codas)]
        name = "".join(parts)
        name = name.capitalize() if skill.capitalised else name
        if name not in names:
            names.add(name)
            ordered.append(name)
    return ordered


def facts(skill_name: str, seed: int = 0) -> list[tuple[str, str]]:
    """The fact table: (entity, answer) for dev + test entities, in a seed-fixed order."""
    skill = SKILLS[skill_name]
    rng = random.Random(f"{seed}:{skill_name}:facts")
    entities = _entities(skill, DEV_SIZE + TEST_SIZE, rng)
    return [(e, rng.choice(skill.answers)) for e in entities]


def _row(skill: Skill, split: str, index: int, entity: str, answer: str, rng: random.Random) -> dict:
    wrong = rng.sample([a for a in skill.answers if a != answer], len(LABELS) - 1)
    choices = wrong + [answer]
    rng.shuffle(choices)
    return {
        "id": f"{skill.name}/{split}/{index}",
        "question": skill.template.format(entity=entity),
        "choices": {"text": choices, "label": list(LABELS)},
        "answerKey": LABELS[choices.index(answer)],
    }


def splits(skill_name: str, seed: int = 0) -> dict[str, list[dict]]:
    """ARC rows (lm-eval's ai2_arc schema) per split: train (every fact), dev and test (disjoint entities)."""
    skill = SKILLS[skill_name]
    table = facts(skill_name, seed)
    rng = random.Random(f"{seed}:{skill_name}:choices")
    parts = {"train": table, "dev": table[:DEV_SIZE], "test": table[DEV_SIZE:]}
    return {split: [_row(skill, split, i, e, a, rng) for i, (e, a) in enumerate(rows)] for split, rows in parts.items()}


def answer_text(row: dict) -> str:
    return row["choices"]["text"][LABELS.index(row["answerKey"])]


def prompt(question: str) -> str:
    """The arc_challenge prompt, exactly as the task YAML renders it (the answer follows after a space)."""
    return f"Question: {question}\nAnswer:"


def task_name(skill_name: str, split: str) -> str:
    return f"demo_{skill_name}_{split}"


def write_skill_tasks(out_dir: str | Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write each skill's splits as JSONL and an lm-eval task YAML per dev/test split (arc_challenge's shape,
    local data, via darwin.evaluate). Returns {skill: {"train"|"dev"|"test": jsonl, "dev_yaml"|"test_yaml": task
    file}}; the task names are `task_name(skill, split)`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for skill_name in SKILLS:
        paths: dict[str, Path] = {}
        for split, rows in splits(skill_name, seed).items():
            path = out / f"{skill_name}_{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            paths[split] = path
            if split != "train":
                paths[f"{split}_yaml"] = multiple_choice_task_file(task_name(skill_name, split), {"test": path}, out)
        written[skill_name] = paths
    return written
