"""The merge methods, one `Method` record each in METHODS (docs/method.md "Merge forms"), with r the tensor's final
ratio:
- darwin (father A is the base):  A + (B - A) * keep_b * r
- dare-ties (explicit base C):    task vectors A-C, B-C; DARE drop with density_a / density_b and rescale by
  1/density; weights w_a = min(1, 2(1-r)), w_b = min(1, 2r); TIES sign election by the sign of the weighted sum;
  the agreeing weighted deltas summed (the weighted sum: mergekit's dare_ties with `normalize: false`). So r
  walks from the father (r=0) through task arithmetic C + (A-C) + (B-C) under TIES (r=0.5) to the mother (r=1);
  r=0.75 is C + 0.5(A-C) + (B-C). Weights (1-r, r) could only interpolate, never add two skills.
- V6 genomes blend: w * form + (1 - w) * (A + (B - A) * r), w = merge_method_weight.

A form is torch over float32 chunks, on any device. On CPU a method may also have a kernel: the mask bits, the form
and the blend fused in one C pass over the parents' own dtype (`darwin/_kernels.c`); both give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from darwin import masks

try:
    from darwin import _kernels
except ImportError:  # built without a C compiler: every method runs its torch form
    _kernels = None

# dtypes the kernels read and write in place (the value: its dtype code in _kernels.c)
KERNEL_DTYPES = {"F32": 0, "BF16": 1, "F16": 2}


def darwin_form(a, b, base, keep_a, keep_b, r, density_a, density_b):
    import torch

    return a + torch.where(keep_b, (b - a) * r, 0.0)


def task_weights(r: float) -> tuple[float, float]:
    """(w_a, w_b) of the dare-ties weighted sum for a final ratio r."""
    return min(1.0, 2.0 * (1.0 - r)), min(1.0, 2.0 * r)


def dare_ties_form(a, b, base, keep_a, keep_b, r, density_a, density_b):
    import torch

    weight_a, weight_b = task_weights(r)
    delta_a = torch.where(keep_a, (a - base) * (weight_a / density_a), 0.0) if density_a > 0 else torch.zeros_like(a)
    delta_b = torch.where(keep_b, (b - base) * (weight_b / density_b), 0.0) if density_b > 0 else torch.zeros_like(b)
    elected = torch.where(delta_a + delta_b >= 0, 1.0, -1.0)
    agree_a, agree_b = torch.sign(delta_a) == elected, torch.sign(delta_b) == elected
    return base + (torch.where(agree_a, delta_a, 0.0) + torch.where(agree_b, delta_b, 0.0))


def darwin_kernel(out, a, b, base, start, seed, r, density_a, density_b, blend, code):
    _kernels.darwin_form(out, a, b, start, seed, masks.threshold(density_b), r, blend, 1.0 - blend, code)


def dare_ties_kernel(out, a, b, base, start, seed, r, density_a, density_b, blend, code):
    weight_a, weight_b = task_weights(r)
    _kernels.dare_ties_form(out, a, b, base, start, seed, masks.threshold(density_a), masks.threshold(density_b),
                            weight_a / density_a if density_a > 0 else 0.0,
                            weight_b / density_b if density_b > 0 else 0.0,
                            density_a > 0, density_b > 0, r, blend, 1.0 - blend, code)


@dataclass(frozen=True)
class Method:
    """A merge method: the run config's `method` and `darwin merge --method` name one of METHODS. A new method is
    one more record: its torch form is enough (the fused CPU kernel is an option; without one the CPU runs the
    torch form on float32 chunks, as CUDA does)."""

    form: Callable  # torch, on any device: (a, b, base, keep_a, keep_b, r, density_a, density_b) -> merged
    kernel: Callable | None  # the same form fused with the mask bits and the V6 blend, on CPU (_kernels.c)
    needs_base: bool
    genome: str | None  # the genome version the method requires (None: any)

    @property
    def fused(self) -> bool:
        """Whether the CPU runs this method's kernel (it has one, and the extension was built)."""
        return self.kernel is not None and _kernels is not None


METHODS = {
    "darwin-v5": Method(darwin_form, darwin_kernel, needs_base=False, genome="v5"),
    "darwin-v6": Method(darwin_form, darwin_kernel, needs_base=False, genome="v6"),
    "dare-ties": Method(dare_ties_form, dare_ties_kernel, needs_base=True, genome=None),
}


def torch_merge(spec: Method, a, b, base, keep_a, keep_b, r, density_a, density_b, blend):
    """A method's torch form on float32 chunks, blended with A + (B - A) * r where a V6 genome's w < 1: the path
    CUDA runs, and the CPU where a method has no kernel."""
    merged = spec.form(a, b, base, keep_a, keep_b, r, density_a, density_b)
    return merged if blend == 1.0 else merged * blend + (a + (b - a) * r) * (1.0 - blend)
