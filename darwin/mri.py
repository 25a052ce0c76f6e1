"""Phase 0, static MRI: per-tensor norm, std and entropy, and the static scores of SPEC.md.

`norm` is the Frobenius norm, `std` the unbiased standard deviation (0 for a single element, where torch.std is
undefined), `entropy` the Shannon entropy in bits of a 256-bin histogram over [min, max] (0 for a constant tensor,
nan with inf or nan values). A 16-bit float tensor (bf16, fp16: what checkpoints hold) has at most 65,536 distinct
values, so its statistics follow exactly, in float64, from how often each bit pattern occurs: one counting pass (C on
CPU, bincount on CUDA) instead of float32 passes over a converted copy. Other dtypes are computed in float32 on the
tensor's device.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from darwin.checkpoint import Checkpoint, dtype_name
from darwin.report import png, read_table, write_table

if TYPE_CHECKING:  # pandas is imported where a frame is made: `darwin merge` starts without it
    import pandas as pd

try:
    from darwin import _kernels
except ImportError:  # no C compiler at install time: bincount instead
    _kernels = None

BINS = 256
COLUMNS = ["name", "shard", "kind", "block", "dtype", "shape", "numel", "norm", "std", "entropy"]
SCORE_WEIGHTS = {"v5": (0.5, 0.3, 0.002), "v6": (0.3, 0.2, 0.002)}  # entropy, std, min(norm, 100)


PATTERNS = 1 << 16
SIXTEEN_BIT_FLOATS = (torch.bfloat16, torch.float16)


def bit_pattern_counts(tensor: torch.Tensor) -> torch.Tensor:
    """How many elements of a 16-bit tensor hold each bit pattern: int64[65536] on the CPU."""
    bits = tensor.detach().contiguous().reshape(-1).view(torch.int16)
    if bits.device.type == "cpu" and _kernels is not None:
        counts = torch.zeros(PATTERNS, dtype=torch.int64)
        _kernels.bit_counts(counts.numpy(), bits.numpy())
        return counts
    return torch.bincount(bits.to(torch.int32) & (PATTERNS - 1), minlength=PATTERNS).cpu()


@functools.cache
def _pattern_values(dtype: torch.dtype) -> np.ndarray:
    return torch.arange(PATTERNS, dtype=torch.int32).to(torch.int16).view(dtype).double().numpy()


def tensor_stats(tensor: torch.Tensor) -> dict[str, float]:
    if tensor.dtype in SIXTEEN_BIT_FLOATS and tensor.numel():
        counts = bit_pattern_counts(tensor).numpy()
        seen = np.flatnonzero(counts)
        values = _pattern_values(tensor.dtype)[seen]
        if np.isfinite(values).all():  # inf or nan: the float32 path gives what torch gives
            return _stats_from_counts(values, counts[seen].astype(np.float64))
    x = tensor.detach().reshape(-1).float()
    norm = torch.linalg.vector_norm(x)
    std = x.std() if x.numel() > 1 else torch.zeros((), device=x.device)
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):  # a broken tensor shows as nan, not as a crash
        entropy = torch.full((), math.nan)
    elif bool(lo == hi):
        entropy = torch.zeros((), device=x.device)
    else:
        counts = torch.histc(x, bins=BINS, min=float(lo), max=float(hi))
        p = counts[counts > 0] / x.numel()
        entropy = -(p * torch.log2(p)).sum()
    return {"norm": float(norm), "std": float(std), "entropy": float(entropy)}


def _stats_from_counts(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """The same statistics from each distinct value and how often it occurs, in float64 numpy: these few thousand
    values need no torch op, whose intra-op threads would only contend with the merge's own threads."""
    n = counts.sum()
    mean = (counts * values).sum() / n
    std = math.sqrt((counts * (values - mean) ** 2).sum() / (n - 1)) if n > 1 else 0.0
    lo, hi = values.min(), values.max()
    entropy = 0.0
    if lo < hi:
        hist, _ = np.histogram(values, bins=BINS, range=(lo, hi), weights=counts)
        p = hist[hist > 0] / n
        entropy = -(p * np.log2(p)).sum()
    return {"norm": math.sqrt((counts * values * values).sum()), "std": float(std), "entropy": float(entropy)}


def static_score(stats: dict[str, float], version: str) -> float:
    w_entropy, w_std, w_norm = SCORE_WEIGHTS[version]
    return stats["entropy"] * w_entropy + stats["std"] * w_std + min(stats["norm"], 100.0) * w_norm


def profile_shard(checkpoint: Checkpoint, shard: str, device: str = "cpu") -> list[dict]:
    """One row per tensor of one shard; tensors are read and released one at a time."""
    rows = []
    for name in checkpoint.names(shard):
        info = checkpoint.tensors[name]
        kind, block = checkpoint.kind(name)
        stats = tensor_stats(checkpoint.read(name).to(device))
        rows.append({"name": name, "shard": shard, "kind": kind, "block": block, "dtype": dtype_name(info.dtype),
                     "shape": list(info.shape), "numel": info.numel, **stats})
    return rows


def to_frame(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["block"] = frame["block"].astype("Int64")
    return frame


def write_profile(frame: pd.DataFrame, out: Path) -> Path:
    """`mri.parquet` plus `mri.png` (layer x kind heatmaps of entropy and std), each written atomically."""
    return write_table(frame, out, "mri", heatmap_png(frame))


def read_profile(path: Path) -> pd.DataFrame:
    return read_table(path, "mri", "run `darwin profile` first")


def layer_table(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of a statistic per decoder layer (rows) and kind (columns)."""
    layered = frame.dropna(subset=["block"])
    return layered.pivot_table(index="block", columns="kind", values=column, aggfunc="mean").sort_index()


def heatmap_png(frame: pd.DataFrame) -> bytes:
    from matplotlib.figure import Figure

    stats = ("entropy", "std")
    fig = Figure(figsize=(11, 0.25 * max(8, frame["block"].nunique()) + 2))
    axes = fig.subplots(1, len(stats))
    for ax, column in zip(axes, stats):
        table = layer_table(frame, column)
        if table.empty:
            ax.set_axis_off()
            continue
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(table.columns)), table.columns, rotation=45, ha="right")
        step = max(1, math.ceil(len(table.index) / 20))
        ax.set_yticks(range(0, len(table.index), step), table.index[::step])
        ax.set_ylabel("layer")
        ax.set_title(f"{column} (mean per layer and kind)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return png(fig)


def summary_table(frame: pd.DataFrame) -> list[dict]:
    """Per kind: tensor count, parameters and mean statistics (the artifact a person reads first)."""
    grouped = frame.groupby("kind").agg(tensors=("name", "count"), params=("numel", "sum"), norm=("norm", "mean"),
                                        std=("std", "mean"), entropy=("entropy", "mean")).reset_index()
    return grouped.round(4).to_dict(orient="records")
