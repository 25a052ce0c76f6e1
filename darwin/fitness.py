"""Phase 2 fitness of one genome: merge into a model held in memory, score it with lm-eval, cache the result.

Each worker (a thread of the local task runner, or a Ray worker process) loads the father once as the skeleton,
then overwrites its parameters tensor by tensor for every candidate: no checkpoint is written and nothing is
allocated twice. Results are cached on disk by (parents' fingerprints, genome_hash, tasks, limit), so a genome
is never evaluated twice, across runs and across resumed runs too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from darwin.checkpoint import Checkpoint, torch_dtype
from darwin.evaluate import TaskSet, evaluate, fitness_cache_key
from darwin.genome import Genome
from darwin.merge import load_mri, merge_into_model, plan_merge
from darwin.prescribe import load_signals
from darwin.runtime import CACHE_ROOT, load_pretrained

# Phase 1's measured proxy: the same tasks on their first questions only.
MEASURED_LIMIT = 16
DEFAULT_CACHE = CACHE_ROOT / "fitness"


@dataclass(frozen=True)
class Parents:
    """What every candidate of a run shares: small and picklable, so it travels to any worker."""

    father: str
    mother: str
    method: str
    base: str | None = None
    mri_father: str | None = None
    mri_mother: str | None = None
    probes_father: str | None = None
    probes_mother: str | None = None


class FitnessCache:
    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else DEFAULT_CACHE

    def get(self, key: str) -> dict | None:
        path = self.directory / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{key}.{uuid.uuid4().hex[:6]}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.directory / f"{key}.json")


class _Worker(threading.local):
    """Per worker thread: the parents' headers, the skeleton model and its tokenizer, built on first use."""

    key: Parents | None = None


_worker = _Worker()
_device_counter = iter(range(1 << 30))
_device_lock = threading.Lock()


def worker_device(requested: str) -> str:
    """auto: one GPU per worker thread, round robin over the visible GPUs (pinned for the thread's life)."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "cpu"
    if not hasattr(_worker, "device"):
        with _device_lock:
            _worker.device = f"cuda:{next(_device_counter) % torch.cuda.device_count()}"
    return _worker.device


def _prepare(parents: Parents, device: str):
    if _worker.key != parents or getattr(_worker, "model_device", None) != device:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        father = Checkpoint(parents.father)
        _worker.checkpoints = (father, Checkpoint(parents.mother),
                               Checkpoint(parents.base) if parents.base else None)
        _worker.mri = (load_mri(parents.mri_father), load_mri(parents.mri_mother))
        _worker.signals = (load_signals(parents.probes_father), load_signals(parents.probes_mother))
        dtype = torch_dtype(next(iter(father.tensors.values())).dtype)
        _worker.model = load_pretrained(AutoModelForCausalLM, father.path, dtype=dtype).to(device).eval()
        _worker.tokenizer = AutoTokenizer.from_pretrained(father.path)
        _worker.key, _worker.model_device = parents, device
    return _worker


def fingerprints(parents: Parents) -> dict[str, str]:
    paths = {"father": parents.father, "mother": parents.mother, "base": parents.base}
    return {role: Checkpoint(path).fingerprint() for role, path in paths.items() if path}


def evaluate_genome(parents: Parents, genes: dict, tasks: TaskSet, limit: int | None = None, batch_size: int = 8,
                    device: str = "auto", cache: FitnessCache | None = None,
                    parent_fingerprints: dict[str, str] | None = None) -> dict:
    """The fitness record of one genome: fitness, per-task scores, per-question correctness, timings."""
    genome = Genome.from_dict(genes)
    cache = cache or FitnessCache()
    key = fitness_cache_key(parent_fingerprints or fingerprints(parents), genome.hash, tasks, limit)
    hit = cache.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    started = time.perf_counter()
    device = worker_device(device)
    worker = _prepare(parents, device)
    father, mother, base = worker.checkpoints
    plan = plan_merge(father, mother, genome, parents.method, base=base, mri_a=worker.mri[0], mri_b=worker.mri[1],
                      signals_a=worker.signals[0], signals_b=worker.signals[1])
    merge_into_model(plan, worker.model, device=device)
    merged = time.perf_counter()
    with torch.no_grad():
        result = evaluate(worker.model, worker.tokenizer, tasks, limit=limit, batch_size=batch_size)
    record = {
        "genome_hash": genome.hash, "genes": dict(genome.genes), "fitness": result.fitness, "scores": result.scores,
        "per_question": result.per_question, "merge_seconds": round(merged - started, 3),
        "eval_seconds": round(result.seconds, 3), "seconds": round(time.perf_counter() - started, 3),
        "worker": f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}:{device}",
    }
    cache.put(key, record)
    return {**record, "cached": False}


def prefix_score(record: dict, questions: int = MEASURED_LIMIT) -> float:
    """The measured proxy read off a full evaluation: mean accuracy over each task's first questions."""
    per_task = [sum(q[:questions]) / max(1, len(q[:questions])) for q in record["per_question"].values()]
    return sum(per_task) / len(per_task)
