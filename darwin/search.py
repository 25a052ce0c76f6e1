"""CMA-ES over genomes (the `cma` package): ask/tell, exact save/resume, and Phase 1's heuristic proxy.

Genes live in [0, 1] and cma's own bound handling keeps every candidate there. cma samples through its `randn`
option, by default numpy's global RNG, whose state a pickled strategy does not keep (it pickles a detached copy of
the global RandomState). The search gives cma a RandomState of its own instead: it is seeded from the run's seed,
pickled with the strategy, and touched by nobody else, so a resumed run asks exactly the genomes an uninterrupted
one would.

Heuristic proxy (the cards' "genome balance + differentiation", made exact):
    agreement = 1 - mean_g |gene_g - prescription_g|   over g in global, attn, ffn, embed, where prescription_g
                is the parents' mean MRI ratio over the tensors of that gene
    balance   = 1 - 2 * |mean(ratio genes, block genes included) - 0.5|
    density   = (density_a + density_b) / 2
    heuristic = 0.5 * agreement + 0.3 * balance + 0.2 * density
It needs no merge and costs microseconds; how well it ranks real candidates is measured (Spearman) in each run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cma
import numpy as np

from darwin.genome import KIND_GENE, Genome, gene_names

PRESCRIPTION_GENES = ("global_ratio", "attn_ratio", "ffn_ratio", "embed_ratio")


@dataclass
class Search:
    """One CMA-ES phase. Fitness is maximised (cma minimises, so it is told the negative)."""

    version: str
    blocks: int
    popsize: int
    seed: int
    x0: list[float] | None = None
    sigma0: float = 0.2
    generation: int = 0
    _es: cma.CMAEvolutionStrategy | None = field(default=None, repr=False)
    _asked: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self._es is None:
            dim = len(gene_names(self.version, self.blocks))
            x0 = self.x0 if self.x0 is not None else [0.5] * dim
            rng = np.random.RandomState(self.seed)
            self._es = cma.CMAEvolutionStrategy(list(x0), self.sigma0, {
                "bounds": [0.0, 1.0], "popsize": self.popsize, "randn": rng.randn, "verbose": -9})

    def ask(self) -> list[Genome]:
        self._asked = self._es.ask()
        return [Genome.from_vector(self.version, x, self.blocks) for x in self._asked]

    def tell(self, fitness: list[float]) -> None:
        if len(fitness) != len(self._asked):
            raise ValueError(f"told {len(fitness)} fitness values for {len(self._asked)} genomes")
        self._es.tell(self._asked, [-f for f in fitness])
        self._asked = []
        self.generation += 1

    @property
    def mean(self) -> list[float]:
        """Where the search stands (cma's favourite solution, inside the bounds); Phase 2 starts here."""
        return [float(v) for v in self._es.result.xfavorite]

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    def follow_on(self, popsize: int) -> Search:
        """The next phase: same genome space and seed, starting from this phase's mean and step size."""
        return Search(self.version, self.blocks, popsize, self.seed + 1000, x0=self.mean, sigma0=self.sigma)


def prescription_by_gene(mri_a: dict[str, dict], mri_b: dict[str, dict], kinds: dict[str, str], version: str
                         ) -> dict[str, float]:
    """The parents' mean MRI ratio per ratio gene: what the static MRI alone would prescribe."""
    from darwin.mri import static_score
    from darwin.prescribe import mri_ratio

    sums: dict[str, list[float]] = {gene: [] for gene in PRESCRIPTION_GENES}
    for name, stats_a in mri_a.items():
        if name in mri_b:
            gene = KIND_GENE.get(kinds.get(name, "other"), "global_ratio")
            sums[gene].append(mri_ratio(static_score(stats_a, version), static_score(mri_b[name], version)))
    return {gene: float(np.mean(values)) if values else 0.5 for gene, values in sums.items()}


def heuristic_fitness(genome: Genome, prescription: dict[str, float]) -> float:
    agreement = 1.0 - float(np.mean([abs(genome[g] - prescription.get(g, 0.5)) for g in PRESCRIPTION_GENES]))
    ratios = [genome[g] for g in PRESCRIPTION_GENES] + [genome[f"block_{k}"] for k in range(genome.blocks)]
    balance = 1.0 - 2.0 * abs(float(np.mean(ratios)) - 0.5)
    density = (genome["density_a"] + genome["density_b"]) / 2.0
    return 0.5 * agreement + 0.3 * balance + 0.2 * density
