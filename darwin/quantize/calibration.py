"""MFP4's calibration set: the texts whose activations set the W4A4 input scales.

ModelOpt's hf_ptq calibrates on 512 samples of up to 512 tokens (cnn_dailymail by default, downloaded). darwin runs
offline, so its default set is what the package ships: the 25 probe prompts (short; fine for a tiny model or a
smoke test, thin for a release). `--calibration` takes a text file (one sample per non-blank line) or an lm-eval
task (a name or a task YAML): its documents as prompt and right answer, from its training split where it has one.
At most `samples` texts are taken, each cut to `seq_len` tokens (hf_ptq's `--calib_size` and `--calib_seq`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from darwin.errors import DarwinError

SAMPLES = 512
SEQ_LEN = 512
SHIPPED = "probe prompts"


@dataclass(frozen=True)
class Calibration:
    texts: tuple[str, ...]
    source: str  # what they came from, for roundtrip.json and the model card
    seq_len: int = SEQ_LEN

    def describe(self) -> dict:
        return {"source": self.source, "samples": len(self.texts), "seq_len": self.seq_len}


def calibration_set(spec: str | None = None, samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> Calibration:
    """The texts of `spec` (None: the shipped probe prompts), at most `samples` of them."""
    if samples < 1 or seq_len < 1:
        raise DarwinError(f"calibration needs at least one sample of one token (got {samples} x {seq_len})")
    if spec is None:
        from darwin.probes import load_probes

        texts = [prompt for prompts in load_probes().values() for prompt in prompts]
        source = SHIPPED
    elif Path(spec).is_file() and not spec.endswith((".yaml", ".yml")):
        from darwin.probes import load_texts

        texts, source = load_texts(spec), str(Path(spec).resolve())
    else:
        texts, source = _task_texts(spec, samples), spec
    return Calibration(tuple(texts[:samples]), source, seq_len)


def _task_texts(spec: str, samples: int) -> list[str]:
    from darwin.evaluate import TaskSet

    try:
        tasks = TaskSet([spec]).loaded()["tasks"]
    except DarwinError as exc:
        raise DarwinError(f"calibration {spec!r} is neither a text file nor a usable lm-eval task ({exc})") from None
    texts = []
    for task in tasks.values():
        docs = next((split() for has, split in ((task.has_training_docs, task.training_docs),
                                                 (task.has_validation_docs, task.validation_docs),
                                                 (task.has_test_docs, task.test_docs)) if has()), [])
        for doc in docs:
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            texts.append(f"{task.doc_to_text(doc)}{task.config.target_delimiter}{target}")
            if len(texts) >= samples:
                return texts
    if not texts:
        raise DarwinError(f"calibration task {spec} has no documents")
    return texts
