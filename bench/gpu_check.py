"""The GPU check: what darwin does on CUDA, measured on one GPU, in one run (`bench/gpu_check.sh` installs what it
needs and calls this).

1. Merge on CUDA against CPU: three random 400M bf16 Llamas (profile_bench.build_llama), darwin-v5, darwin-v6 with
   the blend and dare-ties, each merged on both; every output shard must be byte-identical.
2. One Phase 2 candidate on a ~1B-parameter synthetic Qwen3.5 (hybrid linear / full attention, byte tokenizer):
   `fitness.evaluate_genome` (in-memory dare-ties merge into the father's skeleton, lm-eval on ARC-Challenge's
   validation split through darwin's local task YAML), twice: the first pays the skeleton's load, the second is
   what every later candidate costs.
3. `darwin quantize --scheme mfp4` on CUDA: ModelOpt's NVFP4 calibration (its own CUDA fake-quant, not darwin's CPU
   backend) and export of that model, with the roundtrip report.

Figures go to stdout and OUT/gpu_check.json. `--dry-run` runs the same code on this machine's CPU at sizes that
take seconds (a 100M Llama, a ~10M Qwen3.5, ARC limited to 20 questions), CPU against CPU.

Run: python bench/gpu_check.py --arc DIR --out OUT [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

# Qwen3.5 sizes: ~1.0B parameters on the GPU, ~10M for the dry run
QWEN35 = {
    "gpu": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, head_dim=128, linear_key_head_dim=128, linear_num_key_heads=16,
                linear_num_value_heads=32, linear_value_head_dim=128),
    "dry": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, linear_key_head_dim=64, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_value_head_dim=64),
}
GENOMES = {
    "darwin-v5": {"global_ratio": 0.5, "attn_ratio": 0.4, "ffn_ratio": 0.6, "embed_ratio": 0.5,
                  "density_a": 0.7, "density_b": 0.6},
}
GENOMES["darwin-v6"] = {**GENOMES["darwin-v5"], **{f"block_{k}": 0.5 for k in range(4)}, "mri_trust": 0.5,
                        "merge_method_weight": 0.7}
GENOMES["dare-ties"] = GENOMES["darwin-v5"]


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - started, 3)


def shard_digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def merge_check(work: Path, size: str, device: str) -> dict:
    """Each method merged on CPU (the C kernel) and on `device`; on CPU alone (the dry run), the C kernel against
    the torch path, which is what CUDA runs."""
    from profile_bench import build_llama

    from darwin.checkpoint import Checkpoint
    from darwin.genome import Genome
    from darwin.merge import merge_to_dir, methods, plan_merge

    models, seconds = timed(lambda: {role: Checkpoint(build_llama(work / f"llama-{size}" / role, size, noise_seed=s))
                                     for role, s in (("base", None), ("father", 1), ("mother", 2))})
    result = {"model": f"{size} bf16 Llama", "build_seconds": seconds, "methods": {}}
    kernels = methods._kernels
    runs = (("cpu", "cpu", kernels), (device, device, kernels)) if device != "cpu" else \
        (("cpu", "cpu", kernels), ("cpu-torch", "cpu", None))
    for method, genes in GENOMES.items():
        row, digests = {}, []
        for label, on, kernel in runs:
            methods._kernels = kernel
            plan = plan_merge(models["father"], models["mother"], Genome.from_dict(genes), method,
                              base=models["base"] if method == "dare-ties" else None)
            out = work / f"merge-{method}-{label}"
            _, row[f"{label}_seconds"] = timed(lambda: merge_to_dir(plan, out, device=on, overwrite=True))
            digests.append(shard_digests(out))
        methods._kernels = kernels
        row["identical"] = digests[0] == digests[1]
        result["methods"][method] = row
    return result


def synthetic_qwen35(work: Path, sizes: dict, device: str) -> dict[str, Path]:
    """Base, father and mother (father and mother: base + independent N(0, 0.002) noise), bf16, byte tokenizer."""
    import picotok
    import torch
    import transformers as tf

    config = tf.Qwen3_5TextConfig(vocab_size=320, max_position_embeddings=4096, tie_word_embeddings=False,
                                  layer_types=["linear_attention", "linear_attention", "linear_attention",
                                               "full_attention"] * (sizes["num_hidden_layers"] // 4),
                                  linear_conv_kernel_dim=4, **sizes)
    config.architectures = ["Qwen3_5ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.Qwen3_5ForCausalLM(config).to(torch.bfloat16).eval()
    base = {name: p.detach().clone() for name, p in model.state_dict().items()}
    paths = {}
    for role, seed in (("base", None), ("father", 1), ("mother", 2)):
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(seed or 0)
            for name, p in model.state_dict().items():
                p.copy_(base[name])
                if seed is not None and p.is_floating_point():
                    p.add_((torch.randn(p.shape, generator=g, device=device) * 0.002).to(p.dtype))
        paths[role] = work / f"qwen35-{role}"
        model.save_pretrained(paths[role])
        picotok.save_beside(paths[role])
    paths["parameters"] = sum(p.numel() for p in model.parameters())
    return paths


def phase2_check(work: Path, arc: Path, sizes: dict, device: str, limit: int | None, batch_size: int | str
                 ) -> tuple[dict, dict]:
    from darwin.evaluate import arc_task_file, prepared_tasks
    from darwin.fitness import FitnessCache, evaluate_genome
    from darwin.genome import Genome
    from darwin.parents import Parents

    paths, build_seconds = timed(lambda: synthetic_qwen35(work, sizes, device))
    task = arc_task_file(arc, work / "tasks")
    tasks = prepared_tasks((str(task),), split="validation")
    parents = Parents(str(paths["father"]), str(paths["mother"]), "dare-ties", base=str(paths["base"]))
    cache = FitnessCache(work / "fitness-cache")
    runs = []
    for k, ratio in enumerate((0.5, 0.6)):
        genome = Genome.from_dict({**GENOMES["dare-ties"], "global_ratio": ratio})
        record, seconds = timed(lambda: evaluate_genome(parents, genome, tasks, limit=limit, batch_size=batch_size,
                                                        device=device, cache=cache))
        runs.append({"candidate": k + 1, "seconds": seconds, "merge_seconds": record.merge_seconds,
                     "eval_seconds": record.eval_seconds, "fitness": record.fitness,
                     "questions": sum(len(v) for v in record.per_question.values())})
    return {"model": f"synthetic Qwen3.5, {paths['parameters'] / 1e6:.0f}M parameters, bf16",
            "build_seconds": build_seconds, "task": "arc_challenge_local validation", "candidates": runs}, paths


def quantize_check(work: Path, child: Path, device: str, samples: int) -> dict:
    from darwin.quantize import quantize
    from darwin.quantize.calibration import calibration_set

    calibration = calibration_set(samples=samples)
    out, seconds = timed(lambda: quantize(child, "mfp4", work / "mfp4", calibration=calibration, device=device))
    overall = json.loads((out / "roundtrip.json").read_text())["overall"]
    return {"scheme": "mfp4", "device": device, "calibration_texts": len(calibration.texts), "seconds": seconds,
            "quantized_tensors": overall["quantized_tensors"], "relative_frobenius": overall["relative_frobenius"],
            "size_ratio": overall["size_ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arc", type=Path, required=True, help="directory with ARC-Challenge's jsonl splits")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a fresh temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU parts, at small sizes, on this machine")
    args = parser.parse_args()
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run for the CPU parts)")
    device = "cpu" if dry else "cuda"
    work = args.work or Path(tempfile.mkdtemp(prefix="darwin-gpu-check-"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if not dry else None, "dry_run": dry}}
    import transformers

    report["machine"]["transformers"] = transformers.__version__

    def step(name, fn):
        started = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # one failed part must not hide the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        report[name]["wall_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {json.dumps(report[name])}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    step("merge", lambda: merge_check(work, "100m" if dry else "400m", device))
    paths = {}

    def phase2():
        result, built = phase2_check(work, args.arc, QWEN35["dry" if dry else "gpu"], device, 20 if dry else None,
                                     16 if dry else "auto")
        paths.update(built)
        return result

    step("phase2", phase2)
    step("mfp4", lambda: quantize_check(work, paths["father"], device, 4 if dry else 64))


if __name__ == "__main__":
    main()
