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
