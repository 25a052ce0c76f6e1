"""Release quantization: MFP4 (ModelOpt NVFP4 on MLP / expert linears, calibrated) and NVFP4A16 (weight-only
round-to-nearest NVFP4 in the compressed-tensors format), each checked by a roundtrip report decoded from the
written files.

`quantize(model, scheme, out, ...)` is the one entry point; the schemes' modules are imported only when used, so
asking for nvfp4a16 never pays for importing ModelOpt.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.progress import Progress
from darwin.quantize.calibration import Calibration, calibration_set

MLP_KINDS = ("mlp", "expert", "shared_expert")


@dataclass(frozen=True)
class Layout:
    """How a scheme stores an NVFP4 linear (what the roundtrip decodes)."""

    packed: str
    global_scale: str
    global_is_divisor: bool
    side: tuple[str, ...]  # other per-module tensors the format writes (counted in the size after)
    convention: str


@dataclass(frozen=True)
class Scheme:
    """A release scheme: `darwin quantize --scheme` and the run config's release.scheme name one of SCHEMES. A new
    scheme is one more record."""

    quantize: str  # "module:function" (model, out, calibration, device, progress) -> out, imported when used
    layout: Layout
    calibrated: bool  # takes a calibration set (and runs the model on a GPU slot)
    vllm_flag: str  # what `vllm serve` needs beside the checkpoint ("" where config.json says it all)
    transformers_loads: bool  # transformers loads it (the model card offers from_pretrained)
    card: str  # the model card's line on it


SCHEMES = {
    "mfp4": Scheme(
        "darwin.quantize.mfp4:quantize_mfp4",
        Layout("weight", "weight_scale_2", False, ("weight_scale", "input_scale"),
               "w = e2m1 * weight_scale(fp8) * weight_scale_2; weight_scale_2 = amax / (6 * 448)"),
        calibrated=True, vllm_flag="--quantization modelopt_fp4", transformers_loads=False,
        card="NVIDIA ModelOpt, calibrated; NVFP4 on the MLP and expert linears only: attention, linear attention, "
             "routers, embeddings, lm_head, norms, vision and MTP stay BF16 (vLLM `--quantization modelopt_fp4`)"),
    "nvfp4a16": Scheme(
        "darwin.quantize.nvfp4a16:quantize_nvfp4a16",
        Layout("weight_packed", "weight_global_scale", True, ("weight_scale",),
               "w = e2m1 * weight_scale(fp8) / weight_global_scale; weight_global_scale = 6 * 448 / amax"),
        calibrated=False, vllm_flag="", transformers_loads=True,
        card="weight-only round-to-nearest, compressed-tensors `nvfp4-pack-quantized`: linear attention, routers, "
             "embeddings, lm_head, norms, vision and MTP stay BF16 (vLLM reads the format from config.json)"),
}


def calibrated_schemes() -> str:
    """The schemes that take a calibration set, for messages."""
    return ", ".join(name for name, spec in SCHEMES.items() if spec.calibrated)


def scheme_of(name: str) -> Scheme:
    if name not in SCHEMES:
        raise DarwinError(f"unknown quantization scheme {name!r} (schemes: {', '.join(SCHEMES)})")
    return SCHEMES[name]


def check_source(ckpt: Checkpoint) -> None:
    """Refuse a model that is already quantized, an adapter, or one with nothing the release formats would
    quantize."""
    quantized = ckpt.config.get("quantization_config") or (ckpt.config.get("text_config") or {}).get(
        "quantization_config")
    if quantized:
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else "unknown"
        raise DarwinError(f"{ckpt.path} is already quantized (quantization_config with quant_method {method!r}); "
                          "quantize the BF16 checkpoint instead")
    if ckpt.adapter is not None:
        raise DarwinError(f"{ckpt.source} is an adapter on its base: a release is made of a whole checkpoint (merge "
                          "the adapter with `darwin merge` or peft's merge_and_unload first)")
    if not any(ckpt.kind(name)[0] in MLP_KINDS for name in ckpt.tensors):
        raise DarwinError(f"{ckpt.path} has no MLP or expert tensors to quantize "
                          f"(family {ckpt.family.name}; kinds: {', '.join(sorted(_kinds(ckpt)))})")


def check_request(scheme: str, calibration: Calibration | str | None) -> None:
    """Refuse an unknown scheme, or a calibration set (or its name) for a scheme that takes none."""
    if calibration and not scheme_of(scheme).calibrated:
        raise DarwinError(f"calibration is for {calibrated_schemes()}; {scheme} is round-to-nearest and takes none")


def _kinds(ckpt: Checkpoint) -> set[str]:
    return {ckpt.kind(name)[0] for name in ckpt.tensors}


def quantize(model: str | os.PathLike, scheme: str, out: str | os.PathLike, calibration: Calibration | None = None,
             device: str = "auto", progress: Progress | None = None) -> Path:
    """Quantize MODEL into OUT with `scheme` (mfp4 | nvfp4a16) and write OUT/roundtrip.json; returns OUT.
    mfp4 calibrates on `calibration` (default: `calibration_set()`, the shipped probe prompts).
    `progress(done, total)`: calibration prompts (mfp4) or tensors (nvfp4a16)."""
    check_request(scheme, calibration)
    spec = scheme_of(scheme)
    module, function = spec.quantize.split(":")
    run = getattr(importlib.import_module(module), function)
    if spec.calibrated:
        calibration = calibration or calibration_set()
    path = run(model, out, calibration=calibration, device=device, progress=progress)
    from darwin.quantize.roundtrip import roundtrip_report

    report = roundtrip_report(Checkpoint(model).path, path, scheme,
                              calibration=calibration.describe() if spec.calibrated else None)
    if not report["kept_identical"]:
        shutil.rmtree(path)
        raise DarwinError(f"{scheme} changed {len(report['kept_changed'])} tensors it should keep as they are "
                          f"(e.g. {report['kept_changed'][0]}): nothing written to {path}")
    return path
