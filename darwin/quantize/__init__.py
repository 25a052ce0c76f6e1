"""Release quantization: MFP4 (ModelOpt NVFP4 on MLP / expert linears, calibrated) and NVFP4A16 (weight-only
round-to-nearest NVFP4 in the compressed-tensors format), each checked by a roundtrip report decoded from the
written files.

`quantize(model, scheme, out, ...)` is the one entry point; the schemes' modules are imported only when used, so
asking for nvfp4a16 never pays for importing ModelOpt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.progress import Progress
from darwin.quantize.calibration import Calibration, calibration_set

SCHEMES = ("mfp4", "nvfp4a16")
MLP_KINDS = ("mlp", "expert", "shared_expert")


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


def check_request(scheme: str, calibration: Calibration | None) -> None:
    """Refuse an unknown scheme, or a calibration set for the scheme that takes none."""
    if scheme not in SCHEMES:
        raise DarwinError(f"unknown quantization scheme {scheme!r} (schemes: {', '.join(SCHEMES)})")
    if calibration and scheme != "mfp4":
        raise DarwinError(f"calibration is for mfp4; {scheme} is round-to-nearest and takes none")


def _kinds(ckpt: Checkpoint) -> set[str]:
    return {ckpt.kind(name)[0] for name in ckpt.tensors}


def quantize(model: str | os.PathLike, scheme: str, out: str | os.PathLike, calibration: Calibration | None = None,
             device: str = "auto", progress: Progress | None = None) -> Path:
    """Quantize MODEL into OUT with `scheme` (mfp4 | nvfp4a16) and write OUT/roundtrip.json; returns OUT.
    mfp4 calibrates on `calibration` (default: `calibration_set()`, the shipped probe prompts).
    `progress(done, total)`: calibration prompts (mfp4) or tensors (nvfp4a16)."""
    check_request(scheme, calibration)
    if scheme == "mfp4":
        from darwin.quantize.mfp4 import quantize_mfp4

        calibration = calibration or calibration_set()
        path = quantize_mfp4(model, out, calibration=calibration, device=device, progress=progress)
    else:
        from darwin.quantize.nvfp4a16 import quantize_nvfp4a16

        path = quantize_nvfp4a16(model, out, progress=progress)
    from darwin.quantize.roundtrip import roundtrip_report

    report = roundtrip_report(Checkpoint(model).path, path, scheme,
                              calibration=calibration.describe() if scheme == "mfp4" else None)
    if not report["kept_identical"]:
        shutil.rmtree(path)
        raise DarwinError(f"{scheme} changed {len(report['kept_changed'])} tensors it should keep as they are "
                          f"(e.g. {report['kept_changed'][0]}): nothing written to {path}")
    return path
