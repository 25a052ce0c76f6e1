from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

import darwin.runtime as runtime
import pico


def load_in_threads(path, count=4):
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: runtime.load_pretrained(AutoModelForCausalLM, path), range(count)))


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A tied-embedding Qwen3.5: without darwin's lock, 4 parallel loads in transformers 5.23 left lm_head on the
    meta device or untied (reproduced 2026-11-23 with the lock swapped for a no-op)."""
    model = pico.build("qwen3_5_text", dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return pico.save(model, tmp_path_factory.mktemp("tied"))


def test_models_loaded_in_parallel_threads_are_whole(tied_model):
    reference = AutoModelForCausalLM.from_pretrained(tied_model)
    for model in load_in_threads(tied_model):
        assert not model.lm_head.weight.is_meta
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


LEASE = """
import os, sys, threading, time
import darwin.runtime as runtime
slots = sys.argv[1].split(",")
indices = [None] * int(sys.argv[2])
def take(i):
    indices[i] = runtime.lease(slots, poll=0.05)
threads = [threading.Thread(target=take, args=(i,)) for i in range(len(indices))]
for t in threads: t.start()
for t in threads: t.join()
print(",".join(slots[i] for i in indices), flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_gpu_leases_keep_processes_of_a_host_apart(tmp_path):
    """Two GPUs (slots by UUID): a process with two threads takes both; a second process waits until the first
    dies (the kernel drops its locks, as for a killed worker), then takes one; the threads of one process share
    its slots rather than wait on each other."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DARWIN_LEASES": str(tmp_path / "leases")}

    def start(threads, hold):
        return subprocess.Popen([sys.executable, "-c", LEASE, "gpu-a,gpu-b", str(threads), str(hold)], env=env,
                                stdout=subprocess.PIPE, text=True)

    first = start(threads=3, hold=2)
    taken = sorted(first.stdout.readline().strip().split(","))
    assert taken in (["gpu-a", "gpu-a", "gpu-b"], ["gpu-a", "gpu-b", "gpu-b"])
    second = start(threads=1, hold=0)
    assert second.stdout.readline().strip() in ("gpu-a", "gpu-b")
    assert first.poll() is not None  # it got a GPU only once the first process was gone
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0


def test_threads_that_ended_leave_their_slot(tmp_path, monkeypatch):
    """Three threads take gpu-a, gpu-b and gpu-a again (the process holds both: they share, fewest first); the two
    on gpu-a end. A new thread takes gpu-a, now unused, not gpu-b beside the thread still running there."""
    import os
    import threading
    import time
    from collections import Counter

    monkeypatch.setattr(runtime, "LEASES", tmp_path / "leases")
    monkeypatch.setattr(runtime, "_leased", {})
    monkeypatch.setattr(runtime, "_users", Counter())
    slots, taken, release = ["gpu-a", "gpu-b"], {}, threading.Event()

    def take(name, hold=None):
        taken[name] = slots[runtime.lease(slots, poll=0.01)]
        if hold is not None:
            hold.wait(timeout=30)

    first = threading.Thread(target=take, args=("first",))
    stays = threading.Thread(target=take, args=("stays", release))
    first.start(), first.join()
    stays.start()
    while "stays" not in taken:
        time.sleep(0.01)
    third = threading.Thread(target=take, args=("third",))
    third.start(), third.join()
    assert (taken["first"], taken["stays"], taken["third"]) == ("gpu-a", "gpu-b", "gpu-a")
    fourth = threading.Thread(target=take, args=("fourth",))
    fourth.start(), fourth.join()
    release.set()
    stays.join()
    assert taken["fourth"] == "gpu-a"
    for descriptor in runtime._leased.values():
        os.close(descriptor)
