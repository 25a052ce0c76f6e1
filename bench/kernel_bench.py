"""The merge kernel alone: nanoseconds per element of one thread, for every method, blend and dtype, through the fused
C kernel (darwin/_kernels.c, in the parents' own dtype) and through the torch forms on float32 chunks (the path
without the kernel, and CUDA's), on the same buffers; the outputs are compared bit for bit.

Run: python bench/kernel_bench.py [--elements 16777216] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from darwin import masks  # noqa: E402
from darwin.checkpoint import to_raw, to_torch  # noqa: E402
from darwin.merge import methods  # noqa: E402

CODES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def torch_path(method: str, a, b, c, seed: int, r: float, da: float, db: float, blend: float, code: str):
    spec, out = methods.METHODS[method], torch.empty(a.numel(), dtype=CODES[code])
    for start in range(0, a.numel(), masks.CHUNK):
        stop = min(a.numel(), start + masks.CHUNK)
        ca, cb, cc = (x[start:stop].float() for x in (a, b, c))
        keep_a, keep_b = masks.keep_masks(seed, start, stop, da if spec.needs_base else None, db, "cpu")
        out[start:stop] = methods.torch_merge(spec, ca, cb, cc, keep_a, keep_b, r, da, db, blend).to(CODES[code])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 24)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    seed, r, da, db = 12345, 0.37, 0.7, 0.6
    print(f"{args.elements} elements, one thread, medians of {args.repeat}")
    print(f"{'method':10s} {'blend':>5s} {'dtype':>5s} {'kernel ns/el':>12s} {'torch ns/el':>11s} {'bytes':>9s}")
    for method in methods.METHODS:
        for blend in ((1.0,) if method == "darwin-v5" else (1.0, 0.7)):
            for code, dtype in CODES.items():
                a, b, c = ((torch.randn(args.elements, generator=g) * 0.02).to(dtype) for _ in range(3))
                raws = [to_raw(x) for x in (a, b, c)]
                out = np.empty_like(raws[0])
                kernel, torch_times = [], []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    methods.METHODS[method].kernel(out, *raws, 0, seed, r, da, db, blend, methods.KERNEL_DTYPES[code])
                    kernel.append(time.perf_counter() - started)
                for _ in range(max(1, args.repeat // 2)):
                    started = time.perf_counter()
                    expected = torch_path(method, a, b, c, seed, r, da, db, blend, code)
                    torch_times.append(time.perf_counter() - started)
                same = torch.equal(to_torch(out, code).view(torch.int16 if code != "F32" else torch.int32),
                                   expected.view(torch.int16 if code != "F32" else torch.int32))
                print(f"{method:10s} {blend:5.1f} {code:>5s} {statistics.median(kernel) / args.elements * 1e9:12.2f} "
                      f"{statistics.median(torch_times) / args.elements * 1e9:11.2f} "
                      f"{'identical' if same else 'DIFFER':>9s}", flush=True)


if __name__ == "__main__":
    main()
