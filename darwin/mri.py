"""Phase 0, static MRI: per-tensor norm, std and entropy, and the static scores of docs/method.md.

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

from darwin.checkpoint import Checkpoint, dtype_name, st_dtype, to_torch
from darwin.experts import expert_slices
from darwin.genome import genome_version
from darwin.report import png, write_table

if TYPE_CHECKING:  # pandas is imported where a frame is made, torch where a tensor is: `darwin merge` starts without
    import pandas as pd
    import torch

try:
    from darwin import _kernels
except ImportError:  # no C compiler at install time: bincount instead
    _kernels = None

BINS = 256
PROFILE_HINT = "run `darwin profile` first"
COLUMNS = ["name", "shard", "kind", "block", "expert", "dtype", "shape", "numel", "norm", "std", "entropy"]


PATTERNS = 1 << 16
SIXTEEN_BIT_FLOATS = ("BF16", "F16")


def pattern_counts(bits: np.ndarray) -> np.ndarray:
    """How many of a CPU array's 16-bit values hold each bit pattern: int64[65536]."""
    bits = np.ascontiguousarray(bits).reshape(-1).view(np.uint16)
    if _kernels is None:
        return np.bincount(bits, minlength=PATTERNS)
    counts = np.zeros(PATTERNS, dtype=np.int64)
    _kernels.bit_counts(counts, bits)
    return counts


def bit_pattern_counts(tensor: torch.Tensor) -> np.ndarray:
    """`pattern_counts` of a 16-bit tensor on any device (bincount where it lives, off the CPU)."""
    import torch

    bits = tensor.detach().contiguous().reshape(-1).view(torch.int16)
    if bits.device.type == "cpu":
        return pattern_counts(bits.numpy())
    return torch.bincount(bits.to(torch.int32) & (PATTERNS - 1), minlength=PATTERNS).cpu().numpy()


@functools.cache
def _pattern_values(code: str) -> np.ndarray:
    """The float64 value of every 16-bit pattern of a bf16 or fp16 tensor (both widen exactly)."""
    patterns = np.arange(PATTERNS, dtype=np.uint32)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns: never used, `_stats_from_pattern_counts` checks
        if code == "BF16":
            return (patterns << 16).view(np.float32).astype(np.float64)
        return patterns.astype(np.uint16).view(np.float16).astype(np.float64)


def array_stats(raw: np.ndarray, code: str) -> dict[str, float]:
    """`tensor_stats` of a CPU tensor given as raw bits (`Checkpoint.read_array`) and its safetensors dtype: a 16-bit
    float tensor is counted without torch."""
    if code in SIXTEEN_BIT_FLOATS and raw.size:
        stats = _stats_from_pattern_counts(pattern_counts(raw), code)
        if stats is not None:
            return stats
    return _float32_stats(to_torch(raw, code))


def tensor_stats(tensor: torch.Tensor) -> dict[str, float]:
    code = st_dtype(tensor.dtype)
    if code in SIXTEEN_BIT_FLOATS and tensor.numel():
        stats = _stats_from_pattern_counts(bit_pattern_counts(tensor), code)
        if stats is not None:
            return stats
    return _float32_stats(tensor)


def _float32_stats(tensor: torch.Tensor) -> dict[str, float]:
    """The statistics in float32 on the tensor's device: dtypes that are not counted, and 16-bit tensors holding inf
    or nan (what torch gives for those)."""
    import torch

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


def _stats_from_pattern_counts(counts: np.ndarray, code: str) -> dict[str, float] | None:
    """The statistics from how often each bit pattern occurs, in float64 numpy: these few thousand values need no
    torch op, whose intra-op threads would only contend with the merge's own threads. None with inf or nan values:
    the float32 path then gives what torch gives."""
    seen = np.flatnonzero(counts)
    values = _pattern_values(code)[seen]
    if not np.isfinite(values).all():
        return None
    counts = counts[seen].astype(np.float64)
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
    w_entropy, w_std, w_norm = genome_version(version).score_weights
    return stats["entropy"] * w_entropy + stats["std"] * w_std + min(stats["norm"], 100.0) * w_norm


def profile_shard(checkpoint: Checkpoint, shard: str, device: str = "cpu") -> list[dict]:
    """One row per tensor of one shard, its `expert` set for a per-expert tensor; a fused expert tensor is followed
    by one row per expert slice, named `NAME[e]` (`darwin.experts`). Tensors are read and released one at a time."""
    rows = []
    for name in checkpoint.names(shard):
        info = checkpoint.tensors[name]
        kind, block = checkpoint.kind(name)
        tensor = checkpoint.read(name).to(device)
        experts = expert_slices(name, info.shape)
        row = {"name": name, "shard": shard, "kind": kind, "block": block, "dtype": dtype_name(info.dtype)}
        rows.append({**row, "expert": experts[0] if len(experts) == 1 else None, "shape": list(info.shape),
                     "numel": info.numel, **tensor_stats(tensor)})
        if len(experts) > 1:
            rows += [{**row, "name": f"{name}[{e}]", "expert": e, "shape": list(info.shape[1:]),
                      "numel": info.numel // info.shape[0], **tensor_stats(tensor[e])} for e in experts]
    return rows


def tensor_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The profile's whole-tensor rows, without the expert slices of fused tensors."""
    return frame[~frame["name"].str.endswith("]")]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("block", "expert"):
        frame[column] = frame[column].astype("Int64")
    return frame


def write_profile(frame: pd.DataFrame, out: Path) -> Path:
    """`mri.parquet` plus `mri.png` (layer x kind heatmaps of entropy and std), each written atomically."""
    return write_table(frame, out, "mri", heatmap_png(frame))


def layer_table(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of a statistic per decoder layer (rows) and kind (columns), over whole tensors."""
    layered = tensor_rows(frame).dropna(subset=["block"])
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
    grouped = tensor_rows(frame).groupby("kind").agg(
        tensors=("name", "count"), params=("numel", "sum"), norm=("norm", "mean"), std=("std", "mean"),
        entropy=("entropy", "mean")).reset_index()
    return grouped.round(4).to_dict(orient="records")
