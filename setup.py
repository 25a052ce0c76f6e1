"""Only the C kernel is declared here; everything else about the package is in pyproject.toml.

The extension is optional: without a C compiler darwin falls back to the (slower) torch path, same bytes.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "darwin._kernels", ["darwin/_kernels.c"],
    # no fused multiply-add and no fast-math: the float results must equal torch's, operation by operation;
    # -fno-trapping-math only lets the loops' selects vectorise (no value changes)
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"],
    optional=True,
)])
