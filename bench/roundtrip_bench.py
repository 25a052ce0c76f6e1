"""nvfp4a16 roundtrip error decoded as vLLM decodes it: one global scale per fused kernel (q/k/v, gate/up, the max of
the parts' scales), against the per-tensor global scales compressed-tensors' own per-layer flow gives.

    python bench/roundtrip_bench.py [--hidden 1024] [--seed 0]

Weights are random with the spread of magnitudes real projections have (k and v smaller than q, up smaller than
gate); what it prints is each projection's relative Frobenius error, decoded with the scale it was written with
("per tensor, as written") and with the scale vLLM's loader uses ("per tensor, as vLLM reads it" is what a
checkpoint without shared scales gives in vLLM; "shared" is darwin's nvfp4a16).
"""

from __future__ import annotations

import argparse

import torch

from darwin.quantize.nvfp4a16 import compress_weight
from darwin.quantize.roundtrip import decode_nvfp4

# projection -> (fused group, shape in hidden units (out, in), magnitude relative to q_proj)
PROJECTIONS = {"q_proj": ("qkv", (1, 1), 1.0), "k_proj": ("qkv", (0.25, 1), 0.6), "v_proj": ("qkv", (0.25, 1), 0.35),
               "gate_proj": ("gate_up", (3, 1), 1.0), "up_proj": ("gate_up", (3, 1), 0.7),
               "down_proj": ("down", (1, 3), 1.0)}


def relative(decoded: torch.Tensor, weight: torch.Tensor) -> float:
    return ((decoded - weight).norm() / weight.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    weights = {name: (torch.randn(int(rows * args.hidden), int(cols * args.hidden), generator=generator) * 0.02 * size)
               .to(torch.bfloat16).float() for name, (_, (rows, cols), size) in PROJECTIONS.items()}
    groups: dict[str, list[str]] = {}
    for name, (group, _, _) in PROJECTIONS.items():
        groups.setdefault(group, []).append(name)
    print(f"hidden {args.hidden}, seed {args.seed}: relative Frobenius error of nvfp4a16 per projection\n")
    print("| projection | per tensor, as written | per tensor, as vLLM reads it | shared (darwin) |")
    print("|---|---|---|---|")
    for group, names in groups.items():
        amax = torch.stack([weights[n].abs().max() for n in names]).max()
        own = {n: compress_weight(weights[n]) for n in names}
        shared = {n: compress_weight(weights[n], amax) for n in names}
        # vLLM: one kernel for the group, its global scale the largest of the parts' (a divisor here)
        read_scale = torch.stack([own[n]["weight_global_scale"] for n in names]).max()
        for n in names:
            shape = tuple(weights[n].shape)
            as_written = decode_nvfp4(own[n]["weight_packed"], own[n]["weight_scale"],
                                      own[n]["weight_global_scale"], True, shape)
            as_read = decode_nvfp4(own[n]["weight_packed"], own[n]["weight_scale"], read_scale, True, shape)
            darwin = decode_nvfp4(shared[n]["weight_packed"], shared[n]["weight_scale"],
                                  shared[n]["weight_global_scale"], True, shape)
            print(f"| {n} | {relative(as_written, weights[n]):.4f} | {relative(as_read, weights[n]):.4f} | "
                  f"{relative(darwin, weights[n]):.4f} |")


if __name__ == "__main__":
    main()
