"""Phase 3 health check: the child against both parents, layer by layer, on probe importance.

Each model's importance of a layer is its probe importance (see `darwin.probes`) averaged over the probe sets.
A layer is flagged for
- interference when child > interference * max(father, mother) (the child leans on it much more than either
  parent: the merge created a function neither parent had, usually weight conflict), and
- function loss when child < function_loss * min(father, mother) (the child lost what both parents use).
By default (`noise` 0) that is the rule of docs/method.md ("Health") exactly. Near-zero importances are partly
noise (a layer whose skipping barely moves the output in any model), so a positive `noise` opts in to a floor:
every value is first raised to
`floor = max(1e-3, noise * peak)`, where `peak` is the largest importance of any layer in any of the three models.
A layer all three models barely use is then never flagged: function loss needs both parents above
floor / function_loss, interference needs the child above interference x floor.
The verdict is `fail` when any layer is flagged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from darwin.errors import DarwinError
from darwin.report import png, write_atomic

if TYPE_CHECKING:  # the run config reads Thresholds without importing pandas
    import pandas as pd

ROLES = ("child", "father", "mother")
ABSOLUTE_FLOOR = 1e-3


def layer_curve(frame: pd.DataFrame) -> pd.Series:
    """Importance per layer, averaged over probes."""
    return frame.groupby("layer")["importance"].mean().sort_index()


@dataclass(frozen=True)
class Thresholds:
    """When a layer is flagged: child > interference x max(parents), child < function_loss x min(parents), after
    the opt-in noise floor."""

    interference: float = 1.5
    function_loss: float = 0.5
    noise: float = 0.0

    def __post_init__(self):
        if self.interference <= 1 or not 0 < self.function_loss < 1 or not 0 <= self.noise < 1:
            raise DarwinError(f"health thresholds out of range: interference {self.interference} must be > 1, "
                              f"function_loss {self.function_loss} in (0, 1), noise {self.noise} in [0, 1)")


def health_check(child_df: pd.DataFrame, father_df: pd.DataFrame, mother_df: pd.DataFrame,
                 thresholds: Thresholds = Thresholds()) -> dict:
    """{verdict, thresholds, layers: [{layer, child, father, mother, interference, function_loss}],
    interference: [layer...], function_loss: [layer...]} (JSON-ready)."""
    import pandas as pd

    interference, function_loss, noise = thresholds.interference, thresholds.function_loss, thresholds.noise
    curves = pd.DataFrame({role: layer_curve(frame) for role, frame in zip(ROLES, (child_df, father_df, mother_df))})
    if curves.isna().any().any():
        missing = {role: sorted(curves.index[curves[role].isna()]) for role in ROLES if curves[role].isna().any()}
        raise DarwinError(f"the three models do not have the same layers (missing: {missing})")
    floor = max(ABSOLUTE_FLOOR, noise * float(curves.to_numpy().max())) if noise > 0 else 0.0
    raised = curves.clip(lower=floor)
    parents = raised[["father", "mother"]]
    curves["interference"] = raised["child"] > interference * parents.max(axis=1)
    curves["function_loss"] = raised["child"] < function_loss * parents.min(axis=1)
    flagged = {flag: [int(layer) for layer in curves.index[curves[flag]]] for flag in ("interference", "function_loss")}
    return {
        "verdict": "fail" if flagged["interference"] or flagged["function_loss"] else "pass",
        "thresholds": {**asdict(thresholds), "noise_floor": floor},
        "rule": ("importance = probe cosine distance averaged over probes"
                 + (f", raised to the noise floor max({ABSOLUTE_FLOOR}, {noise} * peak) = {floor:.6g}" if floor else "")
                 + f"; interference: child > {interference} x "
                 f"max(father, mother); function loss: child < {function_loss} x min(father, mother)"),
        "layers": [{"layer": int(layer), **{role: float(row[role]) for role in ROLES},
                    "interference": bool(row["interference"]), "function_loss": bool(row["function_loss"])}
                   for layer, row in curves.iterrows()],
        **flagged,
    }


def plot_health(report: dict) -> bytes:
    """PNG: child, father and mother importance per layer, flagged layers marked, the noise floor dashed."""
    import pandas as pd
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = pd.DataFrame(report["layers"])
    figure = Figure(figsize=(9, 4.5))
    ax = figure.add_subplot()
    for role, style in zip(ROLES, ("-", "--", ":")):
        ax.plot(layers["layer"], layers[role], style, marker="o", markersize=3, label=role)
    for flag, marker, color in (("interference", "^", "red"), ("function_loss", "v", "purple")):
        hit = layers[layers[flag]]
        if len(hit):
            ax.scatter(hit["layer"], hit["child"], marker=marker, s=80, color=color, label=flag.replace("_", " "),
                       zorder=3)
    ax.axhline(report["thresholds"]["noise_floor"], color="grey", linewidth=0.8, linestyle="--", label="noise floor")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("importance (mean over probes)")
    ax.set_title(f"health check: {report['verdict']}")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return png(figure)


def write_health(report: dict, out: str | os.PathLike) -> Path:
    """`health.json` and `health.png` in `out`, written atomically; returns the json path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "health.json", json.dumps(report, indent=2).encode())
    write_atomic(out / "health.png", plot_health(report))
    return out / "health.json"


def health_markdown(report: dict) -> str:
    lines = [f"### Health check: **{report['verdict'].upper()}**", "", f"Rule: {report['rule']}.", ""]
    for flag in ("interference", "function_loss"):
        layers = report[flag]
        lines.append(f"- {flag.replace('_', ' ')}: {', '.join(f'L{i}' for i in layers) if layers else 'none'}")
    return "\n".join(lines) + "\n"
