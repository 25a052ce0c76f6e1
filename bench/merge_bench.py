"""Merge speed and memory: `darwin merge` with every method against Python floors that read the same checkpoints,
mergekit's dare_ties and, inside a memory cgroup, its peak.

Run: python bench/merge_bench.py [--work .bench] [--repeat 3] [--size 400m] [--small 100m] [--dtype bfloat16]
     [--skip-mergekit] [--skip-cgroup]

Three random Llamas of --size in --dtype (bfloat16 or float16; base; father and mother = base + two independent
N(0, 0.002) noises) are built once under --work (see profile_bench.py). Every contender runs as its own child
process, its wall time and its own peak RSS taken from wait4, interleaved round by round (A B C ... A B C ...) so a
drift of the shared machine hits all of them alike; medians of --repeat rounds are printed.
- darwin-v5 / darwin-v6 blend / dare-ties: the `darwin merge` CLI, genes 0.5 and densities 0.5, statistics
  computed on the fly (no --mri-*); the V6 genome blends (merge_method_weight 0.7, mri_trust 0.5), the dare-ties
  run has --base; darwin-v5 once more with both parents' `darwin profile` output given (--mri-father/--mother, as
  the evolution does), which leaves the merge engine alone;
- floors (what the targets are measured against): a Python process that reads every tensor of the same
  checkpoints the method reads (2: father and mother; 3: with the base) with safetensors and writes one of them
  back, shard by shard (load_file + save_file), so it pays the interpreter and torch's import (imported with the
  garbage collector off, then frozen, as the `darwin` command imports); for reference, one checkpoint's bytes read
  and written by Python (no parsing), and `cp -r` (the kernel copies, no Python);
- mergekit dare_ties: same three models, density 0.5 and weight 1.0 each, `normalize: false` (darwin's dare-ties
  at r = 0.5: weights min(1, 2(1-r)) and min(1, 2r), unnormalised), dtype of the models, CPU,
  `mergekit-yaml config.yaml OUT --lazy-unpickle`, installed into its own venv under --work (torch first, from
  the local CPU wheel, so no CUDA build is pulled);
- darwin-v5 on a --small model too: peak RSS should not grow with the model size;
- a fused-expert pair (one layer, gate_up 512 MiB): the experts merged whole against slice by slice (darwin's
  default above 256 MiB), peak anonymous RSS;
- in a memory cgroup (v2 where its memory controller is enabled, else v1) limited to 1 GiB + 2x the largest
  tensor, once per darwin method after the page cache is dropped (pages a run reads are charged to its cgroup
  only if they are not cached already): the cgroup's peak charge (page cache included, which the kernel reclaims
  at the limit) and whether the merge finished.
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
GENOME_V6 = {**GENOME, **{f"block_{k}": 0.5 for k in range(6)}, "mri_trust": 0.5, "merge_method_weight": 0.7}
# method -> the floor reading the same checkpoints
METHODS = {"darwin-v5": "floor (2 read)", "darwin-v6 blend": "floor (2 read)", "darwin dare-ties": "floor (3 read)"}
TARGET = 1.25  # each method's wall time / its floor's
BYTES_COPY_SCRIPT = """
import sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for path in sorted(src.iterdir()):
    (dst / path.name).write_bytes(path.read_bytes())
"""
FLOOR_SCRIPT = """
import gc
gc.disable()
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
gc.freeze()
gc.enable()
sources, dst = [Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1])
dst.mkdir()
for path in sorted(sources[0].iterdir()):
    if path.suffix == ".safetensors":
        tensors = [load_file(source / path.name) for source in sources]
        save_file(tensors[0], dst / path.name, metadata={"format": "pt"})
        del tensors
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


def mergekit_config(models: dict[str, Path], path: Path, dtype: str) -> Path:
    import yaml

    config = {
        "merge_method": "dare_ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[role]), "parameters": {"weight": 1.0, "density": 0.5}}
                   for role in ("father", "mother")],
        "parameters": {"normalize": False},
        "dtype": dtype,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def darwin_runs(work: Path, models: dict[str, Path]) -> dict:
    """method -> (command, output directory) of `darwin merge`; every command writes a fresh OUT."""
    genomes = {}
    for name, genes in (("v5", GENOME), ("v6", GENOME_V6)):
        genomes[name] = work / f"genome-{name}.json"
        genomes[name].write_text(json.dumps(genes))
    out = work / "merge-out"
    darwin = [sys.executable, "-m", "flows.cli", "merge"]
    parents = ["--father", str(models["father"]), "--mother", str(models["mother"])]
    return {
        "darwin-v5": (darwin + parents + ["--genome", str(genomes["v5"]), "--method", "darwin-v5",
                                          "--out", str(out / "v5")], out / "v5"),
        "darwin-v6 blend": (darwin + parents + ["--genome", str(genomes["v6"]), "--method", "darwin-v6",
                                                "--out", str(out / "v6")], out / "v6"),
        "darwin dare-ties": (darwin + parents + ["--genome", str(genomes["v5"]), "--method", "dare-ties",
                                                 "--base", str(models["base"]), "--out", str(out / "dare")],
                             out / "dare"),
    }


def contenders(work: Path, models: dict[str, Path], small: dict[str, Path] | None, venv: Path | None,
               dtype: str) -> dict:
    """name -> (command, output directory); every command writes a fresh OUT."""
    table = darwin_runs(work, models)
    out = work / "merge-out"
    v5 = table["darwin-v5"][0]
    mri = ["--mri-father", str(profile(models["father"], work)), "--mri-mother", str(profile(models["mother"], work))]
    table["darwin-v5 MRI given"] = ([*v5[:-2], *mri, "--out", str(out / "v5mri")], out / "v5mri")
    if venv is not None:
        config = mergekit_config(models, work / "mergekit.yaml", dtype)
        table["mergekit dare_ties"] = ([str(venv / "bin" / "mergekit-yaml"), str(config), str(out / "mergekit"),
                                        "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"], out / "mergekit")
    for reads, roles in ((2, ("father", "mother")), (3, ("father", "mother", "base"))):
        table[f"floor ({reads} read)"] = ([sys.executable, "-c", FLOOR_SCRIPT, *(str(models[r]) for r in roles),
                                           str(out / f"floor{reads}")], out / f"floor{reads}")
    table["copy (Python bytes)"] = ([sys.executable, "-c", BYTES_COPY_SCRIPT, str(models["father"]),
                                     str(out / "bytes")], out / "bytes")
    table["copy (cp -r)"] = (["cp", "-r", str(models["father"]), str(out / "cp")], out / "cp")
    if small is not None:
        small_v5 = darwin_runs(work, small)["darwin-v5"][0]
        table["darwin-v5 small"] = ([*small_v5[:-2], "--out", str(out / "small")], out / "small")
    return table


class MemoryCgroup:
    """A memory cgroup of its own with a hard limit and no swap: v2 where the unified hierarchy has the memory
    controller, else v1's memory hierarchy. `wrap(command)` runs the command inside it; `peak_mb` and `oom` after."""

    def __init__(self, limit: int):
        v2 = Path("/sys/fs/cgroup")
        v2 = next((root for root in (v2, v2 / "unified") if "memory" in _read(root / "cgroup.controllers").split()),
                  None)
        if v2 is not None:
            self.path, self.v2 = v2 / f"darwin-bench-{os.getpid()}", True
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / f"darwin-bench-{os.getpid()}", False
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def wrap(self, command: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *command]

    @property
    def peak_mb(self) -> float:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int(_read(self.path / name) or 0) / 2**20

    @property
    def oom(self) -> bool:
        events = _read(self.path / ("memory.events" if self.v2 else "memory.oom_control"))
        return int(dict(line.split() for line in events.splitlines()).get("oom_kill", 0)) > 0

    def close(self) -> None:
        self.path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_runs(work: Path, models: dict[str, Path]) -> None:
    """Every darwin method once in its own memory cgroup of 1 GiB + 2x the largest tensor, from a cold page cache."""
    from darwin.checkpoint import Checkpoint

    largest = max(info.nbytes for info in Checkpoint(models["father"]).tensors.values())
    limit = (1 << 30) + 2 * largest
    print(f"\nin a memory cgroup of {limit / 2**30:.2f} GiB (1 GiB + 2x the largest tensor, "
          f"{largest / 2**20:.0f} MiB), page cache dropped before each run:")
    for name, (command, out) in darwin_runs(work, models).items():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
        except OSError:
            print("  (the page cache could not be dropped: pages cached already are not charged to the cgroup)")
        try:
            group = MemoryCgroup(limit)
        except OSError as exc:
            print(f"  no memory cgroup can be made here ({exc}); skipped")
            return
        try:
            try:
                result = run_measured(group.wrap(command), cwd=ROOT, env={"HF_HUB_OFFLINE": "1"})
                status = "finished"
            except RuntimeError as exc:
                result, status = {"wall": float("nan")}, f"FAILED ({str(exc).splitlines()[0][:80]})"
            print(f"  {name:20s} {result['wall']:7.2f} s  cgroup peak {group.peak_mb:6.0f} MiB  {status}"
                  f"{'  (OOM kill)' if group.oom else ''}", flush=True)
        finally:
            group.close()
        shutil.rmtree(out, ignore_errors=True)


def profile(model: Path, work: Path) -> Path:
    """The static MRI of a parent (`darwin profile`'s core, without Prefect), made afresh by every run: a profile
    kept from an older darwin held other statistics, so the "MRI given" merge wrote another child. In a child
    process: a parent that held the checkpoint's pages would lend its RSS to every child forked after it."""
    out = work / "mri" / f"{model.parent.name}-{model.name}"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, str(model), str(out)], cwd=ROOT, check=True)
    return out


FUSED_SCRIPT = """
import sys
import darwin.merge.engine
darwin.merge.engine.STREAM_BYTES = int(sys.argv[1])
from flows.cli import main
sys.exit(main(sys.argv[2:]))
"""


def fused_family(work: Path) -> dict[str, Path]:
    """Father and mother of one Qwen3.5-MoE-like layer whose fused experts dominate: gate_up [64, 2048, 2048] bf16
    (512 MiB, half a 35B-A3B's layer), down_proj [64, 2048, 1024], beside a 16 MiB embedding."""
    import torch
    from safetensors.torch import save_file

    shapes = {"model.embed_tokens.weight": (4096, 2048), "model.layers.0.mlp.experts.gate_up_proj": (64, 2048, 2048),
              "model.layers.0.mlp.experts.down_proj": (64, 2048, 1024)}
    config = {"model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"], "hidden_size": 2048,
              "num_hidden_layers": 1, "num_experts": 64, "moe_intermediate_size": 1024, "vocab_size": 4096}
    paths = {}
    for role, seed in (("father", 1), ("mother", 2)):
        paths[role] = work / "fused-moe" / role
        if not (paths[role] / "model.safetensors").exists():
            paths[role].mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(seed)
            save_file({n: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for n, shape in shapes.items()},
                      paths[role] / "model.safetensors", metadata={"format": "pt"})
            (paths[role] / "config.json").write_text(json.dumps(config))
    return paths


def fused_runs(work: Path, repeat: int) -> None:
    """`darwin merge` of the fused-expert pair with the experts merged whole and slice by slice: peak anonymous
    RSS, the memory the merge owns."""
    paths = fused_family(work)
    genome = work / "genome-v5.json"
    genome.write_text(json.dumps(GENOME))
    out = work / "merge-out" / "fused"
    print("\nfused experts (gate_up 512 MiB, down 256 MiB): merged whole against slice by slice", flush=True)
    for label, threshold in (("whole", 1 << 50), ("slice by slice", 0)):
        results = []
        for _ in range(repeat):
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            results.append(run_measured([sys.executable, "-c", FUSED_SCRIPT, str(threshold), "merge", "--father",
                                         str(paths["father"]), "--mother", str(paths["mother"]), "--genome",
                                         str(genome), "--method", "darwin-v5", "--out", str(out)], cwd=ROOT))
        print(f"  {label:15s} wall {statistics.median(r['wall'] for r in results):6.2f} s  peak anon "
              f"{statistics.median(r['anon_mb'] for r in results):6.0f} MB  peak RSS "
              f"{statistics.median(r['rss_mb'] for r in results):6.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def build_family(work: Path, size: str, dtype: str) -> dict[str, Path]:
    root = work / (f"llama-{size}" if dtype == "bfloat16" else f"llama-{size}-{dtype}")
    return {role: build_llama(root / role, size, noise_seed=seed, dtype=dtype)
            for role, seed in (("base", None), ("father", 1), ("mother", 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench")
    parser.add_argument("--size", choices=list(SIZES), default="400m")
    parser.add_argument("--small", choices=list(SIZES), default="100m", help="second size for the RSS comparison")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-cgroup", action="store_true")
    args = parser.parse_args()
    args.work = args.work.resolve()
    started = time.perf_counter()
    models = build_family(args.work, args.size, args.dtype)
    small = build_family(args.work, args.small, args.dtype) if args.small != args.size else None
    venv = None if args.skip_mergekit else mergekit_venv(args.work)
    size = checkpoint_bytes(models["father"])
    small_text = f"; {args.small}: {checkpoint_bytes(small['father']) / 1e9:.2f} GB" if small else ""
    print(f"{args.size} {args.dtype} Llama: {size / 1e9:.2f} GB per checkpoint{small_text} (ready in "
          f"{time.perf_counter() - started:.0f} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    table = contenders(args.work, models, small, venv, args.dtype)
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
    for name, floor in METHODS.items():
        line = f"{name}: / {floor} {med[name]['wall'] / med[floor]['wall']:.2f} (target <= {TARGET})"
        if "mergekit dare_ties" in med:
            line += f", / mergekit {med[name]['wall'] / med['mergekit dare_ties']['wall']:.2f}"
        line += (f"; for reference / Python bytes copy {med[name]['wall'] / med['copy (Python bytes)']['wall']:.2f}, "
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
    if not args.skip_cgroup:
        cgroup_runs(args.work, models)
    fused_runs(args.work, args.repeat)


if __name__ == "__main__":
    main()
