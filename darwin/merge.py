"""The merge engine: plan every tensor from the genome, then stream the merge tensor by tensor.

Methods are pure functions over float32 chunks of the flattened tensors, in one registry keyed by the method
name of the run config. The engine maps the parents' shards (no copy on read), computes both parents' MRI
statistics of a shard's tensors (all threads), then merges tensor by tensor into recycled output memory while a
thread writes the previous tensor. Masks come from `darwin.masks` (counter-based), so the same genome gives the
same bytes on any device, worker or order.

Forms (docs/method.md "Merge forms"), with r the tensor's final ratio:
- darwin (father A is the base):  A + (B - A) * keep_b * r
- dare-ties (explicit base C):    task vectors A-C, B-C; DARE drop with density_a / density_b and rescale by
  1/density; weights w_a = min(1, 2(1-r)), w_b = min(1, 2r); TIES sign election by the sign of the weighted sum;
  the agreeing weighted deltas summed (the weighted sum: mergekit's dare_ties with `normalize: false`). So r
  walks from the father (r=0) through task arithmetic C + (A-C) + (B-C) under TIES (r=0.5) to the mother (r=1);
  r=0.75 is C + 0.5(A-C) + (B-C). Weights (1-r, r) could only interpolate, never add two skills.
- V6 genomes blend: w * form + (1 - w) * (A + (B - A) * r), w = merge_method_weight.

On CPU the mask bits and the form run fused in one C pass per chunk (`darwin/_kernels.c`, chunks in parallel
threads); on CUDA, or where the extension was not built, the same operations run as torch ops. Both give the same
bytes. The engine moves tensors as their raw bits in numpy arrays (`Checkpoint.read_array`): a bf16 or float32
merge on CPU never imports torch, which took 0.75 s of `darwin merge`'s start on a 2-core machine.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from darwin import masks, prescribe
from darwin.checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointWriter,
    TensorInfo,
    check_compatible,
    to_raw,
    to_torch,
    torch_dtype,
)
from darwin.errors import DarwinError
from darwin.experts import InLayoutOf, expert_slices, in_layout_of
from darwin.genome import Genome
from darwin.mri import PROFILE_HINT, array_stats, tensor_stats
from darwin.placement import place_in_model
from darwin.prescribe import ParentSignals
from darwin.progress import Progress
from darwin.report import read_columns
from darwin.runtime import cpu_threads

if TYPE_CHECKING:
    import torch

try:
    from darwin import _kernels
except ImportError:  # built without a C compiler: the torch path alone
    _kernels = None

REPORT_NAME = "merge_report.json"
# The direct kernel makes no temporaries and runs no torch op per chunk, so its chunks are large: at masks.CHUNK a
# 400M-element merge spent its time on 12,500 chunks' slicing and futures, not in the kernel.
DIRECT_CHUNK = 1 << 20
# A fused expert tensor larger than this is merged and written one expert slice at a time (`streamed`)
STREAM_BYTES = 256 << 20
# Kinds of tensors (darwin/families) that AutoModelForCausalLM builds no parameter for: Phase 2 leaves them out
UNBUILT_KINDS = ("vision", "mtp")
# dtypes the kernel reads and writes in place (the value: its dtype code in _kernels.c); parents of different
# dtypes go through float32 torch chunks
KERNEL_DTYPES = {"F32": 0, "BF16": 1, "F16": 2}


def direct_chunk(numel: int, workers: int) -> int:
    """At most DIRECT_CHUNK elements, in a multiple of `workers` equal chunks: a 1.05M-element tensor cut into 1M
    and 48K kept one thread busy while the other waited. A tensor of a few thousand elements stays whole."""
    if numel <= DIRECT_CHUNK // 16:
        return max(1, numel)
    pieces = -(-numel // DIRECT_CHUNK)
    pieces = -(-pieces // workers) * workers
    return -(-numel // pieces)


def darwin_form(a, b, base, keep_a, keep_b, r, density_a, density_b):
    import torch

    return a + torch.where(keep_b, (b - a) * r, 0.0)


def task_weights(r: float) -> tuple[float, float]:
    """(w_a, w_b) of the dare-ties weighted sum for a final ratio r."""
    return min(1.0, 2.0 * (1.0 - r)), min(1.0, 2.0 * r)


def dare_ties_form(a, b, base, keep_a, keep_b, r, density_a, density_b):
    import torch

    weight_a, weight_b = task_weights(r)
    delta_a = torch.where(keep_a, (a - base) * (weight_a / density_a), 0.0) if density_a > 0 else torch.zeros_like(a)
    delta_b = torch.where(keep_b, (b - base) * (weight_b / density_b), 0.0) if density_b > 0 else torch.zeros_like(b)
    elected = torch.where(delta_a + delta_b >= 0, 1.0, -1.0)
    agree_a, agree_b = torch.sign(delta_a) == elected, torch.sign(delta_b) == elected
    return base + (torch.where(agree_a, delta_a, 0.0) + torch.where(agree_b, delta_b, 0.0))


def darwin_kernel(out, a, b, base, start, seed, r, density_a, density_b, blend, code):
    _kernels.darwin_form(out, a, b, start, seed, masks.threshold(density_b), r, blend, 1.0 - blend, code)


def dare_ties_kernel(out, a, b, base, start, seed, r, density_a, density_b, blend, code):
    weight_a, weight_b = task_weights(r)
    _kernels.dare_ties_form(out, a, b, base, start, seed, masks.threshold(density_a), masks.threshold(density_b),
                            weight_a / density_a if density_a > 0 else 0.0,
                            weight_b / density_b if density_b > 0 else 0.0,
                            density_a > 0, density_b > 0, r, blend, 1.0 - blend, code)


@dataclass(frozen=True)
class Method:
    """A merge method: the run config's `method` and `darwin merge --method` name one of METHODS. A new method is
    one more record: its torch form is enough (the fused CPU kernel is an option; without one the CPU runs the
    torch form on float32 chunks, as CUDA does)."""

    form: Callable  # torch, on any device: (a, b, base, keep_a, keep_b, r, density_a, density_b) -> merged
    kernel: Callable | None  # the same form fused with the mask bits and the V6 blend, on CPU (_kernels.c)
    needs_base: bool
    genome: str | None  # the genome version the method requires (None: any)


METHODS = {
    "darwin-v5": Method(darwin_form, darwin_kernel, needs_base=False, genome="v5"),
    "darwin-v6": Method(darwin_form, darwin_kernel, needs_base=False, genome="v6"),
    "dare-ties": Method(dare_ties_form, dare_ties_kernel, needs_base=True, genome=None),
}


def torch_merge(spec: Method, a, b, base, keep_a, keep_b, r, density_a, density_b, blend):
    """A method's torch form on float32 chunks, blended with A + (B - A) * r where a V6 genome's w < 1: the path
    CUDA runs, and the CPU where a method has no kernel."""
    merged = spec.form(a, b, base, keep_a, keep_b, r, density_a, density_b)
    return merged if blend == 1.0 else merged * blend + (a + (b - a) * r) * (1.0 - blend)


class BufferRing:
    """Output memory recycled over a stream of merged tensors: `take` hands out slot after slot, so a tensor's
    memory returns `depth` tensors later, when its consumer must be done with it. Fresh memory costs a page fault
    per 4 KiB on first write, which took longer than the merge kernel itself (0.2 s against 0.1 s per 100M bf16)."""

    def __init__(self, depth: int):
        self._slots: list[np.ndarray | None] = [None] * depth
        self._next = 0

    def take(self, numel: int, dtype: np.dtype) -> np.ndarray:
        nbytes = numel * np.dtype(dtype).itemsize
        slot = self._slots[self._next]
        if slot is None or slot.size < nbytes:
            slot = self._slots[self._next] = np.empty(nbytes, dtype=np.uint8)
        self._next = (self._next + 1) % len(self._slots)
        return slot[:nbytes].view(dtype)


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
    mri_a: dict[str, dict] = field(default_factory=dict)
    mri_b: dict[str, dict] = field(default_factory=dict)
    signals_a: ParentSignals = ParentSignals()
    signals_b: ParentSignals = ParentSignals()

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(t.shard for t in self.tensors))

    def source(self, tp: TensorPlan) -> TensorInfo:
        """The tensor as the child stores it: the father's dtype and shape, the mother's for one she alone holds."""
        return (self.mother if tp.carried == "mother" else self.father).tensors[tp.name]


def plan_merge(father: Checkpoint, mother: Checkpoint, genome: Genome, method: str, base: Checkpoint | None = None,
               mri_a: dict[str, dict] | None = None, mri_b: dict[str, dict] | None = None,
               signals_a: ParentSignals | None = None, signals_b: ParentSignals | None = None,
               strict: bool = False) -> MergePlan:
    """Check the inputs and fix each tensor's kind, block and genome ratio, and which tensors one parent alone holds
    (carried from it: the child keeps every tensor of both); nothing is read or written yet. The mother's and the
    base's routed experts are read in the father's layout where theirs differs (`experts.in_layout_of`). `strict`
    refuses any difference between the parents (`check_compatible`)."""
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
    return MergePlan(method, genome, father, mother, base, tensors, mri_a or {}, mri_b or {},
                     signals_a or ParentSignals(), signals_b or ParentSignals())


@functools.cache
def _chunk_pool(workers: int) -> ThreadPoolExecutor:
    """The kernel's threads, started once per process: starting them for every tensor took longer than merging
    the small tensors did."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="darwin-merge")


def _merge_values(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, base: np.ndarray | None,
                  final: float, device: str, ring: BufferRing | None = None, offset: int = 0) -> np.ndarray:
    """The merged raw bits of one tensor, or of the part of it that starts at element `offset` (one expert's slice
    of a fused tensor: the mask bits are the whole tensor's), from its parents' raw bits (`Checkpoint.read_array`)."""
    genome, spec = plan.genome, METHODS[plan.method]
    code = plan.father.tensors[tp.name].dtype
    codes = (code, plan.mother.tensors[tp.name].dtype, plan.base.tensors[tp.name].dtype if base is not None else code)
    density_a, density_b = genome["density_a"], genome["density_b"]
    blend = genome.merge_method_weight()
    seed = masks.tensor_seed(genome.hash, tp.name)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    flat_base = base.reshape(-1) if base is not None else None
    out = ring.take(a.size, a.dtype) if ring is not None else np.empty(a.size, dtype=a.dtype)
    fused = device == "cpu" and _kernels is not None and spec.kernel is not None
    # raw bits in and out of the kernel with no torch op per chunk
    direct = fused and code in KERNEL_DTYPES and set(codes) == {code}
    workers = cpu_threads()
    chunk = direct_chunk(a.size, workers) if direct else masks.CHUNK if device == "cpu" else masks.CUDA_CHUNK
    if direct:
        def merge_chunk(start: int) -> None:
            stop = min(a.size, start + chunk)
            spec.kernel(*(x[start:stop] if x is not None else None for x in (out, flat_a, flat_b, flat_base)),
                        offset + start, seed, final, density_a, density_b, blend, KERNEL_DTYPES[code])
    else:
        import torch

        dtype = torch_dtype(code)  # the father's: parents that differ in dtype merge in float32, stored as his
        out_t, a_t, b_t = to_torch(out, code), to_torch(flat_a, code), to_torch(flat_b, codes[1])
        base_t = to_torch(flat_base, codes[2]) if flat_base is not None else None

        def merge_chunk(start: int) -> None:
            stop = min(a.size, start + chunk)
            ca = a_t[start:stop].to(device=device, dtype=torch.float32)
            cb = b_t[start:stop].to(device=device, dtype=torch.float32)
            cbase = base_t[start:stop].to(device=device, dtype=torch.float32) if base_t is not None else None
            if fused:
                merged = torch.empty_like(ca)
                spec.kernel(merged.numpy(), ca.numpy(), cb.numpy(), cbase.numpy() if cbase is not None else None,
                            offset + start, seed, final, density_a, density_b, blend, KERNEL_DTYPES["F32"])
            else:
                keep_a, keep_b = masks.keep_masks(seed, offset + start, offset + stop,
                                                  density_a if spec.needs_base else None,
                                                  density_b, device)
                merged = torch_merge(spec, ca, cb, cbase, keep_a, keep_b, final, density_a, density_b, blend)
            out_t[start:stop] = merged.to(dtype).cpu()

    starts = range(0, a.size, chunk)
    if fused and len(starts) > 1:
        list(_chunk_pool(workers).map(merge_chunk, starts))
    else:
        for start in starts:
            merge_chunk(start)
    return out.reshape(a.shape)


def parent_stats(profile: dict[str, dict], name: str, raw: np.ndarray, code: str, device: str = "cpu") -> dict:
    """A parent's MRI statistics of a tensor: from its profile, else computed from its raw bits in hand."""
    if name in profile:
        return profile[name]
    return array_stats(raw, code) if device == "cpu" else tensor_stats(to_torch(raw, code).to(device))


def _decide(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, device: str,
            stats: tuple[dict, dict] | None) -> tuple[dict, float, str | None, dict[int, str]]:
    """(report row, final ratio, the parent the whole tensor is taken from or None, {expert slice: live parent}
    of a fused tensor's dead experts) of a shared float tensor."""
    row = {"kind": tp.kind, "block": tp.block, "genome_ratio": tp.genome_ratio}
    code, code_b = plan.father.tensors[tp.name].dtype, plan.mother.tensors[tp.name].dtype
    stats_a, stats_b = stats or (parent_stats(plan.mri_a, tp.name, a, code, device),
                                 parent_stats(plan.mri_b, tp.name, b, code_b, device))
    ratio, probe_a, probe_b = prescribe.tensor_mri_ratio(stats_a, stats_b, plan.genome.version, tp.block,
                                                         plan.signals_a, plan.signals_b)
    final = prescribe.final_ratio(ratio, tp.genome_ratio, plan.genome.mri_trust())
    donors = prescribe.dead_expert_donors(tp.name, a.shape, tp.block, plan.signals_a, plan.signals_b)
    whole = len(expert_slices(tp.name, a.shape)) == 1  # a per-expert tensor: its one donor takes all of it
    chosen = (next(iter(donors.values()), None) if whole else None) or prescribe.transplant(final, plan.genome.version)
    row.update(mri_ratio=ratio, final_ratio=final, transplant=chosen)
    if probe_a is not None:
        row.update(probe_father=probe_a, probe_mother=probe_b)
    if donors:
        row["dead_expert_donors"] = {str(e): donor for e, donor in donors.items()}
    return row, final, chosen, {} if whole else donors


def _values(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, base: np.ndarray | None, final: float,
            taken: str | None, device: str, ring: BufferRing | None, offset: int = 0) -> np.ndarray:
    """A tensor's (or slice's) raw bits in the father's dtype: one parent's (`taken`) or merged."""
    if taken == "father":
        return a
    code, code_b = plan.father.tensors[tp.name].dtype, plan.mother.tensors[tp.name].dtype
    if taken == "mother":
        return b if code_b == code else to_raw(to_torch(np.ascontiguousarray(b), code_b).to(torch_dtype(code)))
    return _merge_values(plan, tp, a, b, base, final, device, ring, offset)


def merge_tensor(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, base: np.ndarray | None,
                 device: str = "cpu", stats: tuple[dict, dict] | None = None, ring: BufferRing | None = None
                 ) -> tuple[np.ndarray, dict]:
    """One output tensor's raw bits and its merge-report entry, from the parents' raw bits (`stats`: both parents'
    `parent_stats`, computed here when not given; `ring`: where merged values go, else fresh memory)."""
    row = {"kind": tp.kind, "block": tp.block, "genome_ratio": tp.genome_ratio}
    if tp.carried:
        return (a if tp.carried == "father" else b), {**row, "carried": tp.carried}
    if plan.father.tensors[tp.name].dtype not in FLOAT_DTYPES:
        return a, {**row, "mri_ratio": None, "final_ratio": 0.0, "transplant": "father"}
    row, final, chosen, donors = _decide(plan, tp, a, b, device, stats)
    merged = _values(plan, tp, a, b, base, final, chosen, device, ring)
    if donors:  # a fused tensor: each dead expert's slice is the live parent's bytes
        if merged is a or merged is b:
            merged = merged.copy()  # never write into a parent's mapped pages
        for expert, donor in donors.items():
            merged[expert] = _values(plan, tp, a[expert], b[expert], None, final, donor, device, None)
    return merged, row


def merge_slices(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, base: np.ndarray | None,
                 device: str = "cpu", stats: tuple[dict, dict] | None = None, ring: BufferRing | None = None
                 ) -> tuple[Iterator[np.ndarray], dict]:
    """`merge_tensor` of a fused expert tensor (`streamed`), one expert slice at a time: the slices' raw bits, in
    order (each valid until the ring hands its memory out again), and the report entry. The bytes are
    `merge_tensor`'s: a slice's mask bits are the whole tensor's, from its first element's index on."""
    row, final, chosen, donors = _decide(plan, tp, a, b, device, stats)
    size = a[0].size

    def pieces() -> Iterator[np.ndarray]:
        for expert in range(a.shape[0]):
            yield _values(plan, tp, a[expert], b[expert], base[expert] if base is not None else None, final,
                          donors.get(expert, chosen), device, ring, expert * size)

    return pieces(), row


def streamed(plan: MergePlan, tp: TensorPlan) -> bool:
    """Whether the merge writes this tensor slice by slice: a shared fused expert tensor over STREAM_BYTES (a
    35B-A3B's gate_up is 1 GiB a layer), so its memory is a slice's, not the tensor's."""
    info = plan.father.tensors[tp.name]
    return (not tp.carried and info.dtype in FLOAT_DTYPES and info.nbytes > STREAM_BYTES
            and len(expert_slices(tp.name, info.shape)) > 1)


def parents_stats(plan: MergePlan, todo: list[TensorPlan], device: str = "cpu") -> dict[str, tuple[dict, dict]]:
    """Both parents' MRI statistics of every tensor in `todo`, all before the first merge, in parallel threads. As
    fast as counting the next tensor while merging this one (both are CPU-bound on the same cores), and simpler; a
    read is a view of the mapped shard, so this pass holds no tensor."""
    def stats(job: tuple[Checkpoint, dict[str, dict], str]) -> dict | None:
        checkpoint, profile, name = job
        code = checkpoint.tensors[name].dtype
        if code not in FLOAT_DTYPES:
            return None
        return parent_stats(profile, name, checkpoint.read_array(name), code, device)

    shared = [tp for tp in todo if not tp.carried]
    jobs = [(parent, profile, tp.name) for tp in shared
            for parent, profile in ((plan.father, plan.mri_a), (plan.mother, plan.mri_b))]
    with ThreadPoolExecutor(max_workers=cpu_threads(), thread_name_prefix="darwin-stats") as pool:
        found = list(pool.map(stats, jobs))
    return {tp.name: (found[2 * i], found[2 * i + 1]) for i, tp in enumerate(shared)}


def merged_tensors(plan: MergePlan, names: list[str] | None = None, device: str = "cpu",
                   ring: BufferRing | None = None, slices: bool = False
                   ) -> Iterator[tuple[str, np.ndarray | Iterator[np.ndarray], dict]]:
    """(name, raw bits, report entry) in plan order, after `parents_stats`. With a `ring`, a yielded array's memory
    is reused `depth` tensors later: the caller must be done with it by then. With `slices`, a `streamed` tensor
    comes as an iterator over its expert slices (`merge_slices`), to be consumed before the next tensor."""
    wanted = set(names) if names is not None else None
    todo = [tp for tp in plan.tensors if wanted is None or tp.name in wanted]
    stats = parents_stats(plan, todo, device)
    for tp in todo:
        a = plan.father.read_array(tp.name) if tp.carried != "mother" else None
        b = plan.mother.read_array(tp.name) if tp.carried != "father" else None
        base = plan.base.read_array(tp.name) if plan.base is not None and not tp.carried else None
        merge = merge_slices if slices and streamed(plan, tp) else merge_tensor
        tensor, row = merge(plan, tp, a, b, base, device, stats.get(tp.name), ring)
        yield tp.name, tensor, row


def report(plan: MergePlan, rows: dict[str, dict], seconds: float | None = None) -> dict:
    experts: dict[str, dict[str, str]] = {}  # layer -> expert -> the live parent it was taken from
    for row in rows.values():
        for expert, donor in (row.get("dead_expert_donors") or {}).items():
            experts.setdefault(str(row["block"]), {})[expert] = donor
    return {
        "method": plan.method,
        "genome": dict(plan.genome.genes),
        "genome_hash": plan.genome.hash,
        "parents": {"father": plan.father.source, "mother": plan.mother.source,
                    "base": plan.base.source if plan.base is not None else None},
        # parents whose routed experts were read in the father's layout (fused <-> per expert)
        "experts_relaid": [role for role, parent in (("mother", plan.mother), ("base", plan.base))
                           if isinstance(parent, InLayoutOf)],
        "mri_trust": plan.genome.mri_trust(),
        "merge_method_weight": plan.genome.merge_method_weight(),
        "seconds": seconds,
        "dead_experts_from": experts,
        "tensors": rows,
    }


def merge_to_dir(plan: MergePlan, out: str | Path, device: str = "cpu", overwrite: bool = False,
                 progress: Progress | None = None) -> Path:
    """Write the child as an HF checkpoint with the father's shard layout, plus merge_report.json;
    `progress(bytes done, bytes in all)` after every tensor.

    Everything goes to a temporary sibling directory renamed into place at the end: a failed merge leaves no OUT.
    """
    started = time.perf_counter()
    writer = CheckpointWriter(out, template=plan.father.path, overwrite=overwrite,
                              metadata={"genome_hash": plan.genome.hash, "merge_method": plan.method})
    rows: dict[str, dict] = {}
    ring = BufferRing(depth=2)  # one tensor being written while the next is merged
    by_name = {tp.name: tp for tp in plan.tensors}
    done, total = 0, sum(plan.source(tp).nbytes for tp in plan.tensors)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="darwin-write") as write_pool:
            last_write = None
            for shard in plan.shards:
                specs = [(tp.name, plan.source(tp).dtype, plan.source(tp).shape)
                         for tp in plan.tensors if tp.shard == shard]
                stream = writer.shard(shard, specs)
                for name, tensor, row in merged_tensors(plan, [s[0] for s in specs], device, ring, slices=True):
                    if last_write is not None:
                        last_write.result()  # at most one tensor waits for the disk: memory stays bounded
                        last_write = None
                    if isinstance(tensor, np.ndarray):
                        last_write = write_pool.submit(stream.write, name, tensor)
                    else:  # a streamed tensor: each slice merged into the ring and written before the next
                        stream.write(name, tensor)
                    rows[name] = row
                    done += plan.source(by_name[name]).nbytes
                    if progress is not None:
                        progress(done, total)
                if last_write is not None:
                    last_write.result()
                    last_write = None
                stream.close()
        writer.write_text(REPORT_NAME, json.dumps(report(plan, rows, round(time.perf_counter() - started, 3)),
                                                  indent=1))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def merge_into_model(plan: MergePlan, model: torch.nn.Module, device: str = "cpu") -> dict[str, dict]:
    """Fill an already-built model's parameters with the merged tensors (Phase 2 evaluates from memory), placed
    as transformers places that checkpoint's tensors (`place_in_model`: renamed, or converted, e.g. per-expert
    tensors fused). Tensors the model does not build (UNBUILT_KINDS) do not change its fitness and are merged only
    on disk; the tensors the father alone holds are already the skeleton's."""
    import torch

    state = model.state_dict()
    placement = place_in_model(model, [tp.name for tp in plan.tensors])
    # a tensor the father alone holds and the model does not build (a release's k/v of Gemma 4's kv-shared layers)
    # cannot change what the skeleton computes either
    missing = [tp.name for tp in plan.tensors if not placement.placed(tp.name) and tp.kind not in UNBUILT_KINDS
               and tp.carried != "father"]
    if missing:
        raise DarwinError(f"the model has no parameter for {len(missing)} checkpoint tensors, e.g. {missing[0]}")
    by_name = {tp.name: tp for tp in plan.tensors}
    # a converted parameter is built from all its sources, the father's own ones too
    wanted = [tp.name for tp in plan.tensors if placement.placed(tp.name) and (tp.carried != "father"
                                                                               or tp.name in placement.group_of)]
    pending: dict[str, dict[str, torch.Tensor]] = {}  # converted parameter -> its merged sources so far
    rows = {}
    with torch.no_grad():
        for name, raw, row in merged_tensors(plan, wanted, device=device):
            tensor = to_torch(raw, plan.source(by_name[name]).dtype)
            rows[name] = row
            if name in placement.direct:
                state[placement.direct[name]].copy_(tensor)
                continue
            target = placement.group_of[name]
            pending.setdefault(target, {})[name] = tensor.clone()  # `raw` may be recycled memory
            converter, sources = placement.converted[target]
            if len(pending[target]) == len(sources):
                group = copy.deepcopy(converter)  # it collects the tensors it converts
                for source, pattern in sources:
                    group.add_tensor(target, source, pattern, pending[target][source])
                for parameter, value in group.convert(target, model=model, config=model.config).items():
                    state[parameter].copy_(value)
                del pending[target]
    return rows


def load_mri(path: str | Path | None) -> dict[str, dict]:
    """Per-tensor statistics of a parent from a `darwin profile` output, keyed by tensor name."""
    if path is None:
        return {}
    stats = ("norm", "std", "entropy")
    table = read_columns(path, "mri", PROFILE_HINT, ["name", *stats])
    return {name: {key: math.nan if value is None else value for key, value in zip(stats, values)}
            for name, *values in zip(table["name"], *(table[key] for key in stats))}


def existing_merge(out: str | Path, genome: Genome, method: str) -> bool:
    """True when OUT already holds this very merge (same genome_hash and method): merges are idempotent."""
    path = Path(out) / REPORT_NAME
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    return done.get("genome_hash") == genome.hash and done.get("method") == method


__all__ = [
    "METHODS",
    "MergePlan",
    "TensorPlan",
    "asdict",
    "existing_merge",
    "load_mri",
    "merge_into_model",
    "merge_tensor",
    "merge_to_dir",
    "merged_tensors",
    "plan_merge",
    "report",
]
