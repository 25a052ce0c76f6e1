"""Phase 2 on vLLM (`phase2.backend: vllm`): one vLLM engine per worker on the father's checkpoint, each candidate's
merged tensors loaded into it in place, scored with lm-eval's loglikelihood requests.

vLLM pins its own transformers, so the engine runs in a process of the Python that has vLLM (`phase2.vllm.python`,
else DARWIN_VLLM_PYTHON, else this one) as `darwin/vllm_worker.py`. A candidate's tensors travel as their raw bits
in one file of shared memory (/dev/shm) under their checkpoint names and go through vLLM's own `reload_weights`
(its name mapping, fused q/k/v and gate/up, experts): no checkpoint is written. lm-eval builds the requests and
computes the metrics exactly as for the HF backend (`EngineLM` tokenizes as HFLM does); vLLM answers each
request's log-likelihood and whether it is greedy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from darwin.checkpoint.dtypes import DTYPES
from darwin.errors import DarwinError

WORKER = Path(__file__).with_name("vllm_worker.py")
OUTPUT_TYPES = ("multiple_choice", "loglikelihood")  # what the engine scores: lm-eval's loglikelihood requests


@dataclass(frozen=True)
class VLLMSettings:
    python: str | None = None  # None: DARWIN_VLLM_PYTHON, else this interpreter
    memory: float = 0.5  # vLLM's gpu_memory_utilization (on CPU, its share of the KV cache space)
    max_model_len: int | None = None  # None: the model's
    dtype: str = "auto"

    def interpreter(self) -> str:
        return self.python or os.environ.get("DARWIN_VLLM_PYTHON") or sys.executable


def _shared_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VLLMEngine:
    """The worker process and its protocol (darwin/vllm_worker.py); one request at a time."""

    def __init__(self, model: str | Path, settings: VLLMSettings = VLLMSettings()):
        self.model = str(model)
        payload = {"model": self.model, "dtype": settings.dtype, "max_model_len": settings.max_model_len,
                   "memory": settings.memory, "seed": 0}
        python = settings.interpreter()
        self._stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self._process = subprocess.Popen([python, str(WORKER), json.dumps(payload)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        except OSError as exc:
            raise DarwinError(f"cannot start vLLM with {python}: {exc}") from None
        self._lock = threading.Lock()
        self.max_model_len = self._read()["max_model_len"]

    def _read(self) -> dict:
        for line in self._process.stdout:
            if line.startswith("DARWIN "):
                message = json.loads(line.removeprefix("DARWIN "))
                if "error" in message:
                    raise DarwinError(f"vLLM ({self.model}): {message['error']}")
                return message
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise DarwinError(f"the vLLM engine on {self.model} stopped ({self._process.wait()}): {cause.strip()[:300]}")

    def _ask(self, request: dict) -> dict:
        with self._lock:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            return self._read()

    def load(self, tensors: Iterable[tuple[str, str, np.ndarray]]) -> None:
        """Replace the engine's weights by `tensors`: (checkpoint name, safetensors dtype, raw bits)."""
        with tempfile.NamedTemporaryFile(dir=_shared_dir(), prefix="darwin-candidate-") as handle:
            specs, offset = [], 0
            for name, code, raw in tensors:
                data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
                handle.write(memoryview(data))
                specs.append([name, DTYPES[code][0], list(raw.shape), offset])
                offset += data.size
            handle.flush()
            self._ask({"op": "load", "file": handle.name, "tensors": specs})

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        answer = self._ask({"op": "score", "requests": [[list(c), list(x)] for c, x in requests]})
        return [(float(logprob), bool(greedy)) for logprob, greedy in answer["results"]]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._stderr.close()


def engine_lm(engine: VLLMEngine, tokenizer):
    """An lm-eval model over `engine`, tokenizing as lm-eval's HFLM does for a causal model; every request of an
    evaluation goes to the engine at once (vLLM schedules its own batches)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    class EngineLM(TemplateLM):
        backend = "causal"

        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.add_bos_token = None

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return self.tokenizer.name_or_path.replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
            special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special["add_special_tokens"] = False
            encoding = self.tokenizer.encode(string, **special)
            return encoding[-left_truncate_len:] if left_truncate_len else encoding

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = engine.score([(context, continuation) for _, context, continuation in requests])
            for (key, _, _), result in zip(requests, results):
                self.cache_hook.add_partial("loglikelihood", key, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise DarwinError("phase2.backend vllm scores loglikelihood and multiple-choice tasks; a perplexity "
                              "task needs the hf backend")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise DarwinError("phase2.backend vllm scores loglikelihood and multiple-choice tasks; a generative "
                              "task needs the hf backend")

    return EngineLM()
