"""vLLM general plugin for darwin's tests on vLLM's CPU build, which registers no NVFP4 kernel for the CPU.

W4A4 (modelopt_fp4, darwin's mfp4): vLLM's own EmulationNvFp4LinearKernel, registered for the CPU platform.
W4A16 (compressed-tensors nvfp4a16): vLLM keeps weight-only NVFP4 to its GPU kernels, so the same emulation
without the activation quantization: the weight decoded by vLLM's own `dequantize_to_dtype`, then a matmul.
DARWIN_VLLM_NVFP4_ACTIVATIONS=unquantized runs W4A4 layers so too, to compare their weights alone with a decode.
Everything before the kernel (the checkpoint loader, the fused layers' shared global scale) is vLLM's.
"""

import os

import torch


def register() -> None:
    import vllm.model_executor.kernels.linear as linear
    from vllm.model_executor.kernels.linear.nvfp4.base import NvFp4LinearLayerConfig
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_w4a4_nvfp4
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype
    from vllm.platforms import PlatformEnum, current_platform

    if not current_platform.is_cpu():
        return

    class WeightOnlyEmulation(EmulationNvFp4LinearKernel):
        def apply_weights(self, layer, x, bias=None):
            weight = dequantize_to_dtype(layer.weight.data.view(torch.uint8), layer.weight_scale.data,
                                         layer.weight_global_scale, x.dtype, 16, swizzle=False)
            out = x @ weight.t()
            return out if bias is None else out + bias

    linear.register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")
    choose = linear.init_nvfp4_linear_kernel

    weight_only = os.environ.get("DARWIN_VLLM_NVFP4_ACTIVATIONS") == "unquantized"

    def init_nvfp4_linear_kernel(use_a16: bool = False):
        if use_a16 or weight_only:
            return WeightOnlyEmulation(NvFp4LinearLayerConfig())
        return choose(use_a16=use_a16)

    for module in (modelopt, compressed_tensors_w4a4_nvfp4):
        module.init_nvfp4_linear_kernel = init_nvfp4_linear_kernel
