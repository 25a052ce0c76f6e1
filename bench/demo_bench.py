"""`darwin demo` for several search seeds: held-out scores, McNemar p-values, minutes and proxy rankings, one row each.

Run: python bench/demo_bench.py [--seeds 0 1 2] [--small] [--work .bench/demo] [--rebuild-parents]

Each seed runs `darwin demo --seed N` as a new process with an empty darwin cache (no fitness result is reused, so
every genome is merged and scored), the way a new user runs it. Every row is printed, wins and losses alike, with
the child's verdict as the demo states it. With --rebuild-parents the parents are trained here first (in each
seed's empty cache, so their build is timed too) instead of taken from the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DARWIN = Path(sys.executable).parent / "darwin"


def run_seed(seed: int, work: Path, small: bool, rebuild: bool) -> dict:
    run, cache = work / f"seed{seed}", work / f"cache-seed{seed}"
    for path in (run, cache):
        shutil.rmtree(path, ignore_errors=True)
    env = {**os.environ, "DARWIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [str(DARWIN), "demo", "--seed", str(seed), "--out", str(run)] + ["--small"] * small + \
              ["--rebuild-parents"] * rebuild
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    minutes = (time.perf_counter() - started) / 60
    if done.returncode != 0:
        return {"seed": seed, "minutes": minutes, "error": done.stderr.strip().splitlines()[-1:]}
    summary = json.loads((run / "summary.json").read_text())
    return {"seed": seed, "minutes": minutes, **summary}


def verdict(row: dict) -> str:
    fitness, p = row["heldout"]["fitness"], row["heldout"]["p_values"]
    if fitness["child"] <= max(fitness["father"], fitness["mother"]):
        return "loses"
    return "wins, p < 0.05 against each" if max(p.values()) < 0.05 else "wins, not significantly"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--small", action="store_true", help="the demo's --small budgets")
    parser.add_argument("--rebuild-parents", action="store_true", help="train the parents in each run")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "demo")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"darwin demo{' --small' if args.small else ''}, seeds {args.seeds}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    header = (f"{'seed':>4} {'father':>7} {'mother':>7} {'child':>7} {'p father':>9} {'p mother':>9} {'minutes':>8} "
              f"{'parents s':>9} {'phase2 s':>9} {'rho heur':>8} {'rho meas':>8}  verdict")
    print(header, flush=True)
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args.work, args.small, args.rebuild_parents)
        rows.append(row)
        if "error" in row:
            print(f"seed {seed}: failed after {row['minutes']:.1f} min: {row['error']}", flush=True)
            continue
        fitness, p, spearman = row["heldout"]["fitness"], row["heldout"]["p_values"], row["proxy_spearman"]
        rho = [f"{spearman[name]:8.2f}" if spearman.get(name) is not None else f"{'-':>8}"
               for name in ("proxy_heuristic", "proxy_measured")]
        print(f"{seed:>4} {fitness['father']:7.3f} {fitness['mother']:7.3f} {fitness['child']:7.3f} "
              f"{p['father']:9.2g} {p['mother']:9.2g} {row['minutes']:8.1f} {row['seconds']['parents']:9.0f} "
              f"{row['seconds']['phase2']:9.0f} {rho[0]} {rho[1]}  {verdict(row)}", flush=True)
    (args.work / "demo_bench.json").write_text(json.dumps(rows, indent=1))
    print(f"rows in {args.work / 'demo_bench.json'} (held-out: {rows[0].get('heldout', {}).get('questions')} "
          f"questions per model)")


if __name__ == "__main__":
    main()
