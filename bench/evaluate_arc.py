"""Where the time of one fitness evaluation goes: lm-eval on 20 ARC-Challenge questions with a pico model.

Phase 2 evaluates hundreds of genomes per run, so the fixed cost of a call matters as much as the forward passes.
Run: python bench/evaluate_arc.py [ARC_DIR] [--calls N]. Uses a fresh datasets cache so the first call is cold.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="darwin-bench-datasets-")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arc_dir", nargs="?", default=ROOT.parent / "shared" / "data" / "arc", type=Path)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()

    _, t_import = timed(lambda: __import__("lm_eval.evaluator"))
    import lm_eval
    import pico
    import picotok
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from darwin.evaluate import TaskSet, _quiet, arc_task_file, evaluate

    model, tok = pico.build("llama").float(), picotok.build()
    task_file = arc_task_file(args.arc_dir, tempfile.mkdtemp(prefix="darwin-bench-tasks-"))
    rows = [("import lm_eval.evaluator", t_import)]

    tasks, t = timed(lambda: TaskSet([task_file]))
    rows.append(("TaskSet, cold datasets cache (json -> arrow)", t))
    rows.append(("TaskSet, warm datasets cache", timed(lambda: TaskSet([task_file]))[1]))
    with _quiet():
        rows.append(("HFLM(pretrained=model) construction", timed(lambda: HFLM(pretrained=model, tokenizer=tok))[1]))
        rows.append(("TaskManager() index of lm-eval's built-in tasks", timed(TaskManager)[1]))

    reuse = [evaluate(model, tok, tasks, limit=args.limit).seconds for _ in range(args.calls)]
    rows.append((f"evaluate(TaskSet) first call, {args.limit} questions", reuse[0]))
    rows.append((f"evaluate(TaskSet) later calls, median of {args.calls - 1}", statistics.median(reuse[1:])))
    fresh = [evaluate(model, tok, [task_file], limit=args.limit).seconds for _ in range(args.calls)]
    rows.append((f"evaluate([task file]) median of {args.calls}", statistics.median(fresh)))

    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
        simple = [timed(lambda: lm_eval.simple_evaluate(model=lm, tasks=list(tasks.loaded()["tasks"].values()),
                                                         limit=args.limit, bootstrap_iters=0))[1]
                  for _ in range(args.calls)]
    rows.append((f"lm_eval.simple_evaluate (same HFLM, tasks) median of {args.calls}", statistics.median(simple)))

    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.3f} s")


if __name__ == "__main__":
    main()
