"""Roundtrip check of a quantized release: decode the WRITTEN NVFP4 tensors back to float and compare them with
the source weights; tensors kept in the source precision must be bit-identical.

Both schemes store the same NVFP4 payload (E2M1 codes packed two a byte, low nibble first; one FP8 E4M3 scale
per 16 inputs) and differ only in names and in the direction of the FP32 per-tensor scale:
- mfp4 (ModelOpt / vLLM modelopt_fp4): `weight`, `weight_scale`, `weight_scale_2`;
  w = e2m1 * weight_scale * weight_scale_2.
- nvfp4a16 (compressed-tensors nvfp4-pack-quantized): `weight_packed`, `weight_scale`, `weight_global_scale`;
  w = e2m1 * weight_scale / weight_global_scale.
Each tensor is decoded with the per-tensor scale vLLM uses: linears vLLM fuses into one kernel (q/k/v; gate/up)
get ONE scale there, the largest of the parts' (`FUSED`), and an expert's gate/up the gate's (vLLM's NVFP4 MoE
methods take column 0 of w13's scales), so a file whose parts disagree decodes worse in vLLM than part by part, and
this report shows it.

Routed experts stored fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]: Qwen3.5-MoE,
Gemma 4) are released per expert, `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`
(`darwin.experts.expert_parts`): the names vLLM's expert mapping reads quantized parameters from (a fused quantized
tensor has no name it loads), and what ModelOpt's export and llm-compressor write.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.experts import EXPERT_PART, fused_sources
from darwin.quantize import scheme_of

BLOCK = 16
# vLLM's packed_modules_mapping of these families: the parts of one fused kernel, sharing its per-tensor scale
FUSED = re.compile(r"^(?P<prefix>.*\.)(?:(?P<qkv>q_proj|k_proj|v_proj)|(?P<gate_up>gate_proj|up_proj))$")


def fused_group(module: str) -> str:
    """The fused kernel a linear module is part of in vLLM (the module itself when vLLM fuses it with nothing)."""
    match = FUSED.match(module)
    if match is None:
        return module
    return match["prefix"] + ("qkv_proj" if match["qkv"] else "gate_up_proj")


def served_scales(modules: list[str], scale_of) -> dict[str, torch.Tensor]:
    """fused group -> the per-tensor scale vLLM applies to every part of it (`scale_of(module)`: the part's own)."""
    served: dict[str, torch.Tensor] = {}
    for module in modules:
        scale, group = scale_of(module), fused_group(module)
        if EXPERT_PART.search(module):
            if module.endswith(".gate_proj") or group not in served:
                served[group] = scale  # the gate's, whatever the up's is
        else:
            served[group] = torch.maximum(served.get(group, scale), scale)
    return served


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                 global_is_divisor: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 weights of shape `shape` from packed E2M1 codes, FP8 block scales and the per-tensor scale."""
    rows, width = packed.shape[0], packed.shape[1] * 2
    values = unpack_fp4_from_uint8(packed, rows, width, dtype=torch.float32)
    scale = block_scale.float()
    scale = scale / global_scale.float() if global_is_divisor else scale * global_scale.float()
    weights = (values.view(rows, -1, BLOCK) * scale.view(rows, -1, 1)).view(rows, width)
    return weights[:, : shape[-1]].reshape(shape)


def roundtrip_report(source_dir: str | os.PathLike, quantized_dir: str | os.PathLike, scheme: str,
                     calibration: dict | None = None) -> dict:
    """Per quantized tensor and overall, decoded as vLLM decodes it: max / mean absolute error, relative Frobenius
    error, bytes before and after; the tensors kept as they were (and whether they are bit-identical); the
    calibration set (mfp4: source, samples, seq_len). Written to quantized_dir/roundtrip.json."""
    layout = scheme_of(scheme).layout
    source, quantized = Checkpoint(source_dir), Checkpoint(quantized_dir)
    modules = [name.removesuffix("." + layout.packed) for name, info in quantized.tensors.items()
               if name.endswith("." + layout.packed) and info.dtype == "U8"
               and f"{name.removesuffix('.' + layout.packed)}.{layout.global_scale}" in quantized.tensors]
    served_scale = served_scales(modules, lambda module: quantized.read(f"{module}.{layout.global_scale}").float()
                                  .max())
    fused = fused_sources(source)
    rows, consumed, sliced = [], set(), set()
    err_sq = ref_sq = abs_sum = 0.0
    max_abs, numel = 0.0, 0
    for module in modules:
        source_name = f"{module}.weight"
        slice_of = None
        if source_name in source.tensors:
            original = source.read(source_name).float()
            bytes_before = source.tensors[source_name].nbytes
        elif module in fused:  # one expert's part of a fused tensor
            fused_name, expert, part_rows = fused[module]
            whole = source.read(fused_name)
            original = whole[expert, part_rows].float()
            bytes_before = original.numel() * whole.element_size()
            sliced.add(fused_name)
            slice_of = f"{fused_name}[{expert}, {part_rows.start}:{part_rows.stop}]"
        else:
            raise DarwinError(f"{quantized.path} holds quantized {module} but {source.path} has no {source_name}")
        names = [f"{module}.{p}" for p in (layout.packed, layout.global_scale, *layout.side)]
        names = [n for n in names if n in quantized.tensors]
        consumed.update(names)
        decoded = decode_nvfp4(quantized.read(f"{module}.{layout.packed}"), quantized.read(f"{module}.weight_scale"),
                               served_scale[fused_group(module)], layout.global_is_divisor, tuple(original.shape))
        error = (decoded - original).abs()
        e2, r2 = float(error.pow(2).sum()), float(original.pow(2).sum())
        rows.append({
            "name": source_name, "kind": source.kind(source_name)[0], "shape": list(original.shape),
            "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
            "relative_frobenius": math.sqrt(e2 / r2) if r2 else 0.0,
            "bytes_before": bytes_before,
            "bytes_after": sum(quantized.tensors[n].nbytes for n in names),
            **({"slice_of": slice_of} if slice_of else {}),
        })
        err_sq, ref_sq, abs_sum = err_sq + e2, ref_sq + r2, abs_sum + float(error.sum())
        max_abs, numel = max(max_abs, float(error.max())), numel + original.numel()
    if not rows:
        raise DarwinError(f"{quantized.path} holds no {scheme} tensors ({layout.packed} + {layout.global_scale})")

    kept, changed = [], []
    for name in quantized.tensors:
        if name in consumed or name not in source.tensors:
            continue
        kept.append(name)
        a, b = source.read(name), quantized.read(name)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            changed.append(name)
    quantized_sources = {row["name"] for row in rows} | sliced
    missing = [n for n in source.tensors if n not in quantized.tensors and n not in quantized_sources]
    report = {
        "scheme": scheme,
        "source": str(source.path),
        "quantized": str(quantized.path),
        "scale_convention": layout.convention,
        **({"calibration": calibration} if calibration else {}),
        "overall": {
            "quantized_tensors": len(rows),
            "kept_tensors": len(kept),
            "max_abs_error": max_abs,
            "mean_abs_error": abs_sum / numel,
            "relative_frobenius": math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
            "bytes_before": source.nbytes,
            "bytes_after": quantized.nbytes,
            "size_ratio": quantized.nbytes / source.nbytes,
        },
        "tensors": rows,
        "kept": kept,
        "kept_identical": not changed,
        "kept_changed": changed,
        "missing": missing,
    }
    (quantized.path / "roundtrip.json").write_text(json.dumps(report, indent=2))
    return report


def roundtrip_table(report: dict) -> list[dict]:
    """One row per quantized tensor, then the overall row: the roundtrip as a table for reports and artifacts."""
    columns = ("max_abs_error", "mean_abs_error", "relative_frobenius", "bytes_before", "bytes_after")
    rows = [{"tensor": row["name"], "kind": row["kind"], **{c: row[c] for c in columns}} for row in report["tensors"]]
    overall = report["overall"]
    rows.append({"tensor": f"overall ({overall['quantized_tensors']} quantized, {overall['kept_tensors']} kept)",
                 "kind": "all", **{c: overall[c] for c in columns}})
    return rows
