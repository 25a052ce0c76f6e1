"""MFP4 (Darwin-9B-MFP4): NVIDIA ModelOpt NVFP4 on the MLP, expert and shared-expert linears only.

Recipe: ModelOpt's own NVFP4_MLP_ONLY_CFG (which already ends with ModelOpt's default disabled quantizers:
routers, lm_head, vision, mtp, linear-attention conv and a/b projections, BatchNorm, Embedding) with the quantizers
off on every module whose weight is of a kind the card keeps BF16 (the family's kinds, darwin/families: attention,
routers, embeddings, vision...), max calibration (darwin.quantize.calibration), then `export_hf_checkpoint`.
The export is the layout vLLM loads with `--quantization modelopt_fp4` (routed experts stored fused come out per
expert, `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`): per quantized linear `weight` (uint8, two
E2M1 codes a byte, low nibble first), `weight_scale` (float8_e4m3fn, one per 16 inputs), `weight_scale_2` and
`input_scale` (float32); `hf_quant_config.json` and config.json `quantization_config` name the excluded modules.
Scale convention: w = e2m1 * weight_scale * weight_scale_2, with weight_scale_2 = amax(|w|) / (6 * 448).

Tensors transformers does not build (Qwen3.5's `mtp.*`) are read from the source checkpoint and handed to the
export unchanged, and named as excluded, so nothing the user had is lost and vLLM's MTP head loads as BF16.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from darwin.checkpoint import FLOAT_DTYPES, Checkpoint, CheckpointWriter, copy_side_files
from darwin.errors import DarwinError
from darwin.experts import expert_parts
from darwin.progress import Progress
from darwin.quantize import check_source
from darwin.quantize.calibration import Calibration
from darwin.runtime import load_pretrained, pick_device

BACKEND = "darwin_nvfp4_torch"
BLOCK = 16

# What the card quantizes (darwin/families kinds); every other module with weights stays BF16
QUANTIZED_KINDS = ("mlp", "expert", "shared_expert")


def nvfp4_fake_quant(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """NVFP4 quantize-dequantize with ModelOpt's own reference math (NVFP4QTensor), for devices where its
    CUDA / Triton fake-quant kernels do not run (the dynamic-block kernel asserts CUDA)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from modelopt.torch.quantization.utils.numeric_utils import E2M1_MAX, E4M3_MAX

    amax = quantizer.amax if quantizer.amax is not None else inputs.abs().amax()
    global_scale = amax.float().to(inputs.device) / (E2M1_MAX * E4M3_MAX)
    packed, block_scale, global_scale = NVFP4QTensor.quantize(inputs, BLOCK, weights_scaling_factor_2=global_scale)
    return packed.dequantize(dtype=inputs.dtype, scale=block_scale, double_scale=global_scale,
                             block_sizes={-1: BLOCK})


def kept_modules(ckpt: Checkpoint, model) -> list[str]:
    """The model's modules with a weight matrix whose kind the card keeps BF16, as the checkpoint's family
    classifies the weight (the model is built by the checkpoint's own architecture class: same names)."""
    return [name for name, module in model.named_modules()
            if isinstance(weight := getattr(module, "weight", None), torch.Tensor) and weight.dim() >= 2
            and ckpt.kind(f"{name}.weight")[0] not in QUANTIZED_KINDS]


def quant_config(cpu: bool, kept: list[str]) -> dict:
    """ModelOpt's NVFP4_MLP_ONLY_CFG with the `kept` modules' quantizers off (later entries win)."""
    from modelopt.torch.quantization.config import NVFP4_MLP_ONLY_CFG

    config = copy.deepcopy(NVFP4_MLP_ONLY_CFG)
    config["quant_cfg"] += [{"quantizer_name": f"{name}.*", "enable": False} for name in kept]
    if cpu:
        for entry in config["quant_cfg"]:
            if "cfg" in entry:
                entry["cfg"]["backend"] = BACKEND
    return config


def _load(ckpt: Checkpoint, device: str):
    import transformers

    architectures = ckpt.config.get("architectures") or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModelForCausalLM
    if model_cls is None:
        raise DarwinError(f"{ckpt.path}/config.json names architecture {architectures[0]!r}, which transformers "
                          f"{transformers.__version__} does not have")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.path)
    except (OSError, ValueError) as exc:
        raise DarwinError(f"{ckpt.path} has no tokenizer to encode the calibration prompts: "
                          f"{str(exc).splitlines()[0][:160]}") from None
    model = load_pretrained(model_cls, ckpt.path, dtype=torch.bfloat16, device_map=device).eval()
    # ModelOpt's export iterates config.architectures: a TypeError where it is None (a model saved from a bare
    # config), and the class name is what vLLM dispatches on.
    model.config.architectures = [type(model).__name__]
    return model, tokenizer


def calibrate(ckpt: Checkpoint, calibration: Calibration, device: str = "cpu", progress: Progress | None = None):
    """(model, tokenizer): the BF16 model with ModelOpt's NVFP4 quantizers inserted and max-calibrated on the
    calibration texts, each cut to its seq_len tokens. It runs in memory as the fake-quantized MFP4 model, on CPU
    through `nvfp4_fake_quant`, and is what `export_hf_checkpoint` writes."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    prompts = calibration.texts
    hf_model, tokenizer = _load(ckpt, device)
    if device == "cpu" and not is_registered_quant_backend(BACKEND):
        register_quant_backend(BACKEND, nvfp4_fake_quant)

    def forward_loop(m):
        with torch.no_grad():
            for done, prompt in enumerate(prompts, 1):
                m(**tokenizer(prompt, return_tensors="pt", truncation=True,
                              max_length=calibration.seq_len).to(m.device))
                if progress is not None:
                    progress(done, len(prompts))

    mtq.quantize(hf_model, quant_config(device == "cpu", kept_modules(ckpt, hf_model)), forward_loop)
    return hf_model, tokenizer


def quantize_mfp4(model: str | os.PathLike, out: str | os.PathLike, calibration: Calibration, device: str = "auto",
                  progress: Progress | None = None) -> Path:
    from modelopt.torch.export import export_hf_checkpoint

    ckpt = Checkpoint(model)
    check_source(ckpt)
    device = pick_device(device)
    out = Path(out)
    if out.exists():
        raise DarwinError(f"output already exists: {out}")
    hf_model, _ = calibrate(ckpt, calibration, device, progress)
    carried = {name: ckpt.read(name) for name in ckpt.tensors if ckpt.kind(name)[0] == "mtp"}
    if carried:
        # ModelOpt's hook for MTP heads loaded beside the model: their prefixes go into exclude_modules.
        hf_model._mtp_layer_prefixes = sorted({name.split(".")[0] for name in carried})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mfp4-export-", dir=out.parent))
    try:
        export_hf_checkpoint(hf_model, export_dir=staging, extra_state_dict=carried)
        return _finish(ckpt, staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish(ckpt: Checkpoint, staging: Path, out: Path) -> Path:
    """Check that every source tensor is in the export (as itself, its packed NVFP4 form, or, for fused experts,
    ModelOpt's per-expert parts: `darwin.experts.expert_parts`) and move it into place atomically, the tensors left
    unquantized as the source holds them, with the source's tokenizer and processor files beside ModelOpt's
    config."""
    exported = Checkpoint(staging)
    missing = [name for name, info in ckpt.tensors.items() if name not in exported.tensors and not (
        (parts := expert_parts(name, info.shape)) and all(f"{m}.weight" in exported.tensors for m in parts))]
    if missing:
        raise DarwinError(f"ModelOpt's export lost {len(missing)} tensors of {ckpt.path}: {', '.join(missing[:5])}")
    with CheckpointWriter(out, max_shard_bytes=4 << 30) as writer:
        for name, info in exported.tensors.items():
            source = ckpt.tensors.get(name)
            # ModelOpt exports what it left unquantized in the dtype the model was loaded in (bf16): such a tensor
            # (same name and shape as in the source; a quantized weight is packed to another shape) is the source's
            # own bytes, in its own dtype (a release's float32 A_log and norms stay float32)
            kept = source is not None and source.shape == info.shape and info.dtype in FLOAT_DTYPES
            writer.add(name, ckpt.read(name) if kept else exported.read(name))
        copy_side_files(ckpt.path, writer.tmp)
        copy_side_files(staging, writer.tmp)
    return out
