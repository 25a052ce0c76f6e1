import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# darwin's cache (fitness results, content hashes, fetched models) of this session only: the user's cache may hold
# records of another darwin, and the suite must not leave its own behind
os.environ["DARWIN_CACHE"] = tempfile.mkdtemp(prefix="darwin-test-cache-")
atexit.register(shutil.rmtree, os.environ["DARWIN_CACHE"], ignore_errors=True)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pico  # noqa: E402
import torch  # noqa: E402

# Pico models are far too small for intra-op threads: one thread runs them faster (up to 30x on a busy machine).
torch.set_num_threads(1)
from prefect.logging.configuration import setup_logging  # noqa: E402

# Prefect's console handler binds to sys.stderr when logging is set up: do it now, on the session's streams, so a
# test using capsys cannot leave it writing to a closed capture.
setup_logging()

ARC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"


@pytest.fixture(scope="session")
def prefect_api():
    """One ephemeral Prefect API for the whole session (each harness starts a server: ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pico_checkpoint(tmp_path_factory):
    """save(family, seed=0, perturb=None, dtype=bf16) -> path of a tiny multi-shard checkpoint, built once per
    argument set."""
    built = {}

    def make(family: str, seed: int = 0, perturb: int | None = None, scale: float = 0.02, dtype=torch.bfloat16):
        key = (family, seed, perturb, scale, dtype)
        if key not in built:
            model = pico.build(family, seed=seed, dtype=dtype)
            if perturb is not None:
                pico.perturbed(model, perturb, scale)
            path = tmp_path_factory.mktemp(f"{family}-{seed}-{perturb}")
            pico.save(model, path)
            if family == "qwen3_5":
                pico.add_tensors(path, pico.mtp_tensors(seed=perturb or seed))
            built[key] = path
        return built[key]

    return make


@pytest.fixture(scope="session")
def arc_dir():
    if not (ARC_DIR / "test.jsonl").exists():
        pytest.skip(f"real ARC-Challenge data not found at {ARC_DIR}")
    return ARC_DIR


@pytest.fixture(scope="session")
def pico_family(tmp_path_factory):
    """base, father and mother pico Qwen3.5 text models with the demo's character tokenizer, and a 12-question
    ARC-format task file (validation and test splits) whose answers the tiny models can only guess (a fitness signal
    with real variance)."""
    import json

    from darwin.demo.tokenizer import build_tokenizer
    from darwin.evaluate import multiple_choice_task_file

    root = tmp_path_factory.mktemp("family")
    tokenizer = build_tokenizer()
    paths = {}
    for role, perturb in (("base", None), ("father", 1), ("mother", 2)):
        model = pico.build("qwen3_5_text")
        if perturb is not None:
            pico.perturbed(model, perturb, scale=0.05)
        paths[role] = pico.save(model, root / role)
        tokenizer.save_pretrained(paths[role])
    for split, numbers in (("validation", range(12)), ("test", range(12, 24))):
        rows = [{"id": f"q{i}", "question": f"What is {i} plus {i}?",
                 "choices": {"text": [str(2 * i), str(2 * i + 1), str(i)], "label": ["A", "B", "C"]},
                 "answerKey": "ABC"[i % 3]} for i in numbers]
        (root / f"toy_{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    paths["task"] = multiple_choice_task_file("toy", {split: root / f"toy_{split}.jsonl"
                                                      for split in ("validation", "test")}, root)
    return paths


@pytest.fixture(scope="session")
def demo_parents():
    """The demo's parents as the package ships them."""
    from darwin.demo.parents import shipped_parents

    return shipped_parents()
