"""Genomes: the merge recipe CMA-ES searches, its canonical hash, and the ratio it gives each tensor.

V5 has six genes; V6 adds one ratio per layer block, `mri_trust` and `merge_method_weight` (docs/method.md
"Genome"); each version's genes and prescription rules are one `GenomeVersion` record in VERSIONS.
Gene values are rounded to 8 decimals on construction, so the hash names exactly the recipe that is merged.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from darwin.errors import DarwinError

V5_GENES = ("global_ratio", "attn_ratio", "ffn_ratio", "embed_ratio", "density_a", "density_b")
V6_EXTRA = ("mri_trust", "merge_method_weight")
KIND_GENE = {
    "attn": "attn_ratio", "linear_attn": "attn_ratio",
    "mlp": "ffn_ratio", "expert": "ffn_ratio", "shared_expert": "ffn_ratio",
    "embed": "embed_ratio", "lm_head": "embed_ratio",
}
DECIMALS = 8


@dataclass(frozen=True)
class GenomeVersion:
    """A genome version (docs/method.md "Genome"): its genes and the prescription rules that read them
    (darwin.prescribe, darwin.mri.static_score). A new version is one more record in VERSIONS."""

    name: str
    extra: tuple[str, ...]  # genes after the V5 genes and the block genes
    per_block: bool  # one block_k gene per layer block
    score_weights: tuple[float, float, float]  # static score: entropy, std, min(norm, 100)
    thresholds: tuple[float, float]  # final ratio below: the father's tensor; above: the mother's
    probes: bool  # the prescription weighs the probes' layer importance in (probes run before the search)


VERSIONS = {version.name: version for version in (
    GenomeVersion("v5", (), False, (0.5, 0.3, 0.002), (0.05, 0.95), False),
    GenomeVersion("v6", V6_EXTRA, True, (0.3, 0.2, 0.002), (0.15, 0.85), True),
)}


def genome_version(version: str) -> GenomeVersion:
    if version not in VERSIONS:
        raise DarwinError(f"unknown genome version {version!r} ({' or '.join(VERSIONS)})")
    return VERSIONS[version]


def gene_names(version: str, blocks: int = 6) -> tuple[str, ...]:
    spec = genome_version(version)
    if spec.per_block and blocks < 1:
        raise DarwinError(f"a {version} genome needs at least one block, got {blocks}")
    return V5_GENES + (tuple(f"block_{k}" for k in range(blocks)) if spec.per_block else ()) + spec.extra


@dataclass(frozen=True)
class Genome:
    version: str
    genes: Mapping[str, float]

    @classmethod
    def from_dict(cls, genes: Mapping[str, float]) -> Genome:
        """Validate genes by their names; the version (and block count) follows from the names."""
        genes = dict(genes)
        blocks = sum(1 for name in genes if name.startswith("block_"))
        # the version whose own genes these are (block genes, or genes beyond V5's); V5 otherwise
        version = next((v.name for v in VERSIONS.values()
                        if (v.per_block and blocks) or any(name in genes for name in v.extra)), "v5")
        expected = gene_names(version, blocks)
        missing = [name for name in expected if name not in genes]
        unknown = [name for name in genes if name not in expected]
        if missing or unknown:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown {', '.join(unknown)}"] if unknown else [])
            raise DarwinError(f"bad {version} genome: {'; '.join(parts)}")
        clean = {}
        for name in expected:
            value = genes[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DarwinError(f"gene {name} must be a number in [0, 1], got {value!r}")
            clean[name] = round(float(value), DECIMALS)
        return cls(version, clean)

    @classmethod
    def from_vector(cls, version: str, vector, blocks: int = 6) -> Genome:
        return cls.from_dict(dict(zip(gene_names(version, blocks), (min(1.0, max(0.0, float(v))) for v in vector))))

    @classmethod
    def load(cls, path: str | Path) -> Genome:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DarwinError(f"genome file does not exist: {path}") from None
        except json.JSONDecodeError as exc:
            raise DarwinError(f"genome file {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise DarwinError(f"genome file {path} must hold an object of genes")
        return cls.from_dict(raw.get("genes", raw) if isinstance(raw.get("genes"), dict) else raw)

    @property
    def blocks(self) -> int:
        return sum(1 for name in self.genes if name.startswith("block_"))

    def vector(self) -> list[float]:
        return [self.genes[name] for name in gene_names(self.version, self.blocks)]

    def canonical_json(self) -> str:
        return json.dumps({k: format(v, f".{DECIMALS}f") for k, v in sorted(self.genes.items())},
                          separators=(",", ":"))

    @functools.cached_property  # asked once per tensor by the merge: the JSON and sha256 cost more than small merges
    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def __getitem__(self, name: str) -> float:
        return self.genes[name]

    def mri_trust(self) -> float:
        """Share of the MRI prescription in the final ratio: fixed 0.7 in V5, a gene in V6."""
        return self.genes.get("mri_trust", 0.7)

    def merge_method_weight(self) -> float:
        """Share of the DARE result against plain linear interpolation: 1 in V5, a gene in V6."""
        return self.genes.get("merge_method_weight", 1.0)

    def ratio(self, kind: str, block: int | None, num_layers: int) -> float:
        """genome_ratio of a tensor: the gene of its kind (global_ratio for kinds with no gene of their own);
        in V6 the block gene of its layer shifts it, neutral at 0.5: clip(kind_gene + block_k - 0.5, 0, 1),
        block k covering layers [k*L/n, (k+1)*L/n). Tensors outside the decoder layers take the kind gene."""
        value = self.genes[KIND_GENE.get(kind, "global_ratio")]
        if self.blocks and block is not None and num_layers > 0:
            k = min(self.blocks - 1, block * self.blocks // num_layers)
            value = min(1.0, max(0.0, value + self.genes[f"block_{k}"] - 0.5))
        return value
