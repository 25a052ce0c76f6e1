"""The engine: tensor by tensor, the merged raw bits of a plan and each tensor's merge-report row.

Tensors travel as their raw bits in numpy arrays (`Checkpoint.read_array`, a view of the mapped shard): a bf16 or
float32 merge on CPU runs the method's kernel on them directly, in chunks over parallel threads, and never imports
torch (its import alone costs 0.75 s on 2 cores). Parents of different dtypes, CUDA and methods without a
kernel go through float32 torch chunks. Masks come from `darwin.masks` (counter-based), so the same genome gives the
same bytes on any device, worker, chunking or order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from darwin import masks, prescribe
from darwin.checkpoint import FLOAT_DTYPES, Checkpoint, to_raw, to_torch, torch_dtype
from darwin.experts import expert_slices
from darwin.merge.methods import KERNEL_DTYPES, torch_merge
from darwin.merge.plan import MergePlan, TensorPlan
from darwin.mri import array_stats, tensor_stats
from darwin.profiles import ParentProfile
from darwin.runtime import cpu_threads

# The direct kernel makes no temporaries and runs no torch op per chunk, so its chunks are large: at masks.CHUNK
# most of the time of a large tensor goes to slicing and futures, not to the kernel.
DIRECT_CHUNK = 1 << 20
# A fused expert tensor larger than this is merged and written one expert slice at a time (`streamed`)
STREAM_BYTES = 256 << 20


def direct_chunk(numel: int, workers: int) -> int:
    """At most DIRECT_CHUNK elements, in a multiple of `workers` equal chunks (a 1.05M-element tensor cut into 1M
    and 48K would keep one thread busy while the other waits). A tensor of a few thousand elements stays whole."""
    if numel <= DIRECT_CHUNK // 16:
        return max(1, numel)
    pieces = -(-numel // DIRECT_CHUNK)
    pieces = -(-pieces // workers) * workers
    return -(-numel // pieces)


class BufferRing:
    """Output memory recycled over a stream of merged tensors: `take` hands out slot after slot, so a tensor's
    memory returns `depth` tensors later, when its consumer must be done with it. Fresh memory costs a page fault
    per 4 KiB on first write: about twice the merge kernel's own time per element."""

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


@functools.cache
def _chunk_pool(workers: int) -> ThreadPoolExecutor:
    """The kernel's threads, started once per process: starting them costs more than merging a small tensor."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="darwin-merge")


def _merge_values(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, base: np.ndarray | None,
                  final: float, device: str, ring: BufferRing | None = None, offset: int = 0) -> np.ndarray:
    """The merged raw bits of one tensor, or of the part of it that starts at element `offset` (one expert's slice
    of a fused tensor: the mask bits are the whole tensor's), from its parents' raw bits (`Checkpoint.read_array`)."""
    genome, spec = plan.genome, plan.spec
    code = plan.father.tensors[tp.name].dtype
    codes = (code, plan.mother.tensors[tp.name].dtype, plan.base.tensors[tp.name].dtype if base is not None else code)
    density_a, density_b = genome["density_a"], genome["density_b"]
    blend = genome.merge_method_weight()
    seed = masks.tensor_seed(genome.hash, tp.name)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    flat_base = base.reshape(-1) if base is not None else None
    out = ring.take(a.size, a.dtype) if ring is not None else np.empty(a.size, dtype=a.dtype)
    fused = device == "cpu" and spec.fused
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


def parent_stats(profile: ParentProfile, name: str, raw: np.ndarray, code: str, device: str = "cpu") -> dict:
    """A parent's MRI statistics of a tensor: from its profile, else computed from its raw bits in hand."""
    if name in profile.stats:
        return profile.stats[name]
    return array_stats(raw, code) if device == "cpu" else tensor_stats(to_torch(raw, code).to(device))


def _decide(plan: MergePlan, tp: TensorPlan, a: np.ndarray, b: np.ndarray, device: str,
            stats: tuple[dict, dict] | None) -> tuple[dict, float, str | None, dict[int, str]]:
    """(report row, final ratio, the parent the whole tensor is taken from or None, {expert slice: live parent}
    of a fused tensor's dead experts) of a shared float tensor."""
    row = {"kind": tp.kind, "block": tp.block, "genome_ratio": tp.genome_ratio}
    code, code_b = plan.father.tensors[tp.name].dtype, plan.mother.tensors[tp.name].dtype
    profile_a, profile_b = plan.profiles
    stats_a, stats_b = stats or (parent_stats(profile_a, tp.name, a, code, device),
                                 parent_stats(profile_b, tp.name, b, code_b, device))
    ratio, probe_a, probe_b = prescribe.tensor_mri_ratio(stats_a, stats_b, plan.genome.version, tp.block,
                                                         profile_a, profile_b)
    final = prescribe.final_ratio(ratio, tp.genome_ratio, plan.genome.mri_trust())
    donors = prescribe.dead_expert_donors(tp.name, a.shape, tp.block, profile_a, profile_b)
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
    def stats(job: tuple[Checkpoint, ParentProfile, str]) -> dict | None:
        checkpoint, profile, name = job
        code = checkpoint.tensors[name].dtype
        if code not in FLOAT_DTYPES:
            return None
        return parent_stats(profile, name, checkpoint.read_array(name), code, device)

    shared = [tp for tp in todo if not tp.carried]
    jobs = [(parent, profile, tp.name) for tp in shared
            for parent, profile in zip((plan.father, plan.mother), plan.profiles)]
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
