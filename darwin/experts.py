"""Routed experts in the two layouts checkpoints hold them in, as one notion of expert slice.

- Per expert: `experts.N.gate_proj.weight`, `experts.N.up_proj.weight`, `experts.N.down_proj.weight` (Qwen3-MoE
  releases, Qwen3.5-MoE MTP layers, and what vLLM, ModelOpt and llm-compressor name quantized experts by).
- Fused, 3-D without `.weight` (Qwen3.5-MoE and Gemma 4 releases): `experts.gate_up_proj` [E, 2I, H] holds expert
  N's gate in rows [0, I) of slice N and its up in rows [I, 2I) (transformers' `.chunk(2, dim=-1)` of the product),
  `experts.down_proj` [E, H, I] its down in slice N.

A per-expert tensor is one expert's slice; a fused one holds E slices along dim 0 (`expert_slices`). `InLayoutOf`
shows one checkpoint's experts in another's layout, so parents whose layouts differ merge expert by expert and the
child keeps the father's.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from darwin.checkpoint import Checkpoint, TensorInfo

FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<part>gate_up_proj|down_proj)$")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
EXPERT_PART = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj$")  # one expert's linear, per-expert layout


def expert_slices(name: str, shape: tuple[int, ...]) -> list[int]:
    """The experts a tensor holds, one slice each: `[e]` for a per-expert tensor, every index of dim 0 for a fused
    one, none otherwise."""
    match = EXPERT_INDEX.search(name)
    if match is not None:
        return [int(match.group(1))]
    if FUSED.match(name) and len(shape) == 3:
        return list(range(shape[0]))
    return []


def expert_parts(name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, slice]]:
    """{per-expert module: (expert, rows of its slice)} of a fused 3-D expert tensor, {} for any other tensor."""
    match = FUSED.match(name)
    if match is None or len(shape) != 3:
        return {}
    prefix, experts, rows = match["prefix"], shape[0], shape[1]
    if match["part"] == "down_proj":
        return {f"{prefix}.{e}.down_proj": (e, slice(0, rows)) for e in range(experts)}
    half = rows // 2
    return {f"{prefix}.{e}.{part}": (e, rows_of) for e in range(experts)
            for part, rows_of in (("gate_proj", slice(0, half)), ("up_proj", slice(half, rows)))}


def fused_sources(checkpoint: Checkpoint) -> dict[str, tuple[str, int, slice]]:
    """{per-expert module: (fused tensor, expert, rows)} of every fused expert tensor of `checkpoint`."""
    return {module: (name, expert, rows) for name, info in checkpoint.tensors.items()
            for module, (expert, rows) in expert_parts(name, info.shape).items()}


class InLayoutOf:
    """`other` with its routed experts in `template`'s layout: a fused tensor of the template that `other` holds
    per expert reads as those tensors stacked, a per-expert tensor of the template that `other` holds fused reads
    as its slice of the fused one. The tensors so read no longer appear under their own names; everything else is
    `other` itself."""

    def __init__(self, other: Checkpoint, template: Checkpoint):
        self._other = other
        self._stacked: dict[str, list[tuple[str, int, slice]]] = {}  # template's fused name -> other's parts
        self._sliced: dict[str, tuple[str, int, slice]] = {}  # template's per-expert name -> other's fused slice
        fused_in_other = fused_sources(other)
        for name, info in template.tensors.items():
            if name in other.tensors:
                continue
            parts = [(f"{module}.weight", expert, rows) for module, (expert, rows) in
                     expert_parts(name, info.shape).items()]
            if parts and all(part in other.tensors for part, _, _ in parts):
                self._stacked[name] = parts
            elif name.endswith(".weight") and name.removesuffix(".weight") in fused_in_other:
                self._sliced[name] = fused_in_other[name.removesuffix(".weight")]
        consumed = {part for parts in self._stacked.values() for part, _, _ in parts} | \
            {fused for fused, _, _ in self._sliced.values()}
        self.tensors: dict[str, TensorInfo] = {n: info for n, info in other.tensors.items() if n not in consumed}
        for name, parts in self._stacked.items():
            first = other.tensors[parts[0][0]]
            self.tensors[name] = replace(first, name=name, shape=template.tensors[name].shape)
        for name, (fused, _, _) in self._sliced.items():
            self.tensors[name] = replace(other.tensors[fused], name=name, shape=template.tensors[name].shape)

    @property
    def converted(self) -> bool:
        return bool(self._stacked or self._sliced)

    def __getattr__(self, attribute):  # config, family, path, source, kind, num_layers, ...: the checkpoint's own
        return getattr(self._other, attribute)

    def read_array(self, name: str) -> np.ndarray:
        if name in self._stacked:
            parts = self._stacked[name]
            first = self._other.read_array(parts[0][0])
            out = np.empty(self.tensors[name].shape, dtype=first.dtype)
            for part, expert, rows in parts:
                out[expert, rows] = self._other.read_array(part)
            return out
        if name in self._sliced:
            fused, expert, rows = self._sliced[name]
            return self._other.read_array(fused)[expert, rows]
        return self._other.read_array(name)

    def read(self, name: str):
        from darwin.checkpoint import to_torch

        if name in self._stacked or name in self._sliced:
            return to_torch(self.read_array(name), self.tensors[name].dtype)
        return self._other.read(name)


def in_layout_of(other: Checkpoint | None, template: Checkpoint) -> Checkpoint | InLayoutOf | None:
    """`other` itself where its experts are already laid out as `template`'s, else `InLayoutOf(other, template)`."""
    if other is None:
        return None
    view = InLayoutOf(other, template)
    return view if view.converted else other
