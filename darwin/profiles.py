"""What Phase 0 learnt of one parent, as the prescription reads it: per-tensor MRI statistics (`darwin profile`),
probe importance per layer and dead experts per layer (`darwin probe`). One loader for all three; each part may be
missing (no MRI: the merge counts the statistics itself; no probes: static scores alone; no routing: no
dead-expert transplant)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from darwin.errors import DarwinError
from darwin.mri import PROFILE_HINT
from darwin.report import read_columns

STATS = ("norm", "std", "entropy")


@dataclass(frozen=True)
class ParentProfile:
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor name -> norm, std, entropy
    probe: dict[int, float] | None = None  # layer -> probe-weighted importance
    dead_experts: dict[int, set[int]] | None = None  # layer -> experts the router never picked

    @classmethod
    def load(cls, mri: str | os.PathLike | None = None, probes: str | os.PathLike | None = None) -> ParentProfile:
        """From a `darwin profile` output (directory or mri.parquet) and a `darwin probe` output directory (its
        probes.parquet, routing.parquet or both)."""
        return cls(read_stats(mri) if mri is not None else {}, *read_signals(probes))


def read_stats(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Per-tensor statistics keyed by tensor name, through pyarrow alone (a `darwin merge` imports no pandas)."""
    table = read_columns(path, "mri", PROFILE_HINT, ["name", *STATS])
    return {name: {key: math.nan if value is None else value for key, value in zip(STATS, values)}
            for name, *values in zip(table["name"], *(table[key] for key in STATS))}


def read_signals(probe_dir: str | os.PathLike | None) -> tuple[dict[int, float] | None, dict[int, set[int]] | None]:
    """(probe score per layer, dead experts per layer) from a `darwin probe` output directory."""
    if probe_dir is None:
        return None, None
    from darwin import moe, probes

    directory = Path(probe_dir)
    importance, routing = directory / "probes.parquet", directory / "routing.parquet"
    if not importance.exists() and not routing.exists():
        raise DarwinError(f"neither probes.parquet nor routing.parquet in {directory} (run `darwin probe` first)")
    return (probes.probe_scores(probes.read_importance(importance)) if importance.exists() else None,
            moe.dead_expert_map(moe.read_routing(routing)) if routing.exists() else None)
