"""Where a checkpoint's tensors live in the model transformers builds from it, by transformers' own conversion rules.

A checkpoint's names are not always its model's parameter names: a Qwen3.5 release stores `model.language_model.*`
that its text model holds as `model.*`, and Qwen3-MoE stores experts one by one that the model holds fused. Phase 2
fills a built model with merged tensors, and a LoRA adapter names the modules of a built model; both need the map.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

@dataclass
class ModelPlacement:
    """Where a checkpoint's tensors go in a model built by transformers, by transformers' own conversion rules for
    that model (`get_model_conversion_mapping`): `direct` maps a name onto one parameter (the renames
    `from_pretrained` applies, e.g. a release's `model.language_model.*` onto the text model's `model.*`);
    `converted` groups the names one WeightConverter turns into one parameter (experts stored per expert, fused in
    the model), with that converter; the rest the model does not build (a vision tower, MTP)."""

    direct: dict[str, str]
    converted: dict[str, tuple[object, list[tuple[str, str]]]]  # parameter -> (converter, [(name, pattern)])
    group_of: dict[str, str] = field(init=False)  # name -> the converted parameter it is a source of

    def __post_init__(self):
        self.group_of = {name: target for target, (_, names) in self.converted.items() for name, _ in names}

    def placed(self, name: str) -> bool:
        return name in self.direct or name in self.group_of


# Per model, the placement of the names last asked: Phase 2 merges into the same skeleton for every genome.
_placements: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def place_in_model(model: torch.nn.Module, names: list[str]) -> ModelPlacement:
    cached = _placements.get(model)
    if cached is not None and cached[0] == names:
        return cached[1]
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings, dot_natural_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    direct, converted = {}, {}
    for name in sorted(names, key=dot_natural_key):  # transformers feeds a converter its tensors in this order
        renamed = apply_renamings(name, renamings)
        for converter in converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                if target in state:
                    converted.setdefault(target, (converter, []))[1].append((name, pattern))
                break
        else:
            prefix = f"{model.base_model_prefix}." if model.base_model_prefix else None
            for candidate in (renamed, prefix and prefix + renamed, prefix and renamed.removeprefix(prefix)):
                if candidate and candidate in state:  # as from_pretrained adds or strips the base model's prefix
                    direct[name] = candidate
                    break
    placement = ModelPlacement(direct, converted)
    _placements[model] = (list(names), placement)
    return placement



def skeleton(directory: str | Path) -> torch.nn.Module:
    """The model transformers builds for the checkpoint in `directory`, on the meta device: its parameter names and
    shapes without a byte of memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
