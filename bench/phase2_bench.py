"""Where a Phase 2 step's time goes: merging, evaluating (lm-eval), and orchestration (Prefect, CMA-ES, records).

Run: python bench/phase2_bench.py [--work .bench] [--hidden 128] [--layers 4] [--steps 3] [--popsize 4]
                                  [--limit 100] [--threads 1] 2>/dev/null   (stderr: Prefect's and lm-eval's logs)

Parents: a random small Qwen3.5 text model (the demo's architecture and character tokenizer) as base, father and
mother = base + two independent N(0, 0.01) noises, dare-ties with a v6 genome over 2 blocks (the demo's method).
Fitness tasks: the demo's two tasks on their dev questions (lm-eval, arc_challenge's shape, local data, validation
split), --limit questions each.
Two measurements, each with a fresh fitness cache so that every genome is really merged and evaluated:
1. direct: `darwin.fitness.evaluate_genome` called in a loop over the genomes of --steps x --popsize (no Prefect);
   the rest is the call's own overhead (cache lookup, planning);
2. flow: `darwin evolve`'s flow end to end (ephemeral Prefect, local runner, --workers workers); per Phase 2
   generation: its wall time (from the end of the previous generation's record task to the end of its own), the
   summed merge_seconds and eval_seconds of its genomes from history.parquet, and orchestration = wall - both
   (with one worker; with more, merge and eval overlap and the shares are of worker time, printed as such).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd
import torch

NOISE_STD = 0.01


def build_parents(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    """base/father/mother under root (kept when already built for these sizes)."""
    from transformers import Qwen3_5ForCausalLM

    from darwin.demo.tokenizer import build_tokenizer
    from darwin.demo.train import model_config

    root = root / f"qwen3_5-h{hidden}-l{layers}"
    paths = {role: root / role for role in ("base", "father", "mother")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tokenizer = build_tokenizer()
    for role, seed in (("base", None), ("father", 1), ("mother", 2)):
        torch.manual_seed(0)
        model = Qwen3_5ForCausalLM(model_config(len(tokenizer), hidden, layers)).to(torch.bfloat16).eval()
        if seed is not None:
            noise = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_((torch.randn(parameter.shape, generator=noise) * NOISE_STD).to(parameter.dtype))
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


def run_config(parents: dict[str, Path], tasks: list[str], args) -> dict:
    return {"father": str(parents["father"]), "mother": str(parents["mother"]), "base": str(parents["base"]),
            "method": "dare-ties", "genome": "v6", "blocks": 2, "seed": 0,
            "phase1": {"steps": 2, "popsize": 4},
            "phase2": {"steps": args.steps, "popsize": args.popsize, "tasks": tasks, "limit": args.limit,
                       "batch_size": args.batch_size, "device": "cpu"},
            "heldout": {"split": None},  # Phase 2 is what is measured
            "runner": {"kind": "local", "workers": args.workers}}


def direct(parents: dict[str, Path], tasks: list[str], args, cache: Path) -> None:
    """evaluate_genome on the genomes CMA-ES would ask for, without Prefect."""
    from darwin import fitness
    from darwin.evaluate import TaskSet
    from darwin.parents import Parents
    from darwin.search import Search

    task_set = TaskSet(tasks, "validation")
    search = Search("v6", 2, args.popsize, seed=0)
    who = Parents(str(parents["father"]), str(parents["mother"]), "dare-ties", str(parents["base"]))
    prints = fitness.run_inputs(who)
    print(f"\n1. direct evaluate_genome ({args.steps} x {args.popsize} genomes, {args.limit} questions per task)")
    print(f"{'step':>4s} {'wall s':>7s} {'merge':>6s} {'eval':>6s} {'other':>6s}   merge s  eval s")
    for step in range(args.steps):
        genomes = search.ask()
        started = time.perf_counter()
        records = [fitness.evaluate_genome(who, g, task_set, args.limit, args.batch_size, "cpu",
                                           fitness.FitnessCache(cache), prints) for g in genomes]
        wall = time.perf_counter() - started
        search.tell([r.fitness for r in records])
        merge, evaluate = sum(r.merge_seconds for r in records), sum(r.eval_seconds for r in records)
        print(f"{step:4d} {wall:7.2f} {merge / wall:6.1%} {evaluate / wall:6.1%} {(wall - merge - evaluate) / wall:6.1%}"
              f"   {merge:7.2f} {evaluate:7.2f}", flush=True)
    print("   (step 0's merge includes loading the father as the worker's skeleton model, once per worker)")


def flow(parents: dict[str, Path], tasks: list[str], args, cache: Path, run: Path) -> None:
    from darwin.config import parse_config
    from flows import evolve

    ends: dict[int, float] = {}
    recording: dict[int, float] = {}
    phase2_start: list[float] = []
    real_record, real_progress = evolve.record_generation, evolve.start_progress

    def timed_record(state, phase, generation, *rest, **kwargs):
        mark = time.perf_counter()
        result = real_record(state, phase, generation, *rest, **kwargs)
        if phase == 2:
            ends[generation] = time.perf_counter()
            recording[generation] = ends[generation] - mark
        return result

    def timed_progress(phase, steps, done):
        if phase == 2:
            phase2_start.append(time.perf_counter())
        return real_progress(phase, steps, done)

    # the flow looks both up as module globals at call time: wrapping them times each generation from outside
    evolve.record_generation, evolve.start_progress = timed_record, timed_progress
    started = time.perf_counter()
    try:
        summary = evolve.run_evolution(parse_config(run_config(parents, tasks, args)), run, cache_dir=str(cache))
    finally:
        evolve.record_generation, evolve.start_progress = real_record, real_progress
    total = time.perf_counter() - started
    history = pd.read_parquet(run / "history.parquet")
    phase2 = history[history["phase"] == 2]
    print(f"\n2. flow end to end ({args.workers} worker(s)): {total:.1f} s in all; phases "
          + ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items() if k != "total"))
    worker_time = " (worker seconds)" if args.workers > 1 else ""
    print(f"{'gen':>4s} {'wall s':>7s} {'merge':>6s} {'eval':>6s} {'orch.':>6s}   merge s  eval s  record s"
          f"{worker_time}")
    previous = phase2_start[0]
    shares = []
    for generation in sorted(ends):
        rows = phase2[phase2["generation"] == generation]
        wall = ends[generation] - previous
        previous = ends[generation]
        merge, evaluate = rows["merge_seconds"].sum(), rows["eval_seconds"].sum()
        orchestration = max(0.0, wall - (merge + evaluate) / args.workers)
        shares.append(orchestration / wall)
        print(f"{generation:4d} {wall:7.2f} {merge / args.workers / wall:6.1%} {evaluate / args.workers / wall:6.1%} "
              f"{orchestration / wall:6.1%}   {merge:7.2f} {evaluate:7.2f} {recording[generation]:9.2f}", flush=True)
    print(f"   median orchestration share {statistics.median(shares):.1%}; a generation's wall runs from the end of "
          f"the previous one's record task to the end of its own (ask, fan-out, gather, tell, records); record s: "
          f"the record task (state, history.parquet, evolution.png, progress artifact), part of orchestration")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--popsize", type=int, default=4)
    parser.add_argument("--limit", type=int, default=100, help="questions per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared CPU, OpenMP threads wait on each other)")
    parser.add_argument("--only", choices=["direct", "flow"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from darwin.checkpoint import Checkpoint
    from darwin.demo import skills

    work = args.work.resolve()
    parents = build_parents(work / "phase2", args.hidden, args.layers)
    tasks = [str(paths["yaml"]) for paths in skills.write_skill_tasks(work / "phase2" / "tasks").values()]
    params = sum(info.numel for info in Checkpoint(parents["father"]).tensors.values())
    print(f"parents {parents['father'].parent} ({params / 1e6:.1f}M params, hidden {args.hidden}, {args.layers} "
          f"layers); tasks "
          f"{', '.join(Path(t).stem for t in tasks)}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"torch threads {torch.get_num_threads()}")
    scratch = work / "phase2" / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    if args.only != "flow":
        direct(parents, tasks, args, scratch / "cache-direct")
    if args.only != "direct":
        flow(parents, tasks, args, scratch / "cache-flow", scratch / "run")
    print(f"\nload now {os.getloadavg()[0]:.1f} (a shared machine: rerun to see the spread)")


if __name__ == "__main__":
    main()
