"""Phase 2 fitness of one genome: merge into a model held in memory, score it with lm-eval, cache the result.

Each worker (a thread of the local task runner, or a Ray worker process) loads the father once as the skeleton,
then overwrites its parameters tensor by tensor for every candidate: no checkpoint is written and nothing is
allocated twice. With `phase2.backend: vllm` the worker holds a vLLM engine on the father instead and loads each
candidate's merged tensors into it in place (darwin.vllm_engine). Results are cached on disk by everything that
changes a score (`run_inputs`, genome_hash, tasks, limit), so a genome is never evaluated twice, across runs and
across resumed runs too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from darwin.checkpoint import Checkpoint, content_sha256, torch_dtype
from darwin.evaluate import EvalOptions, EvalResult, TaskSet, evaluate, evaluate_lm, fitness_cache_key
from darwin.genome import Genome
from darwin.merge import merge_into_model, merged_tensors
from darwin.parents import Parents
from darwin.prescribe import RULES_VERSION
from darwin.runtime import CACHE_ROOT, pick_device
from darwin.vllm_engine import VLLMEngine, VLLMSettings, engine_lm

# Phase 1's measured proxy: the same tasks on their first questions only, scored by the mean margin of the right
# answer (continuous) rather than accuracy on so few questions.
MEASURED_LIMIT = 16
DEFAULT_CACHE = CACHE_ROOT / "fitness"
# Part of every cache key: bump when a cached record gains or changes a field (a record without `margins` broke the
# measured proxy of a later darwin)
RECORD_VERSION = 2


@dataclass(frozen=True)
class Scoring:
    """How a phase scores every candidate: small and picklable, as `Parents`."""

    tasks: TaskSet
    limit: int | None = None  # questions per task (None: all)
    batch_size: int | str = 8
    device: str = "auto"
    cache: str | None = None  # where the fitness cache is (a directory or an fsspec URL; None: DARWIN_CACHE/fitness)


@dataclass(frozen=True)
class FitnessRecord:
    """What one genome scored: the fitness, per-task scores, per-question correctness and margins of the right
    answer, and where the time went. The fitness cache keeps it as JSON (`to_json`), the history one row of it."""

    genome: Genome
    fitness: float
    scores: dict[str, float] = field(default_factory=dict)
    per_question: dict[str, list[bool]] = field(default_factory=dict)
    margins: dict[str, list[float]] = field(default_factory=dict)
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    seconds: float | None = None
    worker: str | None = None  # host:pid:thread:device
    cached: bool = False  # served by the fitness cache
    failed: bool = False  # its merge or evaluation failed after retries: the worst fitness
    error: str | None = None

    def to_json(self) -> dict:
        fields = asdict(self)
        del fields["genome"], fields["cached"]
        return {"genome_hash": self.genome.hash, "genes": dict(self.genome.genes), **fields}

    @classmethod
    def from_json(cls, entry: dict, cached: bool = False) -> FitnessRecord:
        fields = {key: value for key, value in entry.items() if key not in ("genome_hash", "genes")}
        return cls(Genome.from_dict(entry["genes"]), **fields, cached=cached)

    def measured(self, questions: int = MEASURED_LIMIT) -> float:
        """The measured proxy of this evaluation: over tasks, the mean margin of the right answer on each task's
        first `questions` questions (a Phase 2 record holds them all, so its proxy costs nothing)."""
        per_task = [sum(m[:questions]) / max(1, len(m[:questions])) for m in self.margins.values()]
        return sum(per_task) / len(per_task)


class FitnessCache:
    """One JSON entry per key in a directory or at any fsspec URL (`s3://bucket/prefix`: the nodes of a Ray cluster
    then share one cache). Every entry appears whole or not at all: a local one is written under a temporary name
    and renamed, an object store's PUT is atomic per object."""

    def __init__(self, location: str | Path | None = None):
        from fsspec.implementations.local import LocalFileSystem

        from darwin.publish import open_destination

        self.location = str(location or DEFAULT_CACHE)
        self.fs, self.root = open_destination(self.location)
        self.local = isinstance(self.fs, LocalFileSystem)

    def get(self, key: str) -> FitnessRecord | None:
        try:
            return FitnessRecord.from_json(json.loads(self.fs.cat_file(f"{self.root}/{key}.json")), cached=True)
        except FileNotFoundError:
            return None

    def put(self, key: str, record: FitnessRecord) -> None:
        data, path = json.dumps(record.to_json()).encode(), f"{self.root}/{key}.json"
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        directory = Path(self.root)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{key}.{uuid.uuid4().hex[:6]}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)


class _Worker(threading.local):
    """Per worker thread: the parents' headers, the skeleton model (or vLLM engine) and its tokenizer, built on
    first use."""

    key: Parents | None = None
    backend: tuple | None = None
    engine: VLLMEngine | None = None


_worker = _Worker()


def _load(checkpoint: Checkpoint, device: str):
    """(model in the checkpoint's dtype on `device`, tokenizer), as transformers loads that checkpoint."""
    from transformers import AutoTokenizer

    dtype = torch_dtype(next(iter(checkpoint.tensors.values())).dtype)
    model = checkpoint.load_model(dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint.path)


def _prepare(parents: Parents, device: str, options: EvalOptions):
    """The worker's parents and what scores a candidate: the father's skeleton model (hf), or a vLLM engine on
    the father's checkpoint (vllm), built once."""
    backend = (options.backend, options.vllm)
    if _worker.key != parents or getattr(_worker, "model_device", None) != device or _worker.backend != backend:
        if getattr(_worker, "engine", None) is not None:
            _worker.engine.close()
        _worker.parents = parents.open()
        father = _worker.parents.father
        _worker.model = _worker.engine = None
        if options.backend == "vllm":
            from transformers import AutoTokenizer

            _worker.engine = VLLMEngine(father.path, options.vllm or VLLMSettings())
            _worker.tokenizer = AutoTokenizer.from_pretrained(father.path)
        else:
            _worker.model, _worker.tokenizer = _load(father, device)
        _worker.key, _worker.model_device, _worker.backend = parents, device, backend
    return _worker


def score_model(path: str, tasks: TaskSet, limit: int | None = None, batch_size: int | str = 8,
                device: str = "auto") -> EvalResult:
    """A checkpoint on disk scored on `tasks` (the held-out report scores father, mother and child so), with the
    tasks' backend."""
    options = tasks.options if isinstance(tasks, TaskSet) else EvalOptions()
    if options.backend == "vllm":
        from transformers import AutoTokenizer

        checkpoint = Checkpoint(path)
        engine = VLLMEngine(checkpoint.path, options.vllm or VLLMSettings())
        try:
            return evaluate_lm(engine_lm(engine, AutoTokenizer.from_pretrained(checkpoint.path)), tasks, limit)
        finally:
            engine.close()
    model, tokenizer = _load(Checkpoint(path), pick_device(device))
    with torch.no_grad():
        return evaluate(model, tokenizer, tasks, limit=limit, batch_size=batch_size)


def run_inputs(parents: Parents) -> dict[str, str | None]:
    """What a run's every fitness depends on besides genome and tasks: the parents' content, the method, the probe
    and routing tables the prescription reads, the version of the prescription rules and of the record."""
    paths = {"father": parents.father, "mother": parents.mother, "base": parents.base}
    inputs = {role: Checkpoint(path).fingerprint() for role, path in paths.items() if path}
    for role, directory in (("father", parents.probes_father), ("mother", parents.probes_mother)):
        for table in ("probes", "routing"):
            path = Path(directory, f"{table}.parquet") if directory else None
            inputs[f"{table}_{role}"] = content_sha256(path) if path and path.is_file() else None
    return {**inputs, "method": parents.method, "rules": str(RULES_VERSION), "record": str(RECORD_VERSION)}


def evaluate_genome(parents: Parents, genome: Genome, tasks: TaskSet, limit: int | None = None,
                    batch_size: int | str = 8, device: str = "auto", cache: FitnessCache | None = None,
                    inputs: dict[str, str | None] | None = None) -> FitnessRecord:
    """The fitness record of one genome, from the cache when any run scored it on the same inputs before."""
    cache = cache or FitnessCache()
    key = fitness_cache_key(inputs or run_inputs(parents), genome.hash, tasks, limit)
    hit = cache.get(key)
    if hit is not None:
        return hit
    started = time.perf_counter()
    device = pick_device(device)
    options = tasks.options if isinstance(tasks, TaskSet) else EvalOptions()
    worker = _prepare(parents, device, options)
    plan = worker.parents.plan(genome)
    if worker.engine is not None:  # the merged tensors under their checkpoint names, into vLLM in place
        # every tensor of the father's checkpoint, as the engine loaded them at its start; a tensor the mother
        # alone holds has no parameter in a model built from his
        dtypes = {tp.name: plan.source(tp).dtype for tp in plan.tensors if tp.carried != "mother"}
        worker.engine.load((name, dtypes[name], raw) for name, raw, _ in merged_tensors(plan, list(dtypes)))
        merged = time.perf_counter()
        result = evaluate_lm(engine_lm(worker.engine, worker.tokenizer), tasks, limit)
    else:
        merge_into_model(plan, worker.model, device=device)
        merged = time.perf_counter()
        with torch.no_grad():
            result = evaluate(worker.model, worker.tokenizer, tasks, limit=limit, batch_size=batch_size)
    record = FitnessRecord(
        genome, result.fitness, result.scores, result.per_question, result.margins,
        merge_seconds=round(merged - started, 3), eval_seconds=round(result.seconds, 3),
        seconds=round(time.perf_counter() - started, 3),
        worker=f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}:{device}")
    cache.put(key, record)
    return record
