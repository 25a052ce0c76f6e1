"""Prescription: from the parents' MRI to each tensor's final ratio and transplant decision (docs/method.md
"Prescription").

V5: static scores `entropy*0.5 + std*0.3 + min(norm,100)*0.002`, `final = 0.7*mri + 0.3*genome`, transplant
below 0.05 / above 0.95. V6: static scores with weights 0.3/0.2/0.002, `combined = static*0.4 + probe*0.6` where
the probe score is the probe-weighted importance of the tensor's layer (tensors outside the decoder layers, or
runs without probes, use the static score alone), `final = mri*mri_trust + genome*(1 - mri_trust)`, transplant
below 0.15 / above 0.85. Dead experts: an expert dead in one parent and alive in the other is transplanted from
the live parent, whatever the ratios say (the V5 35B card's donor rule, made exact): a per-expert tensor whole, the
expert's slice of a fused one (the rest of it merged).
"""

from __future__ import annotations

from darwin.experts import expert_slices
from darwin.genome import genome_version
from darwin.mri import static_score
from darwin.profiles import ParentProfile

# Part of every fitness cache key: bump when a change to the prescription, the static scores or a merge form
# changes what a genome merges to.
RULES_VERSION = 1


def mri_ratio(score_a: float, score_b: float) -> float:
    total = score_a + score_b
    return score_b / total if total > 0 else 0.5


def combined_score(static: float, probe: float | None) -> float:
    return static if probe is None else static * 0.4 + probe * 0.6


def tensor_mri_ratio(stats_a: dict, stats_b: dict, version: str, block: int | None, profile_a: ParentProfile,
                     profile_b: ParentProfile) -> tuple[float, float | None, float | None]:
    """(mri_ratio, probe score of A, probe score of B) for one tensor of statistics `stats_a`, `stats_b`."""
    score_a, score_b = static_score(stats_a, version), static_score(stats_b, version)
    probe_a = probe_b = None
    if genome_version(version).probes and block is not None and profile_a.probe and profile_b.probe:
        probe_a, probe_b = profile_a.probe.get(block), profile_b.probe.get(block)
        if probe_a is not None and probe_b is not None:
            score_a, score_b = combined_score(score_a, probe_a), combined_score(score_b, probe_b)
    return mri_ratio(score_a, score_b), probe_a, probe_b


def final_ratio(mri: float, genome_ratio: float, trust: float) -> float:
    return mri * trust + genome_ratio * (1.0 - trust)


def transplant(final: float, version: str) -> str | None:
    low, high = genome_version(version).thresholds
    if final < low:
        return "father"
    if final > high:
        return "mother"
    return None


def dead_expert_donors(name: str, shape: tuple[int, ...], block: int | None, profile_a: ParentProfile,
                       profile_b: ParentProfile) -> dict[int, str]:
    """{expert: live parent} for each expert slice of the tensor that is dead in exactly one parent."""
    if block is None:
        return {}
    dead_a = (profile_a.dead_experts or {}).get(block, set())
    dead_b = (profile_b.dead_experts or {}).get(block, set())
    return {e: "mother" if e in dead_a else "father" for e in expert_slices(name, shape)
            if (e in dead_a) != (e in dead_b)}
