"""The child on disk: an HF checkpoint in the father's shard layout, written while the next tensor merges, with
merge_report.json; all of it or nothing."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from darwin.checkpoint import CheckpointWriter
from darwin.experts import InLayoutOf
from darwin.genome import Genome
from darwin.merge.engine import BufferRing, merged_tensors
from darwin.merge.plan import MergePlan
from darwin.progress import Progress

REPORT_NAME = "merge_report.json"


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


def existing_merge(out: str | Path, genome: Genome, method: str) -> bool:
    """True when OUT already holds this very merge (same genome_hash and method): merges are idempotent."""
    path = Path(out) / REPORT_NAME
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    return done.get("genome_hash") == genome.hash and done.get("method") == method
