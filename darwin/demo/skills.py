"""Two synthetic multiple-choice skills in ARC format: fictional creatures' colours and wizards' home towns.

A skill is a rule, not a list of facts: the answer follows from two syllables of the name, its first onset and its
coda ("zor...ax" creatures are one colour), through a table drawn from the seed (12 onsets x 8 codas -> 8 answers).
A model that has learned a skill answers about names it has never read, so the dev and test questions ask about
names that appear in no training text: a genome chosen on dev is judged on questions nobody trained or selected on.

Splits, with every name in at most one of them: `base`, the base model's share, names whose first onset is one of
the first KNOWN_ONSETS (the base learns half of each rule, as a pretrained model knows part of a domain); `train`,
names with any onset (what a fine-tune learns); `dev` and `test`. Everything is a pure function of the seed.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from darwin.evaluate import multiple_choice_task_file

LABELS = ("A", "B", "C", "D")
SIZES = {"base": 4000, "train": 4000, "dev": 300, "test": 500}
KNOWN_ONSETS = 6


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


def rule(skill_name: str, seed: int = 0) -> dict[tuple[str, str], str]:
    """(first onset, coda) -> answer."""
    skill = SKILLS[skill_name]
    rng = random.Random(f"{seed}:{skill_name}:rule")
    return {(onset, coda): rng.choice(skill.answers) for onset in skill.onsets for coda in skill.codas}


@functools.cache
def names(skill_name: str) -> dict[str, tuple[str, str]]:
    """Every name of two or three onsets and a coda -> its (first onset, coda). A spelling that two different
    syllable sequences with different keys share is left out: its answer would be ambiguous."""
    skill = SKILLS[skill_name]
    keys: dict[str, tuple[str, str]] = {}
    ambiguous = set()
    for onsets in (2, 3):
        for parts in itertools.product(*[skill.onsets] * onsets, skill.codas):
            name = "".join(parts).capitalize() if skill.capitalised else "".join(parts)
            if keys.setdefault(name, (parts[0], parts[-1])) != (parts[0], parts[-1]):
                ambiguous.add(name)
    return {name: key for name, key in keys.items() if name not in ambiguous}


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
    """ARC rows (lm-eval's ai2_arc schema) per split (see the module's docstring), on disjoint sets of names."""
    skill, table, keyed = SKILLS[skill_name], rule(skill_name, seed), names(skill_name)
    rng = random.Random(f"{seed}:{skill_name}:names")
    order = sorted(keyed)
    rng.shuffle(order)
    taken = {}
    for split in ("dev", "test", "train"):
        taken[split], order = order[:SIZES[split]], order[SIZES[split]:]
    known = set(skill.onsets[:KNOWN_ONSETS])
    taken["base"] = [name for name in order if keyed[name][0] in known][:SIZES["base"]]
    rng = random.Random(f"{seed}:{skill_name}:choices")
    return {split: [_row(skill, split, i, name, table[keyed[name]], rng) for i, name in enumerate(taken[split])]
            for split in SIZES}


def answer_text(row: dict) -> str:
    return row["choices"]["text"][LABELS.index(row["answerKey"])]


def prompt(question: str) -> str:
    """The arc_challenge prompt, exactly as the task YAML renders it (the answer follows after a space)."""
    return f"Question: {question}\nAnswer:"


def task_name(skill_name: str) -> str:
    return f"demo_{skill_name}"


def write_skill_tasks(out_dir: str | Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write each skill's splits as JSONL and one lm-eval task YAML per skill (arc_challenge's shape, local data,
    via darwin.evaluate) whose validation split is `dev` and test split is `test`. Returns {skill: {split: jsonl,
    "yaml": task file}}; the task names are `task_name(skill)`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for skill_name in SKILLS:
        paths: dict[str, Path] = {}
        for split, rows in splits(skill_name, seed).items():
            path = out / f"{skill_name}_{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            paths[split] = path
        paths["yaml"] = multiple_choice_task_file(task_name(skill_name), {"validation": paths["dev"],
                                                                          "test": paths["test"]}, out)
        written[skill_name] = paths
    return written
