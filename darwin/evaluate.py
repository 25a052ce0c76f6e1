"""Fitness: lm-eval on a model held in memory, with per-question results for paired statistics.

A candidate child is evaluated as a live `transformers` model wrapped in lm-eval's HFLM, so Phase 2 writes no
checkpoint. Tasks are lm-eval task names (`arc_challenge`) or paths to local task YAML files of the same shape
(`dataset_path: json`), which is how the tool runs offline: `arc_task_file` writes a local copy of lm-eval's own
`arc_challenge` config pointing at ai2_arc-schema JSON Lines.

The score of a task is `acc_norm` when it reports one, else `acc`, or the metric the run config names for it
(`phase2.metrics`, any metric lm-eval knows to be better higher, `metric` or `metric,filter` as lm-eval reports it);
fitness is the unweighted mean over the leaf tasks (a group such as `mmlu` counts each subtask once). lm-eval's
`num_fewshot`, `apply_chat_template` and `fewshot_as_multiturn` mean what they mean in lm-eval (`EvalOptions`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from darwin.errors import DarwinError
from darwin.vllm_engine import VLLMSettings

TEMPLATE = Path(__file__).parent / "data" / "tasks" / "arc_challenge_local.yaml"
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
METRICS = ("acc_norm", "acc")
# lm-eval's default fewshot seed (lm_eval.defaults.DEFAULT_OTHER_SEED), so a few-shot task samples as lm-eval does.
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class EvalOptions:
    """How lm-eval evaluates the tasks, as its own options of the same names, and which model runs them: lm-eval's
    HFLM over the transformers model (`hf`) or a vLLM engine (`vllm`: darwin.vllm_engine, with `vllm`'s settings)."""

    num_fewshot: int | None = None  # None: each task's own (0 where its config says nothing)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    metrics: tuple[tuple[str, str], ...] = ()  # (leaf task, metric or "metric,filter"); the others: acc_norm, acc
    backend: str = "hf"
    vllm: VLLMSettings | None = None


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, float]  # leaf task -> its metric
    fitness: float  # mean of scores
    # leaf task -> correctness of each question, in document order (its metric's full mark: 1 of acc, exact_match)
    per_question: dict[str, list[bool]]
    seconds: float
    # leaf task -> per question of a multiple-choice task, the right choice's score minus the best wrong one's
    # (log-likelihood, per character for acc_norm, as the metric compares them): positive where answered right; of
    # a generative task, the metric's value of the question
    margins: dict[str, list[float]] = field(default_factory=dict)
    # leaf task -> what its score is: the metric ("metric,filter" for a filter other than none) and lm-eval's
    # output type of the task (the model card's model-index names both)
    metrics: dict[str, dict[str, str]] = field(default_factory=dict)


def _is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or Path(spec).is_file()


class TaskSet:
    """lm-eval task objects built once and reused by every `evaluate` call of a worker.

    Indexing lm-eval's built-in task configs (needed for task names, skipped for local files) takes seconds,
    and each task loads its dataset when built. A Task object holds the requests of the evaluation running on
    it, so each thread builds its own copy of the tasks (once); the index is shared.
    """

    def __init__(self, tasks: Sequence[str | Path], split: str | None = None, options: EvalOptions = EvalOptions()):
        from lm_eval.tasks import TaskManager

        self.specs = tuple(str(t) for t in tasks)
        self.split = split
        self.options = options
        if not self.specs:
            raise DarwinError("no fitness tasks given")
        names = [s for s in self.specs if not _is_task_file(s)]
        for spec in self.specs:
            if spec not in names and not Path(spec).is_file():
                raise DarwinError(f"task file {spec} does not exist")
        with _quiet():
            self._manager = TaskManager(include_defaults=bool(names))
        unknown = [n for n in names if n not in self._manager.all_tasks]
        if unknown:
            raise DarwinError(f"unknown lm-eval task(s): {', '.join(unknown)}")
        self._local = threading.local()
        self.loaded()  # a broken task file or missing dataset fails here, before any evaluation

    def loaded(self) -> dict:
        """This thread's `TaskManager.load` result: {"tasks": {name: Task}, "groups": ..., "group_map": ...}."""
        loaded = getattr(self._local, "loaded", None)
        if loaded is None:
            with _quiet():
                try:
                    loaded = self._manager.load(list(self.specs))
                except (OSError, ValueError, KeyError) as exc:
                    raise DarwinError(f"cannot load fitness tasks {list(self.specs)}: {exc}") from None
            for name, task in loaded["tasks"].items():
                # as simple_evaluate does: the run's num_fewshot unless the task's config fixes 0, else zero-shot
                # unless the task config asks for examples
                if self.options.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=self.options.num_fewshot)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
                if self.split:
                    _evaluate_on(name, task, self.split)
            _check_metrics(dict(self.options.metrics), loaded["tasks"])
            if self.options.backend == "vllm":
                from darwin.vllm_engine import OUTPUT_TYPES

                other = [f"{name} ({task.OUTPUT_TYPE})" for name, task in loaded["tasks"].items()
                         if task.OUTPUT_TYPE not in OUTPUT_TYPES]
                if other:
                    raise DarwinError(f"phase2.backend vllm scores loglikelihood and multiple-choice tasks, not "
                                      f"{', '.join(other)}: use the hf backend for those")
            self._local.loaded = loaded
        return loaded

    def __getstate__(self):
        # threading.local does not pickle (Ray ships arguments to workers); the receiver rebuilds its tasks
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


def _check_metrics(chosen: dict[str, str], tasks: dict) -> None:
    """A chosen metric names a leaf task of the run and a metric that task computes, better higher."""
    unknown = sorted(set(chosen) - set(tasks))
    if unknown:
        raise DarwinError(f"phase2.metrics names {', '.join(unknown)}, not a task of this run "
                          f"(its tasks: {', '.join(sorted(tasks))})")
    for name, spec in chosen.items():
        metric = spec.partition(",")[0]
        better = tasks[name].higher_is_better()
        if metric not in better:
            raise DarwinError(f"task {name} computes no {metric!r} (it computes {', '.join(sorted(better))})")
        if not better[metric]:
            raise DarwinError(f"{metric!r} of task {name} is better lower; darwin's fitness is maximised and takes a "
                              "metric that is better higher")


def _metric_key(name: str, metrics: dict, chosen: str | None) -> tuple[str, str]:
    """(metric, filter) of the task's result: the chosen `metric[,filter]` (filter `none`, else the first reported),
    by default acc_norm, else acc."""
    if chosen is None:
        metric = next((m for m in METRICS if f"{m},none" in metrics), None)
        if metric is None:
            raise DarwinError(f"task {name} reports neither acc_norm nor acc: name its metric in phase2.metrics")
        return metric, "none"
    metric, _, wanted = chosen.partition(",")
    filters = [key.partition(",")[2] for key in metrics if key.partition(",")[0] == metric and "_stderr" not in key]
    chosen_filter = wanted or ("none" if "none" in filters else (filters or [None])[0])
    if chosen_filter not in filters:
        raise DarwinError(f"task {name} reports {metric} under filters {filters}, not {chosen_filter!r}")
    return metric, chosen_filter


def _evaluate_on(name: str, task, split: str) -> None:
    """Point lm-eval's evaluation documents (its test split, else validation) at the task's `split` split."""
    source = task.get_config(SPLIT_KEYS[split])
    if source is None or source not in (task.dataset or {}):
        raise DarwinError(f"task {name} has no {split} split")
    task.set_config(key="test_split", value=source)


def check_chat_template(model_dir: str | Path) -> None:
    """apply_chat_template needs a tokenizer that has one (lm-eval fails on the first request otherwise)."""
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(model_dir).chat_template:
        raise DarwinError(f"phase2.apply_chat_template is set, but the tokenizer of {model_dir} has no chat template")


@functools.cache
def prepared_tasks(specs: tuple[str, ...], split: str | None = None, options: EvalOptions = EvalOptions()) -> TaskSet:
    """One TaskSet per task list, split, options and process: checking a run's tasks up front and running them then
    share it (a task given by name costs lm-eval's index of its built-in tasks, seconds each time)."""
    return TaskSet(specs, split, options)


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | Path] | TaskSet,
    limit: int | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
) -> EvalResult:
    """Score an in-memory causal LM on lm-eval tasks (names, task YAML paths, or a prepared TaskSet).

    The model runs where it is, or is first moved (in place) to `device` when one is given: HFLM ignores its
    own device argument for a live model. Pass a TaskSet when evaluating many models on the same tasks.
    `batch_size` "auto" is lm-eval's: the largest that fits, found once per model.
    """
    from lm_eval.models.huggingface import HFLM

    task_set = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    if device is not None:
        model.to(device)
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return evaluate_lm(lm, task_set, limit)


def evaluate_lm(lm, task_set: TaskSet, limit: int | None = None) -> EvalResult:
    """Score an lm-eval model (HFLM, or darwin.vllm_engine's) on a prepared TaskSet."""
    from lm_eval.evaluator import evaluate as lm_evaluate

    start = time.perf_counter()
    loaded = task_set.loaded()
    with _quiet():
        # lm_eval.evaluator.evaluate rather than simple_evaluate: the latter reseeds the global RNGs and collects
        # environment info (pip list and git in subprocesses, ~0.3 s a call)
        options = task_set.options
        results = lm_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True,
                              apply_chat_template=options.apply_chat_template,
                              fewshot_as_multiturn=options.fewshot_as_multiturn)
    scores, per_question, margins, metrics = {}, {}, {}, {}
    chosen = dict(task_set.options.metrics)
    for name, task in loaded["tasks"].items():
        metric, filter_name = _metric_key(name, results["results"][name], chosen.get(name))
        scores[name] = float(results["results"][name][f"{metric},{filter_name}"])
        metrics[name] = {"metric": metric if filter_name == "none" else f"{metric},{filter_name}",
                         "output_type": task.OUTPUT_TYPE}
        samples = sorted((s for s in results["samples"][name] if s.get("filter", "none") == filter_name),
                         key=lambda s: s["doc_id"])
        values = [s[metric] for s in samples]
        if not all(isinstance(v, (bool, int, float)) for v in values):
            raise DarwinError(f"{metric} of task {name} is computed over the whole corpus, not per question; darwin's "
                              "fitness takes a per-question metric (acc, acc_norm, exact_match, f1, ...)")
        per_question[name] = [float(v) >= 1.0 for v in values]
        multiple_choice = task.OUTPUT_TYPE == "multiple_choice"
        margins[name] = [_margin(task, s, metric) if multiple_choice else float(s[metric]) for s in samples]
    fitness = sum(scores.values()) / len(scores)
    return EvalResult(scores, fitness, per_question, time.perf_counter() - start, margins, metrics)


def _margin(task, sample: dict, metric: str) -> float:
    """The right choice's log-likelihood minus the best wrong choice's, per character of the choice for acc_norm
    (lm-eval's own normalisation): a continuous version of the question's correctness."""
    lls = [float(response[0]) for response in sample["filtered_resps"]]
    if metric == "acc_norm":
        lls = [ll / max(1, len(choice)) for ll, choice in zip(lls, task.doc_to_choice(sample["doc"]), strict=True)]
    golds = {int(g) for g in (sample["target"] if isinstance(sample["target"], list) else [sample["target"]])}
    wrong = [ll for index, ll in enumerate(lls) if index not in golds]
    return max(lls[g] for g in golds) - max(wrong) if wrong else 0.0


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs at INFO/WARNING per call and per truncated request; a Phase 2 run makes thousands of calls."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def multiple_choice_task_file(name: str, data_files: Mapping[str, str | Path], out_dir: str | Path) -> Path:
    """Write `out_dir/<name>.yaml`: lm-eval's arc_challenge config over local ARC-format JSON Lines.

    `data_files` maps splits (train, validation, test) to files; lm-eval evaluates on test, else validation.
    """
    unknown = set(data_files) - set(SPLIT_KEYS)
    if unknown:
        raise DarwinError(f"task {name}: unknown split(s) {sorted(unknown)} (use {', '.join(SPLIT_KEYS)})")
    if not {"test", "validation"} & set(data_files):
        raise DarwinError(f"task {name}: a test or validation file is needed to evaluate on")
    files = {split: Path(path).expanduser().resolve() for split, path in data_files.items()}
    for split, path in files.items():
        if not path.is_file():
            raise DarwinError(f"task {name}: {split} file {path} does not exist")
    config = yaml.safe_load(TEMPLATE.read_text())
    config["task"] = name
    config["dataset_kwargs"]["data_files"] = {split: str(path) for split, path in files.items()}
    for split, key in SPLIT_KEYS.items():
        if split not in files:
            del config[key]
    out = Path(out_dir) / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def arc_task_file(data_dir: str | Path, out_dir: str | Path) -> Path:
    """The local arc_challenge task over `data_dir/{train,validation,test}.jsonl` (ai2_arc schema)."""
    data_dir = Path(data_dir)
    files = {split: data_dir / f"{split}.jsonl" for split in SPLIT_KEYS if (data_dir / f"{split}.jsonl").is_file()}
    if "test" not in files:
        raise DarwinError(f"no ARC data in {data_dir}: test.jsonl is missing")
    return multiple_choice_task_file("arc_challenge_local", files, out_dir)


def _hash_data_files(files):
    if isinstance(files, Mapping):
        return {split: _hash_data_files(f) for split, f in files.items()}
    if isinstance(files, (list, tuple)):
        return [_hash_data_files(f) for f in files]
    path = Path(files)
    if not path.is_file():
        raise DarwinError(f"data file {files} of a fitness task does not exist")
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def task_identity(spec: str | Path) -> str | dict:
    """A task name as is; a task file as its resolved config with its data files replaced by content hashes.

    So a task file keys the same wherever it and its data live, and changes key when its config or data change.
    """
    spec = str(spec)
    if not _is_task_file(spec):
        return spec
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(spec)
    if not path.is_file():
        raise DarwinError(f"task file {spec} does not exist")
    config = load_yaml(path, resolve_func=False)
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _hash_data_files(kwargs["data_files"])}
    return config


def fitness_cache_key(
    inputs: Mapping[str, str | None],
    genome_hash: str,
    tasks: Sequence[str | Path] | TaskSet,
    limit: int | None,
) -> str:
    """sha256 of canonical JSON over what determines a fitness: the run's fixed inputs (parents' content, method,
    probe and routing tables, prescription rules: `darwin.fitness.run_inputs`), genome, tasks with their split and
    evaluation options, limit.

    Task order does not change the fitness (a mean), so tasks are sorted.
    """
    specs, split = (tasks.specs, tasks.split) if isinstance(tasks, TaskSet) else (tasks, None)
    identities = sorted(json.dumps(task_identity(t), sort_keys=True, default=str) for t in specs)
    payload = {"inputs": dict(inputs), "genome": genome_hash, "tasks": identities, "split": split, "limit": limit}
    options = tasks.options if isinstance(tasks, TaskSet) else EvalOptions()
    if options != EvalOptions():  # lm-eval's defaults add nothing to the key
        payload["options"] = asdict(options)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
