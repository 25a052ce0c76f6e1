"""The run config of `darwin evolve CONFIG.yaml`: the keys and defaults README lists, validated once.

Unknown keys, wrong types and out-of-range values are one clear error (naming every bad key) before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from darwin.errors import DarwinError
from darwin.evaluate import EvalOptions
from darwin.genome import VERSIONS
from darwin.health import Thresholds
from darwin.merge import METHODS
from darwin.quantize import SCHEMES, calibrated_schemes
from darwin.quantize.calibration import Calibration, calibration_set
from darwin.runtime import DEVICE_PATTERN
from darwin.vllm_engine import VLLMSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Phase1(_Strict):
    steps: int = Field(200, ge=0)
    popsize: int = Field(20, ge=2)
    proxy: Literal["heuristic", "measured"] = "heuristic"


Split = Literal["train", "validation", "test"]


class VLLM(_Strict):
    """phase2.backend vllm: the engine's Python (null: DARWIN_VLLM_PYTHON, else darwin's), its share of the device
    memory (vLLM's gpu_memory_utilization), its context length (null: the model's) and dtype."""

    python: str | None = None
    memory: float = Field(0.5, gt=0.0, le=1.0)
    max_model_len: int | None = Field(None, ge=16)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    def settings(self) -> VLLMSettings:
        return VLLMSettings(self.python, self.memory, self.max_model_len, self.dtype)


class Phase2(_Strict):
    steps: int = Field(10, ge=0)
    popsize: int = Field(8, ge=2)
    tasks: list[str] = Field(default_factory=lambda: ["arc_challenge"], min_length=1)
    split: Split = "validation"
    limit: int | None = Field(None, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 8  # auto: lm-eval's, the largest batch that fits
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    sigma0: float = Field(0.15, gt=0.0, le=0.5)
    # lm-eval's options of the same names
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    metrics: dict[str, str] = Field(default_factory=dict)  # leaf task -> metric or "metric,filter"
    backend: Literal["hf", "vllm"] = "hf"  # which model lm-eval scores: transformers' (HFLM) or a vLLM engine
    vllm: VLLM = VLLM()

    @model_validator(mode="after")
    def _multiturn(self) -> Phase2:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true (as in lm-eval)")
        return self

    def eval_options(self) -> EvalOptions:
        return EvalOptions(self.num_fewshot, self.apply_chat_template, self.fewshot_as_multiturn,
                           tuple(sorted(self.metrics.items())), self.backend,
                           self.vllm.settings() if self.backend == "vllm" else None)


class Heldout(_Strict):
    split: Split | None = "test"  # None: no held-out report
    limit: int | None = Field(None, ge=1)


class Health(_Strict):
    interference: float = Field(Thresholds.interference, gt=1.0)
    function_loss: float = Field(Thresholds.function_loss, gt=0.0, lt=1.0)
    # opt-in noise floor (darwin/health.py); 0: the method's rule exactly
    noise: float = Field(Thresholds.noise, ge=0.0, lt=1.0)

    def thresholds(self) -> Thresholds:
        return Thresholds(self.interference, self.function_loss, self.noise)


class Release(_Strict):
    scheme: str | None = None  # a name in darwin.quantize.SCHEMES
    dest: str | None = None
    # mfp4's calibration set (darwin.quantize.calibration): a text file or an lm-eval task; null: the probe prompts
    calibration: str | None = None
    calibration_samples: int = Field(512, ge=1)
    calibration_seq_len: int = Field(512, ge=1)

    def calibration_set(self) -> Calibration | None:
        if self.scheme is None or not SCHEMES[self.scheme].calibrated:
            return None
        return calibration_set(self.calibration, self.calibration_samples, self.calibration_seq_len)


class Runner(_Strict):
    kind: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1)
    address: str | None = None


class RunConfig(_Strict):
    father: str
    mother: str
    base: str | None = None
    method: str = "darwin-v5"  # a name in darwin.merge.METHODS
    genome: str = "v5"  # a name in darwin.genome.VERSIONS
    blocks: int = Field(6, ge=1, le=64)
    seed: int = Field(0, ge=0)
    phase1: Phase1 = Phase1()
    phase2: Phase2 = Phase2()
    heldout: Heldout = Heldout()
    health: Health = Health()
    release: Release = Release()
    runner: Runner = Runner()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.genome not in VERSIONS:
            raise ValueError(f"unknown genome {self.genome!r} (choose from {', '.join(VERSIONS)})")
        method = METHODS[self.method]
        if method.genome and self.genome != method.genome:
            raise ValueError(f"method {self.method} needs genome: {method.genome}")
        if method.needs_base and not self.base:
            raise ValueError(f"method {self.method} needs base: the shared base model")
        if self.heldout.split == self.phase2.split:
            raise ValueError(f"phase2.split and heldout.split are both {self.phase2.split!r}: the search would tune on "
                             "the split it is judged on (set heldout.split to another split, or null for no report)")
        if self.release.scheme is not None and self.release.scheme not in SCHEMES:
            raise ValueError(f"unknown release.scheme {self.release.scheme!r} (choose from {', '.join(SCHEMES)})")
        if self.release.calibration and not (self.release.scheme and SCHEMES[self.release.scheme].calibrated):
            raise ValueError(f"release.calibration is for scheme {calibrated_schemes()} (round-to-nearest schemes "
                             "take none)")
        if self.release.dest and not self.release.scheme:
            raise ValueError(f"release.dest is set but release.scheme is not ({' or '.join(SCHEMES)})")
        return self


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{where}: {message.removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise DarwinError(f"bad run config: {_describe(exc)}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read CONFIG.yaml and apply dotted overrides (`{"phase2.steps": 3}`) from the command line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DarwinError(f"config file does not exist: {path}") from None
    except yaml.YAMLError as exc:
        raise DarwinError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DarwinError(f"config file {path} must hold a mapping of keys")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(raw)
