"""Merge speed and memory: `darwin merge` (darwin-v5, dare-ties) against mergekit's dare_ties and a plain copy.

Run: python bench/merge_bench.py [--work .bench] [--repeat 3] [--size 400m] [--small 100m] [--skip-mergekit]

Three random bf16 Llamas of --size (base; father and mother = base + two independent N(0, 0.002) noises) are
built once under --work (see profile_bench.py). Every contender runs as its own child process, its wall time
and its own peak RSS taken from wait4, interleaved round by round (A B C ... A B C ...) so a drift of the shared
machine hits all of them alike; medians of --repeat rounds are printed.
- darwin-v5 / dare-ties: the `darwin merge` CLI, genes 0.5 and densities 0.5, statistics computed on the fly
  (no --mri-*), the dare-ties run with --base; darwin-v5 once more with both parents' `darwin profile` output
  given (--mri-father/--mother, as the evolution does), which leaves the merge engine alone;
- mergekit dare_ties: same three models, density 0.5 and weight 1.0 each, `normalize: false` (darwin's dare-ties
  at r = 0.5: weights min(1, 2(1-r)) and min(1, 2r), unnormalised), dtype bfloat16, CPU,
  `mergekit-yaml config.yaml OUT --lazy-unpickle`, installed into its own venv under --work (torch first, from
  the local CPU wheel, so no CUDA build is pulled);
- copy (the I/O floor of the targets): a Python process that reads every tensor of one checkpoint with safetensors
  and writes it back, shard by shard (load_file + save_file: what a Python tool that copies a checkpoint runs), so
  it pays the interpreter and torch's import (imported with the garbage collector off, then frozen, as the `darwin`
  command imports). darwin merge on CPU no longer imports torch (0.75 s here); for reference, two floors without
  it: every file's bytes read and written by Python (no parsing), and `cp -r` (the kernel copies, no Python);
- darwin-v5 on a --small model too: peak RSS should not grow with the model size.
Outputs are deleted and the page cache flushed to disk (sync) between runs, outside the timed part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_bench import ROOT, SIZES, build_llama, checkpoint_bytes, run_measured

GENOME = {"global_ratio": 0.5, "attn_ratio": 0.5, "ffn_ratio": 0.5, "embed_ratio": 0.5,
          "density_a": 0.5, "density_b": 0.5}
BYTES_COPY_SCRIPT = """
import sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for path in sorted(src.iterdir()):
    (dst / path.name).write_bytes(path.read_bytes())
"""
COPY_SCRIPT = """
import gc
gc.disable()
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
gc.freeze()
gc.enable()
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for path in sorted(src.iterdir()):
    if path.suffix == ".safetensors":
        save_file(load_file(path), dst / path.name, metadata={"format": "pt"})
    else:
        (dst / path.name).write_bytes(path.read_bytes())
"""
PROFILE_SCRIPT = """
import sys
from pathlib import Path
from darwin import mri
from darwin.checkpoint import Checkpoint
checkpoint = Checkpoint(sys.argv[1])
rows = [row for shard in checkpoint.shards for row in mri.profile_shard(checkpoint, shard)]
mri.write_profile(mri.to_frame(rows), Path(sys.argv[2]))
"""


def mergekit_venv(work: Path) -> Path:
    venv = work / "mergekit-venv"
    if not (venv / "bin" / "mergekit-yaml").exists():
        print(f"installing mergekit into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["mergekit"], check=True)
    return venv


def mergekit_config(models: dict[str, Path], path: Path) -> Path:
    import yaml

    config = {
        "merge_method": "dare_ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[role]), "parameters": {"weight": 1.0, "density": 0.5}}
                   for role in ("father", "mother")],
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def contenders(work: Path, models: dict[str, Path], small: dict[str, Path] | None, venv: Path | None) -> dict:
    """name -> (command, output directory); every command writes a fresh OUT."""
    genome = work / "genome.json"
    genome.write_text(json.dumps(GENOME))
    out = work / "merge-out"
    darwin = [sys.executable, "-m", "flows.cli", "merge", "--genome", str(genome)]
    parents = ["--father", str(models["father"]), "--mother", str(models["mother"])]
    table = {
        "darwin-v5": (darwin + parents + ["--method", "darwin-v5", "--out", str(out / "v5")], out / "v5"),
        "darwin dare-ties": (darwin + parents + ["--method", "dare-ties", "--base", str(models["base"]),
                                                 "--out", str(out / "dare")], out / "dare"),
    }
    mri = ["--mri-father", str(profile(models["father"], work)), "--mri-mother", str(profile(models["mother"], work))]
    table["darwin-v5 MRI given"] = (darwin + parents + mri + ["--method", "darwin-v5", "--out", str(out / "v5mri")],
                                    out / "v5mri")
    if venv is not None:
        config = mergekit_config(models, work / "mergekit.yaml")
        table["mergekit dare_ties"] = ([str(venv / "bin" / "mergekit-yaml"), str(config), str(out / "mergekit"),
                                        "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"], out / "mergekit")
    table["copy (safetensors)"] = ([sys.executable, "-c", COPY_SCRIPT, str(models["father"]), str(out / "copy")],
                                   out / "copy")
    table["copy (Python bytes)"] = ([sys.executable, "-c", BYTES_COPY_SCRIPT, str(models["father"]),
                                     str(out / "bytes")], out / "bytes")
    table["copy (cp -r)"] = (["cp", "-r", str(models["father"]), str(out / "cp")], out / "cp")
    if small is not None:
        table["darwin-v5 small"] = (darwin + ["--father", str(small["father"]), "--mother", str(small["mother"]),
                                              "--method", "darwin-v5", "--out", str(out / "small")], out / "small")
    return table


def profile(model: Path, work: Path) -> Path:
    """The static MRI of a parent (`darwin profile`'s core, without Prefect), made afresh by every run: a profile
    kept from an older darwin held other statistics, so the "MRI given" merge wrote another child. In a child
    process: a parent that held the checkpoint's pages would lend its RSS to every child forked after it."""
    out = work / "mri" / f"{model.parent.name}-{model.name}"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, str(model), str(out)], cwd=ROOT, check=True)
    return out


def build_family(work: Path, size: str) -> dict[str, Path]:
    root = work / f"llama-{size}"
    return {role: build_llama(root / role, size, noise_seed=seed)
            for role, seed in (("base", None), ("father", 1), ("mother", 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench")
    parser.add_argument("--size", choices=list(SIZES), default="400m")
    parser.add_argument("--small", choices=list(SIZES), default="100m", help="second size for the RSS comparison")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()
    args.work = args.work.resolve()
    started = time.perf_counter()
    models = build_family(args.work, args.size)
    small = build_family(args.work, args.small) if args.small != args.size else None
    venv = None if args.skip_mergekit else mergekit_venv(args.work)
    size = checkpoint_bytes(models["father"])
    small_text = f"; {args.small}: {checkpoint_bytes(small['father']) / 1e9:.2f} GB" if small else ""
    print(f"{args.size} Llama: {size / 1e9:.2f} GB per checkpoint{small_text} (ready in "
          f"{time.perf_counter() - started:.0f} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    table = contenders(args.work, models, small, venv)
    runs: dict[str, list[dict]] = {name: [] for name in table}
    for round_ in range(args.repeat):
        for name, (command, out) in table.items():
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.sync()
            result = run_measured(command, cwd=ROOT, env={"HF_HUB_OFFLINE": "1"})
            report = out / "merge_report.json"
            result["inner"] = json.loads(report.read_text())["seconds"] if report.exists() else None
            runs[name].append(result)
            print(f"  round {round_ + 1} {name:20s} {result['wall']:7.2f} s  {result['rss_mb']:6.0f} MB "
                  f"(anon {result['anon_mb']:.0f} MB)", flush=True)
    shutil.rmtree(args.work / "merge-out", ignore_errors=True)

    med = {name: {key: statistics.median(r[key] for r in rs) for key in ("wall", "rss_mb", "anon_mb", "cpu")}
           for name, rs in runs.items()}
    print(f"\n{'contender':20s} {'wall s':>7s} {'min-max':>13s} {'cpu s':>7s} {'peak RSS MB':>11s} {'anon MB':>7s} "
          f"{'out GB/s':>8s} {'engine s':>8s}")
    for name, rs in runs.items():
        walls = [r["wall"] for r in rs]
        inner = [r["inner"] for r in rs if r["inner"] is not None]
        out_bytes = checkpoint_bytes(small["father"]) if name.endswith("small") else size
        print(f"{name:20s} {med[name]['wall']:7.2f} {min(walls):6.2f}-{max(walls):<6.2f} {med[name]['cpu']:7.2f} "
              f"{med[name]['rss_mb']:11.0f} {med[name]['anon_mb']:7.0f} {out_bytes / 1e9 / med[name]['wall']:8.2f} "
              f"{statistics.median(inner) if inner else float('nan'):8.2f}")
    print()
    for name in ("darwin-v5", "darwin dare-ties"):
        line = f"{name}: "
        if "mergekit dare_ties" in med:
            line += f"/ mergekit {med[name]['wall'] / med['mergekit dare_ties']['wall']:.2f} (target <= 0.5), "
        line += (f"/ copy {med[name]['wall'] / med['copy (safetensors)']['wall']:.2f} (target <= 1.5); for reference "
                 f"/ Python bytes copy {med[name]['wall'] / med['copy (Python bytes)']['wall']:.2f}, "
                 f"/ cp -r {med[name]['wall'] / med['copy (cp -r)']['wall']:.2f}")
        print(line)
    if small is not None:
        print(f"peak RSS darwin-v5 {args.size} / {args.small}: "
              f"{med['darwin-v5']['rss_mb']:.0f} / {med['darwin-v5 small']['rss_mb']:.0f} MB, of it anonymous "
              f"{med['darwin-v5']['anon_mb']:.0f} / {med['darwin-v5 small']['anon_mb']:.0f} MB "
              f"for checkpoints of {size / 1e9:.2f} / {checkpoint_bytes(small['father']) / 1e9:.2f} GB")
    print(f"medians of {args.repeat} interleaved rounds; wall = the whole child process (interpreter and imports "
          f"included), engine s = darwin's own merge_report seconds; peak RSS (VmHWM) counts the pages of the "
          f"memory-mapped inputs, anon MB only the memory the process owns (both sampled every 20 ms); "
          f"load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
