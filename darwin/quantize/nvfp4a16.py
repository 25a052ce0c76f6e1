"""NVFP4A16: weight-only round-to-nearest NVFP4 in the compressed-tensors `nvfp4-pack-quantized` format.

No calibration and no forward pass: the checkpoint is streamed tensor by tensor. Attention and MLP / expert
linears are quantized; linear attention, routers, embeddings, lm_head, norms, vision and MTP stay BF16, as on the
Qwen3.5-9B-heretic-NVFP4A16 card. Linears vLLM fuses into one kernel (q/k/v; gate/up, each expert's too) share one
global scale, from the largest magnitude of all their parts, as llm-compressor writes them: vLLM applies one scale
to the fused kernel, and parts with scales of their own would be decoded with another's. Routed experts stored
fused (3-D) are quantized expert by expert, each with its own scales, and written per expert
(`darwin.experts.expert_parts`: the layout vLLM's compressed-tensors MoE loader reads). compressed-tensors does the
numerics (global scale, FP8 block scales, E2M1 rounding and packing) and names the tensors: `weight_packed` (uint8,
two E2M1 codes a byte, low nibble first), `weight_scale` (float8_e4m3fn, one per 16 inputs), `weight_global_scale`
(float32). Scale convention: w = e2m1 * weight_scale / weight_global_scale, with weight_global_scale =
448 * 6 / amax(|w|).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from compressed_tensors import __version__ as ct_version
from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
from compressed_tensors.quantization.quant_scheme import NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from darwin.checkpoint import Checkpoint, CheckpointWriter, TensorInfo, copy_side_files
from darwin.experts import expert_parts
from darwin.progress import Progress
from darwin.quantize import check_source
from darwin.quantize.roundtrip import fused_group

QUANTIZED_KINDS = ("attn", "mlp", "expert", "shared_expert")
SCHEME = QuantizationScheme(targets=["Linear"], **NVFP4A16)
GROUP = SCHEME.weights.group_size


def is_quantized(ckpt: Checkpoint, info: TensorInfo) -> bool:
    """A linear weight of attention or MLP whose input width splits into whole 16-element blocks."""
    return (ckpt.kind(info.name)[0] in QUANTIZED_KINDS and info.name.endswith(".weight") and len(info.shape) == 2
            and info.shape[1] % GROUP == 0)


def split_experts(ckpt: Checkpoint, info: TensorInfo) -> dict[str, tuple[int, slice]]:
    """The per-expert parts of a fused expert tensor it quantizes ({} for any other tensor)."""
    if ckpt.kind(info.name)[0] != "expert" or info.shape[-1] % GROUP:
        return {}
    return expert_parts(info.name, info.shape)


def quantized_parts(ckpt: Checkpoint, info: TensorInfo, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """{linear module: its [out, in] weight} this scheme quantizes from one checkpoint tensor: the tensor itself, an
    expert's part of a fused one, or nothing."""
    if is_quantized(ckpt, info):
        return {info.name.removesuffix(".weight"): tensor}
    return {module: tensor[expert, rows] for module, (expert, rows) in split_experts(ckpt, info).items()}


def compress_weight(weight: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """RTN NVFP4 of one [out, in] weight: compressed-tensors' global scale (from `amax`, the largest magnitude of
    the fused kernel the weight is part of, else its own), FP8 block scales and packing."""
    full = weight.float()
    amax = full.abs().max() if amax is None else amax
    global_scale = generate_gparam(-amax, amax)
    blocks = full.unflatten(-1, (-1, GROUP))
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), SCHEME.weights, global_scale=global_scale)
    state = {"weight": weight, "weight_scale": scale, "weight_global_scale": global_scale}
    return dict(NVFP4PackedCompressor.compress(state, SCHEME))


def ignore_pattern(module: str) -> str:
    """The compressed-tensors ignore entry of one module kept BF16, written to survive the loaders' renames:
    transformers' AutoModelForCausalLM loads a multimodal Qwen3.5's `model.language_model.layers.*` as
    `model.layers.*`, vLLM as `language_model.model.layers.*`. An exact name would stop matching there and the
    module would be built quantized, its BF16 weight dropped and re-initialised (a load-report line, no error)."""
    tail = re.sub(r"^(model\.)?(language_model\.)?", "", module)
    return "re:(.*\\.)?" + re.escape(tail) + "$"


def quantization_config(ignore: list[str]) -> dict:
    """The `quantization_config` entry of config.json, as compressed-tensors writes it for a compressed model."""
    config = QuantizationConfig(
        config_groups={"group_0": SCHEME}, ignore=ignore, format=CompressionFormat.nvfp4_pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
    ).model_dump()
    config["version"] = ct_version
    return config


def quantize_nvfp4a16(model: str | os.PathLike, out: str | os.PathLike, calibration: None = None, device: str = "cpu",
                      progress: Progress | None = None) -> Path:
    """Round-to-nearest, streamed on the CPU: no calibration set and no device (the arguments every scheme takes)."""
    ckpt = Checkpoint(model)
    check_source(ckpt)
    # vLLM and transformers quantize every Linear a pattern does not exclude, so every module kept BF16 that
    # holds a matrix is named (norms and biases have no module of their own to name).
    ignore = []
    # fused group -> the largest magnitude of its parts, in a first pass over the parts of fused groups only
    amax: dict[str, torch.Tensor] = {}
    for name, info in ckpt.tensors.items():
        module = name.removesuffix(".weight")
        if (is_quantized(ckpt, info) and fused_group(module) != module) or split_experts(ckpt, info):
            for part, weight in quantized_parts(ckpt, info, ckpt.read(name)).items():
                group = fused_group(part)
                if group != part:
                    amax[group] = torch.maximum(amax.get(group, torch.tensor(0.0)), weight.float().abs().max())
    with CheckpointWriter(out) as writer:
        for done, (name, info) in enumerate(ckpt.tensors.items(), 1):
            if progress is not None:
                progress(done, len(ckpt.tensors))
            tensor = ckpt.read(name)
            parts = quantized_parts(ckpt, info, tensor)
            for module, weight in parts.items():
                for param, value in compress_weight(weight, amax.get(fused_group(module))).items():
                    writer.add(f"{module}.{param}", value)
            if not parts:
                writer.add(name, tensor)
                if name.endswith(".weight") and len(info.shape) >= 2:
                    ignore.append(ignore_pattern(name.removesuffix(".weight")))
        copy_side_files(ckpt.path, writer.tmp)
        config = dict(ckpt.config, quantization_config=quantization_config(sorted(ignore)))
        writer.write_text("config.json", json.dumps(config, indent=2))
    return Path(out)
