"""The parents of a merge, as every merge plan is made: their locations and profile outputs (`Parents`, small and
picklable, so it travels to any worker), opened into checkpoint headers and profiles (`OpenParents`), which plan a
merge of any genome. `darwin merge`, the merge task and Phase 2's workers all plan so."""

from __future__ import annotations

from dataclasses import dataclass

from darwin.checkpoint import Checkpoint
from darwin.genome import Genome
from darwin.merge import MergePlan, plan_merge
from darwin.profiles import ParentProfile


@dataclass(frozen=True)
class Parents:
    father: str
    mother: str
    method: str
    base: str | None = None
    mri_father: str | None = None  # `darwin profile` outputs
    mri_mother: str | None = None
    probes_father: str | None = None  # `darwin probe` outputs
    probes_mother: str | None = None

    def open(self, allow_pickle: bool = False) -> OpenParents:
        """The parents' checkpoints (headers) and profiles, read once per worker."""
        return OpenParents(self.method, Checkpoint(self.father, allow_pickle), Checkpoint(self.mother, allow_pickle),
                           Checkpoint(self.base, allow_pickle) if self.base else None, self.profiles())

    def profiles(self) -> tuple[ParentProfile, ParentProfile]:
        return (ParentProfile.load(self.mri_father, self.probes_father),
                ParentProfile.load(self.mri_mother, self.probes_mother))


@dataclass(frozen=True)
class OpenParents:
    """`Parents` opened: what a merge plan is made of."""

    method: str
    father: Checkpoint
    mother: Checkpoint
    base: Checkpoint | None
    profiles: tuple[ParentProfile, ParentProfile]

    def plan(self, genome: Genome, strict: bool = False) -> MergePlan:
        return plan_merge(self.father, self.mother, genome, self.method, base=self.base, profiles=self.profiles,
                          strict=strict)
