"""A PEFT LoRA adapter as a parent: its base's tensors, with every adapted weight materialised when it is read.

A parent written `BASE+ADAPTER` (mergekit's syntax), or a directory or hub id holding `adapter_config.json` (its
base from `base_model_name_or_path`), reads as a full checkpoint, one tensor at a time: an adapted weight is
`W + scaling * B @ A` computed as peft's `merge_and_unload` computes it (the adapter in float32, added in place into
the base's dtype), so a merge of `base+adapter` gives the bytes of a merge of peft's merged model without the whole
model ever being in memory. Weights the adapter saves whole (`modules_to_save`, resized embeddings) replace the
base's. What peft merges otherwise (DoRA, LoRA biases, LoRA on raw parameters) is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from darwin.errors import DarwinError

if TYPE_CHECKING:
    import torch

    from darwin.checkpoint import Checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft's saved names start with: the PeftModel's wrapper around the base model
_LORA = re.compile(r"(?P<module>.+)\.(?:lora_(?P<linear>[AB])\.weight|lora_embedding_(?P<embedding>[AB]))$")
_REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "target_parameters": "LoRA on parameters",
            "layer_replication": "layer replication"}


def is_adapter(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file()


@dataclass(frozen=True)
class Delta:
    """One adapted weight: the adapter's A and B, and how peft scales and lays out their product."""

    a: str
    b: str
    scaling: float
    transposed: bool  # B @ A is stored (in, out): embeddings, and Conv1D-style layers (fan_in_fan_out)
    embedding: bool  # peft rounds an embedding's delta to the weight's dtype before adding it, a linear's after


class LoraAdapter:
    """The adapter in `directory`, applied to the tensors of `base` (a Checkpoint)."""

    def __init__(self, directory: Path, base: Checkpoint):
        self.path = directory
        try:
            self.config = json.loads((directory / CONFIG_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise DarwinError(f"corrupt {directory / CONFIG_NAME}: {exc}") from None
        if self.config.get("peft_type") != "LORA":
            raise DarwinError(f"{directory} is a {self.config.get('peft_type')} adapter; darwin reads LoRA adapters")
        refused = [label for key, label in _REFUSED.items() if self.config.get(key)]
        if refused:
            raise DarwinError(f"the adapter {directory} uses {', '.join(refused)}, which darwin does not merge; merge "
                              "it into its base with peft's merge_and_unload and pass that checkpoint")
        if not (directory / WEIGHTS_NAME).is_file():
            raise DarwinError(f"no {WEIGHTS_NAME} in {directory} (a pickle adapter_model.bin can run code when loaded; "
                              "save the adapter with safetensors)")
        from safetensors import safe_open

        self._file = safe_open(directory / WEIGHTS_NAME, framework="pt")
        parts: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in self._file.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
            name = key.removeprefix(PREFIX)
            match = _LORA.match(name)
            if match:
                kind = "linear" if match["linear"] else "embedding"
                parts.setdefault(match["module"], {"kind": kind})[match["linear"] or match["embedding"]] = key
            else:  # a whole weight (modules_to_save, or an embedding saved beside its LoRA as `base_layer`)
                replaced[name.replace(".base_layer.", ".")] = key
        names = _checkpoint_names(base, [f"{module}.weight" for module in parts] + list(replaced))
        self.deltas = {names[f"{module}.weight"]: self._delta(module, part) for module, part in parts.items()}
        self.replaced = {names[parameter]: key for parameter, key in replaced.items()}

    def _delta(self, module: str, part: dict[str, str]) -> Delta:
        from peft.utils.other import get_pattern_key

        if "A" not in part or "B" not in part:
            raise DarwinError(f"the adapter {self.path} holds only half of the LoRA of {module}")
        config = self.config
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        embedding = part["kind"] == "embedding"
        return Delta(part["A"], part["B"], scaling, embedding or bool(config.get("fan_in_fan_out")), embedding)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a weight the adapter replaces whole (a resized embedding differs from the base's)."""
        return tuple(self._file.get_slice(self.replaced[name]).get_shape())

    def apply(self, name: str, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight `name`, one the adapter adapts or replaces, as peft's merged model holds it in `dtype`, from
        the base's `base`."""
        import torch

        if name in self.replaced:
            base = self._file.get_tensor(self.replaced[name]).to(dtype)
        delta = self.deltas.get(name)
        if delta is None:
            return base
        # peft loads adapters in float32 under a bf16/fp16 model (autocast_adapter_dtype), in the model's dtype else
        lora_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        a, b = (self._file.get_tensor(key).to(lora_dtype) for key in (delta.a, delta.b))
        product = b @ a
        product = (product.T if delta.transposed else product) * delta.scaling
        weight = base.clone()
        weight += product.to(dtype) if delta.embedding else product
        return weight


def _checkpoint_names(base: Checkpoint, parameters: list[str]) -> dict[str, str]:
    """The base checkpoint's name of each parameter of the model peft adapted: the same name, or where transformers
    renames on load (a release's `model.language_model.*`), the checkpoint name its conversion rules map there."""
    names = {p: p for p in parameters if p in base.tensors}
    rest = [p for p in parameters if p not in names]
    if rest:
        from darwin.placement import place_in_model, skeleton

        placement = place_in_model(skeleton(base.path), list(base.tensors))
        by_parameter = {parameter: name for name, parameter in placement.direct.items()}
        names.update({p: by_parameter[p] for p in rest if p in by_parameter})
    unknown = [p for p in parameters if p not in names]
    if unknown:
        raise DarwinError(f"the adapter adapts {len(unknown)} weights its base {base.path} does not hold, e.g. "
                          f"{unknown[0]}: is it an adapter of another model?")
    return names
