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
import statistics
import subprocess
import sys
import threading
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
                shard_mb: int = 512, dtype: str = "bfloat16") -> Path:
    """A random Llama checkpoint at `out` in `dtype` (a torch dtype's name; kept if already there).

    Every tensor of the base is drawn from a generator keyed by its name, so a "fine-tune" (noise_seed given) is
    the very same base plus N(0, noise_std) noise, built without reading the base back.
    """
    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from darwin.checkpoint import CheckpointWriter

    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, dtype=dtype, architectures=["LlamaForCausalLM"],
                         **SIZES[size])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # names and shapes only: nothing is allocated or initialised
    out.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointWriter(out, max_shard_bytes=shard_mb << 20) as writer:
        for name, meta in skeleton.state_dict().items():
            tensor = torch.empty(meta.shape, dtype=getattr(torch, dtype))
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


def _sample_rss(pid: int, peaks: dict[str, float], done: threading.Event) -> None:
    """Peaks of a process's RSS, sampled every 20 ms from /proc/PID/status (Linux).

    VmHWM is the kernel's own high-water mark of the process's RSS. (wait4's ru_maxrss is not used: when the
    child is forked before its exec, it starts out counting the parent's pages.) RSS counts the pages of
    memory-mapped files too: safetensors maps every shard it reads, so a reader's RSS grows with the files it
    touches although the kernel may drop those pages at any time; RssAnon is the memory the process owns."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            return
        for key, column in (("VmHWM", "rss_mb"), ("RssAnon", "anon_mb")):
            if key in fields:
                peaks[column] = max(peaks[column], int(fields[key].split()[0]) / 1024)
        if done.wait(0.02):
            return


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run a command as a child process: wall seconds, CPU seconds (wait4), and the sampled peaks of its RSS and
    of its anonymous RSS. Raises with the end of its output when it fails."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                             env={**os.environ, **(env or {})})
    peaks, done = {"rss_mb": 0.0, "anon_mb": 0.0}, threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(child.pid, peaks, done), daemon=True)
    sampler.start()
    output = child.stdout.read()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    text = output.decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({child.returncode}):\n{text[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "output": text, **peaks}


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
        from flows.mri import profile_flow

        started = time.perf_counter()
        profile_flow(model, out)
        rows = None
    seconds = time.perf_counter() - started
    print(RESULT + json.dumps({"seconds": seconds, "import_seconds": started - import_started,
                      "tensors": len(rows) if rows is not None else None}))


def measure(kind: str, model: Path, work: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        result = run_measured([sys.executable, __file__, "--child", kind, "--model", str(model),
                               "--out", str(work / f"profile-{kind}")])
        inner = json.loads(result["output"].rpartition(RESULT)[2].splitlines()[0])
        runs.append({**result, **inner})
    keys = ("wall", "seconds", "import_seconds", "rss_mb", "anon_mb")
    return {key: statistics.median(r[key] for r in runs) for key in keys} | {
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
          f"{'peak RSS MB':>12s} {'anon MB':>8s}")
    for kind in ("core", "flow"):
        m = measure(kind, model, args.work, args.repeat)
        print(f"{kind:8s} {m['seconds']:8.2f} {size / 1e9 / m['seconds']:6.2f} "
              f"{m['spread'][0]:5.2f}-{m['spread'][1]:<6.2f} {m['wall']:10.2f} {m['import_seconds']:9.2f} "
              f"{m['rss_mb']:12.0f} {m['anon_mb']:8.0f}")
    print(f"medians of {args.repeat} runs, each in a fresh process; seconds = the profile itself (after imports), "
          f"process s = the whole child process; peak RSS (VmHWM) counts the mapped checkpoint pages, anon MB "
          f"does not (both sampled every 20 ms); load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
