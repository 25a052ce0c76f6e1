"""A merge plan: every tensor's kind, block, genome ratio and source fixed from the genome before a byte is read."""

from __future__ import annotations

from dataclasses import dataclass

from darwin.checkpoint import Checkpoint, TensorInfo, check_compatible
from darwin.errors import DarwinError
from darwin.experts import InLayoutOf, in_layout_of
from darwin.genome import Genome
from darwin.merge.methods import METHODS, Method
from darwin.profiles import ParentProfile


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shard: str  # the child's shard: the father's, or his last one for a tensor only the mother holds
    kind: str
    block: int | None
    genome_ratio: float
    carried: str | None = None  # "father" | "mother": only that parent holds it, copied byte for byte


@dataclass
class MergePlan:
    """Everything the merge needs besides the bytes: pure data, also the skeleton of merge_report.json."""

    method: str
    genome: Genome
    father: Checkpoint
    mother: Checkpoint | InLayoutOf
    base: Checkpoint | InLayoutOf | None
    tensors: list[TensorPlan]
    profiles: tuple[ParentProfile, ParentProfile]  # father's, mother's

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(t.shard for t in self.tensors))

    def source(self, tp: TensorPlan) -> TensorInfo:
        """The tensor as the child stores it: the father's dtype and shape, the mother's for one she alone holds."""
        return (self.mother if tp.carried == "mother" else self.father).tensors[tp.name]


def plan_merge(father: Checkpoint, mother: Checkpoint, genome: Genome, method: str, base: Checkpoint | None = None,
               profiles: tuple[ParentProfile, ParentProfile] | None = None, strict: bool = False) -> MergePlan:
    """Check the inputs and fix each tensor's kind, block and genome ratio, and which tensors one parent alone holds
    (carried from it: the child keeps every tensor of both); nothing is read or written yet. The mother's and the
    base's routed experts are read in the father's layout where theirs differs (`experts.in_layout_of`). `strict`
    refuses any difference between the parents (`check_compatible`). Without the parents' `profiles` the merge
    counts each tensor's statistics itself and knows no probe scores or dead experts."""
    spec = METHODS.get(method)
    if spec is None:
        raise DarwinError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})")
    if spec.genome and genome.version != spec.genome:
        raise DarwinError(f"method {method} needs a {spec.genome} genome, got a {genome.version} genome")
    if spec.needs_base and base is None:
        raise DarwinError(f"method {method} needs the shared base model (--base)")
    if not strict:  # experts fused in one and per expert in the other merge expert by expert, in his layout
        mother, base = in_layout_of(mother, father), in_layout_of(base, father)
    check_compatible(father, mother, base, strict)
    layers = father.num_layers
    tensors = []
    for name, info in father.tensors.items():
        kind, block = father.kind(name)
        tensors.append(TensorPlan(name, info.shard, kind, block, genome.ratio(kind, block, layers),
                                  None if name in mother.tensors else "father"))
    last_shard = tensors[-1].shard if tensors else "model.safetensors"
    for name in mother.tensors:
        if name not in father.tensors:
            kind, block = mother.kind(name)
            tensors.append(TensorPlan(name, last_shard, kind, block, genome.ratio(kind, block, layers), "mother"))
    return MergePlan(method, genome, father, mother, base, tensors, profiles or (ParentProfile(), ParentProfile()))
