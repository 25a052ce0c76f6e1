"""CMA-ES over genomes (the `cma` package): ask/tell, exact save/resume, and Phase 1's heuristic proxy.

Genes live in [0, 1] and cma's own bound handling keeps every candidate there. cma samples through its `randn`
option, by default numpy's global RNG, whose state a pickled strategy does not keep (it pickles a detached copy of
the global RandomState). The search gives cma a RandomState of its own instead: it is seeded from the run's seed,
pickled with the strategy, and touched by nobody else, so a resumed run asks exactly the genomes an uninterrupted
one would.

Heuristic proxy (the cards' "genome balance", made exact; every term has its optimum inside the genes' bounds):
    agreement = 1 - mean_g |gene_g - prescription_g|   over g in global, attn, ffn, embed, where prescription_g
                is the parents' mean MRI ratio over the tensors of that gene
    balance   = 1 - 2 * |mean(ratio genes, block genes included) - 0.5|
    prior     = 1 - mean_g |gene_g - PRIOR_g|           over the genes no MRI signal speaks for (PRIOR below)
    heuristic = 0.4 * agreement + 0.3 * balance + 0.3 * prior
It scores every gene (the block genes through balance), needs no merge and costs microseconds; how well it ranks
real candidates is measured (Spearman) in each run. The cards' "differentiation" has no term: nothing in the
static MRI says how different father and mother should be made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cma
import numpy as np

from darwin.genome import KIND_GENE, Genome, gene_names
from darwin.profiles import ParentProfile

PRESCRIPTION_GENES = ("global_ratio", "attn_ratio", "ffn_ratio", "embed_ratio")
# Where the heuristic holds the genes no MRI signal speaks for. Densities: DARE keeps 90% of each delta (density
# 1 turns DARE off; a reward that grew with density ended every default run there); mri_trust: prescription and
# genome weigh the same; merge_method_weight: mostly the chosen method, a tenth linear interpolation. Phase 2
# searches all of them from there.
PRIOR = {"density_a": 0.9, "density_b": 0.9, "mri_trust": 0.5, "merge_method_weight": 0.9}


@dataclass
class Search:
    """One CMA-ES phase. Fitness is maximised (cma minimises, so it is told the negative)."""

    version: str
    blocks: int
    popsize: int
    seed: int
    x0: list[float] | None = None
    sigma0: float = 0.2
    inject: list[list[float]] = field(default_factory=list)  # evaluated in the first generation, as they are
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
            # injected as genotypes: cma's bound handling maps them back onto exactly these genes
            self._es.inject([self._es.boundary_handler.inverse(np.asarray(x, dtype=float))
                             for x in self.inject[:self.popsize]], force=True)

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

    def follow_on(self, popsize: int, sigma0: float, best: list[list[float]]) -> Search:
        """The next phase (docs/method.md "Fitness and search"): a fresh covariance centred on this phase's best genome
        (`best[0]`; with none, this phase's mean) with step size max(this phase's sigma, `sigma0`), and a first
        generation that evaluates the `best` distinct genomes as they are, at most half of it. A Phase 1 of
        200 x 20 ends at sigma ~1e-3: carried over as it was, Phase 2's real merges were one genome to three
        decimals."""
        return Search(self.version, self.blocks, popsize, self.seed + 1000, x0=list(best[0]) if best else self.mean,
                      sigma0=max(self.sigma, sigma0), inject=[list(x) for x in best[:popsize // 2]])


def prescription_by_gene(father: ParentProfile, mother: ParentProfile, kinds: dict[str, str], version: str
                         ) -> dict[str, float]:
    """The parents' mean MRI ratio per ratio gene: what the static MRI alone would prescribe."""
    from darwin.mri import static_score
    from darwin.prescribe import mri_ratio

    sums: dict[str, list[float]] = {gene: [] for gene in PRESCRIPTION_GENES}
    for name, stats_a in father.stats.items():
        if name in mother.stats:
            gene = KIND_GENE.get(kinds.get(name, "other"), "global_ratio")
            sums[gene].append(mri_ratio(static_score(stats_a, version), static_score(mother.stats[name], version)))
    return {gene: float(np.mean(values)) if values else 0.5 for gene, values in sums.items()}


def heuristic_fitness(genome: Genome, prescription: dict[str, float]) -> float:
    agreement = 1.0 - float(np.mean([abs(genome[g] - prescription.get(g, 0.5)) for g in PRESCRIPTION_GENES]))
    ratios = [genome[g] for g in PRESCRIPTION_GENES] + [genome[f"block_{k}"] for k in range(genome.blocks)]
    balance = 1.0 - 2.0 * abs(float(np.mean(ratios)) - 0.5)
    prior = 1.0 - float(np.mean([abs(genome[g] - target) for g, target in PRIOR.items() if g in genome.genes]))
    return 0.4 * agreement + 0.3 * balance + 0.3 * prior
