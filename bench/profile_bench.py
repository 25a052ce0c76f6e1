"""Phase 0 throughput: `darwin profile` on a ~400M-parameter bf16 Llama, in GB/s of checkpoint read, with peak RSS.

Run: python bench/profile_bench.py [--work .bench] [--size 400m] [--repeat 3]

The checkpoint is built once and cached under --work (random weights drawn straight in bf16 shard by shard, no
transformers init, no model object). Two measurements, each in a fresh child process so their peak RSS figures
do not mix, repeated --repeat times (medians are printed; the machine is shared, so single runs are noise):
- core: `darwin.mri.profile_shard` over every shard, the science with no Prefect;
- flow: the Prefect flow of `darwin profile` end to end (ephemeral Prefect, fan-out per shard, parquet + heatmap).
Files are in the page cache (just written or read by the warm-up), so this is compute plus memory copies, not disk.

merge_bench.py imports `build_llama`, `SIZES` and `run_measured` from here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# LlamaConfig keyword arguments; the parameter counts are those of the built checkpoints.
SIZES = {
    "400m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 26, "num_attention_heads": 16,
              "num_key_value_heads": 16},  # 399.6M
    "100m": {"hidden_size": 640, "intermediate_size": 1792, "num_hidden_layers": 12, "num_attention_heads": 10,
              "num_key_value_heads": 10},  # 101.9M
}
VOCAB = 32000
RESULT = "PROFILE-BENCH-RESULT "  # marks the child's figures among Prefect's log lines
WEIGHT_STD = 0.02


def _generator(name: str, salt: str):
    import torch

    seed = int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def build_llama(out: Path, size: str = "400m", noise_seed: int | None = None, noise_std: float = 0.002,
                shard_mb: int = 512) -> Path:
    """A random bf16 Llama checkpoint at `out` (kept if already there).

    Every tensor of the base is drawn from a generator keyed by its name, so a "fine-tune" (noise_seed given) is
    the very same base plus N(0, noise_std) noise, built without reading the base back.
    """
    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from darwin.checkpoint import CheckpointWriter

    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"],
                         **SIZES[size])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # names and shapes only: nothing is allocated or initialised
    out.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointWriter(out, max_shard_bytes=shard_mb << 20) as writer:
        for name, meta in skeleton.state_dict().items():
            tensor = torch.empty(meta.shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, WEIGHT_STD, generator=_generator(name, size))
            if noise_seed is not None:
                noise = torch.empty_like(tensor).normal_(0.0, noise_std, generator=_generator(name, f"{noise_seed}"))
                tensor += noise
            writer.add(name, tensor)
        writer.write_text("config.json", config.to_json_string())
    return out


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run a command as a child process: its wall seconds and its own peak RSS (from wait4's rusage, so the
    figure is that one process's, never a maximum over earlier children). Prints the output when it fails."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                             env={**os.environ, **(env or {})})
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    text = output.decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({child.returncode}):\n{text[-3000:]}")
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "cpu": usage.ru_utime + usage.ru_stime, "output": text}


def _child(kind: str, model: str, out: str) -> None:
    """One measurement inside this process; prints one JSON line that the parent reads."""
    import_started = time.perf_counter()
    if kind == "core":
        from darwin import mri
        from darwin.checkpoint import Checkpoint

        started = time.perf_counter()
        checkpoint = Checkpoint(model)
        rows = [row for shard in checkpoint.shards for row in mri.profile_shard(checkpoint, shard)]
    else:
        from flows.cli import _quiet_environment
        from flows.profile import profile_flow

        _quiet_environment()
        started = time.perf_counter()
        profile_flow(model, out)
        rows = None
    seconds = time.perf_counter() - started
    print(RESULT + json.dumps({"seconds": seconds, "import_seconds": started - import_started,
                      "tensors": len(rows) if rows is not None else None,
                      "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(kind: str, model: Path, work: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        result = run_measured([sys.executable, __file__, "--child", kind, "--model", str(model),
                               "--out", str(work / f"profile-{kind}")])
        inner = json.loads(result["output"].rpartition(RESULT)[2].splitlines()[0])
        runs.append({**result, **inner})
    return {key: statistics.median(r[key] for r in runs) for key in ("wall", "seconds", "import_seconds", "rss_mb")} | {
        "spread": (min(r["seconds"] for r in runs), max(r["seconds"] for r in runs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench", help="cache of built checkpoints and outputs")
    parser.add_argument("--size", choices=list(SIZES), default="400m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["core", "flow"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.model, args.out)
        return
    started = time.perf_counter()
    model = build_llama(args.work / f"llama-{args.size}" / "base", args.size)
    size = checkpoint_bytes(model)
    print(f"checkpoint {model}: {size / 1e9:.2f} GB in {len(list(model.glob('*.safetensors')))} shards "
          f"(ready in {time.perf_counter() - started:.1f} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'measure':8s} {'seconds':>8s} {'GB/s':>6s} {'min-max s':>12s} {'process s':>10s} {'import s':>9s} "
          f"{'peak RSS MB':>12s}")
    for kind in ("core", "flow"):
        m = measure(kind, model, args.work, args.repeat)
        print(f"{kind:8s} {m['seconds']:8.2f} {size / 1e9 / m['seconds']:6.2f} "
              f"{m['spread'][0]:5.2f}-{m['spread'][1]:<6.2f} {m['wall']:10.2f} {m['import_seconds']:9.2f} "
              f"{m['rss_mb']:12.0f}")
    print(f"medians of {args.repeat} runs, each in a fresh process; seconds = the profile itself (after imports), "
          f"process s = the whole child process; load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
