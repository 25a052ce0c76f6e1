"""The demo's three parents: base, father (skill A), mother (skill B), shipped in the package and rebuilt on demand.

- base: a Qwen3.5 hybrid model trained from scratch on both skills' `base` split, so it knows half of each rule,
  as a pretrained model knows part of a domain;
- father: the base fully fine-tuned on skill A's `train` split;
- mother: the base with a peft LoRA on every decoder linear fine-tuned on skill B's `train` split, merged into
  the weights (merge_and_unload), as the mother in the model cards is a LoRA SFT of the shared base.
Both fine-tunes replay the base's mix so that each keeps what the base knew of the other skill. Checkpoints are
saved in float32 (the deltas are small: bfloat16 would round part of them away) with the character tokenizer.

Float results differ between CPUs (another vector unit sums in another order), and a few hundred training steps
turn that into different parents: on one 2-core machine the recipe's child beat both parents, on another it lost
to the mother. So the demo runs on parents this recipe made once (`TRAINED`, a few MB), and the same bytes on any
machine; `darwin demo --rebuild-parents` trains them afresh. `parents.json` beside them keeps the recipe's key and
the first losses of each training, which `replay_trace` reproduces in seconds on one thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import peft
import torch
import transformers as tf

from darwin.demo import skills
from darwin.demo.tokenizer import build_tokenizer
from darwin.demo.train import model_config, qa_pairs, train
from darwin.errors import DarwinError

CODE_VERSION = 4  # bump when a change to this package changes the parents' bytes
TRAINED = Path(__file__).parent / "trained"  # the shipped parents, with their parents.json
SHIPPED = {name: TRAINED / name for name in ("base", "father", "mother")}
TRACE_STEPS = 5  # first losses of each training kept in parents.json
# Training's thread counts are part of the recipe: another count sums floats in another order, and the bytes
# would depend on the machine's cores. The base trains on two (1.75x one), the two fine-tunes on one each.
BASE_THREADS = 2
# every decoder linear: a LoRA on the attention projections only merges worse (darwin/demo/README.md)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj",
                "down_proj"]


@dataclass(frozen=True)
class Recipe:
    hidden: int = 128
    layers: int = 4
    base_steps: int = 600  # near convergence on its half of each rule: see darwin/demo/README.md
    base_lr: float = 3e-3
    father_steps: int = 150
    father_lr: float = 5e-4
    mother_steps: int = 150
    mother_lr: float = 2e-3
    lora_rank: int = 16
    replay_share: float = 0.3


def _save(model, tokenizer, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float32).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


@contextmanager
def _calling_thread_on_one() -> Iterator[None]:
    """The calling thread only makes, loads and saves models; training runs in workers (`_side_by_side`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _side_by_side(intra_op_threads: int, *runs: Callable[[], object]) -> list:
    """Each run in a thread of its own, on `intra_op_threads` torch threads (the calling thread stays on one).
    Once a thread has run torch on two threads it keeps an OpenMP team, and a team on the main thread made later
    two-thread work in other threads up to 1.65x slower (training steps 0.53 s against 0.32 s; Phase 2's
    evaluations 8.0 s against 5.0 s: darwin/demo/README.md). A worker's team ends with the worker."""
    def on_its_threads(run: Callable[[], object]) -> object:
        torch.set_num_threads(intra_op_threads)  # OpenMP's thread count is per thread: set it in this one
        return run()

    with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="darwin-train") as pool:
        return [future.result() for future in [pool.submit(on_its_threads, run) for run in runs]]


def recipe_key(seed: int, recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps({"seed": seed, "code": CODE_VERSION, **asdict(recipe)}, sort_keys=True)
                          .encode()).hexdigest()[:16]


@functools.cache  # both trainings of a build (and of replay_trace) read it
def _lessons(seed: int) -> tuple[dict[str, list], list]:
    parts = {name: skills.splits(name, seed) for name in skills.SKILLS}
    return ({name: qa_pairs(split["train"]) for name, split in parts.items()},
            [pair for split in parts.values() for pair in qa_pairs(split["base"])])


def _progress(log: Callable[[str], None] | None, role: str, steps: int) -> Callable[[int, float], None] | None:
    return (lambda step, loss: log(f"{role}: step {step}/{steps}, loss {loss:.3f}")) if log else None


def _train_base(tokenizer, seed: int, recipe: Recipe, threads: int, until: int | None = None, log=None):
    """(base model, its losses): from the seed's initialisation on both skills' `base` split."""
    torch.manual_seed(seed)
    base = tf.Qwen3_5ForCausalLM(model_config(len(tokenizer), recipe.hidden, recipe.layers))
    [losses] = _side_by_side(threads, partial(train, base, tokenizer, _lessons(seed)[1], steps=recipe.base_steps,
                                              lr=recipe.base_lr, seed=seed, until=until,
                                              progress=_progress(log, "base", recipe.base_steps)))
    return base, losses


def _train_fine_tunes(base_dir: Path, tokenizer, seed: int, recipe: Recipe, until: int | None = None, log=None):
    """(father, mother, their losses) from the base in `base_dir`, side by side on one thread each: 11% faster
    than one after the other on two threads (darwin/demo/README.md). Both models are made here, not in the
    workers: loading and peft's wrapping patch process-wide state."""
    lessons, mix = _lessons(seed)
    father = tf.Qwen3_5ForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed + 2)  # the LoRA's initialisation
    lora = peft.get_peft_model(
        tf.Qwen3_5ForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, target_modules=LORA_TARGETS))
    father_losses, mother_losses = _side_by_side(
        1, partial(train, father, tokenizer, lessons[skills.SKILL_A], steps=recipe.father_steps, lr=recipe.father_lr,
                   seed=seed + 1, replay=mix, replay_share=recipe.replay_share, until=until,
                   progress=_progress(log, "father", recipe.father_steps)),
        partial(train, lora, tokenizer, lessons[skills.SKILL_B], steps=recipe.mother_steps, lr=recipe.mother_lr,
                seed=seed + 2, replay=mix, replay_share=recipe.replay_share, until=until,
                progress=_progress(log, "mother", recipe.mother_steps)))
    return father, lora.merge_and_unload(), father_losses, mother_losses


def build_parents(out_dir: str | Path, seed: int = 0, recipe: Recipe = Recipe(), log=print) -> dict[str, Path]:
    """{"base", "father", "mother"} -> checkpoint dirs under `out_dir`, built once per (seed, recipe, code
    version): a second call finds `parents.json` with the same key and returns at once."""
    out = Path(out_dir)
    key = recipe_key(seed, recipe)
    paths = {name: out / name for name in ("base", "father", "mother")}
    stamp = out / "parents.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and all(p.is_dir() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    tokenizer = build_tokenizer()
    seconds, losses = {}, {}
    log(f"demo parents: training the base ({recipe.base_steps} steps), then father and mother "
        f"({recipe.father_steps} / {recipe.mother_steps} steps side by side)")
    with _calling_thread_on_one():
        start = time.time()
        base, losses["base"] = _train_base(tokenizer, seed, recipe, min(BASE_THREADS, os.cpu_count() or 1), log=log)
        _save(base, tokenizer, paths["base"])
        seconds["base"] = time.time() - start
        log(f"base: {recipe.base_steps} steps in {seconds['base']:.0f} s")
        start = time.time()
        father, mother, losses["father"], losses["mother"] = _train_fine_tunes(paths["base"], tokenizer, seed, recipe,
                                                                               log=log)
        _save(father, tokenizer, paths["father"])
        _save(mother, tokenizer, paths["mother"])
        seconds["fine-tunes"] = time.time() - start
    log(f"father (full fine-tune on {skills.SKILL_A}, {recipe.father_steps} steps) and mother (LoRA "
        f"r{recipe.lora_rank} on {skills.SKILL_B}, {recipe.mother_steps} steps) in {seconds['fine-tunes']:.0f} s")
    stamp.write_text(json.dumps({"key": key, "seed": seed, "recipe": asdict(recipe),
                                 "seconds": {part: round(value, 1) for part, value in seconds.items()},
                                 "trace": {role: values[:TRACE_STEPS] for role, values in losses.items()}},
                                indent=1))
    return paths


def parents_stamp(parents: dict[str, Path]) -> dict:
    """The parents.json of a set of demo parents: key, seed, recipe, build seconds, loss trace."""
    return json.loads((parents["base"].parent / "parents.json").read_text())


def shipped_parents() -> dict[str, Path]:
    """The parents the package ships, checked to be this recipe's (CODE_VERSION and Recipe's defaults)."""
    stamp = parents_stamp(SHIPPED)
    if stamp["key"] != recipe_key(stamp["seed"], Recipe()):
        raise DarwinError(f"the demo parents in {TRAINED} were made by another recipe than this code's: run "
                          "`darwin demo --rebuild-parents` (and ship its parents)")
    return dict(SHIPPED)


def replay_trace(parents: dict[str, Path], steps: int = TRACE_STEPS) -> dict[str, list[float]]:
    """The first `steps` losses of each of the recipe's trainings, trained again on one thread each: the base from
    its seeded initialisation, the fine-tunes from `parents`' base. Equal to parents.json's trace (to float noise)
    while the recipe, its data and the libraries still train as they did when the parents were made."""
    stamp = parents_stamp(parents)
    seed, recipe = stamp["seed"], Recipe(**stamp["recipe"])
    tokenizer = build_tokenizer()
    with _calling_thread_on_one():
        _, base = _train_base(tokenizer, seed, recipe, 1, until=steps)
        _, _, father, mother = _train_fine_tunes(parents["base"], tokenizer, seed, recipe, until=steps)
    return {"base": base, "father": father, "mother": mother}
