"""Tensor kinds: which part of the network a tensor belongs to, from its name, per architecture family.

Architecture knowledge lives in `darwin/families/*.yaml`, one file per family: ordered (kind, regex) rules, the
regex that finds the decoder block and, for mixture-of-experts families, where a decoder layer's router is and what
it returns. A family may `extends` another; its own rules are tried first. A new family is a new YAML file, no
code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from darwin.errors import DarwinError

KINDS = (
    "embed", "lm_head", "attn", "linear_attn", "mlp", "expert", "shared_expert", "router", "norm", "vision", "mtp",
    "other",
)
DEFAULT_FAMILY = "decoder"
# What the first element of a router's output tuple holds (the rest: top-k weights, top-k indices)
ROUTER_OUTPUTS = ("logits", "probs")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    block: re.Pattern
    rules: tuple[tuple[str, re.Pattern], ...]
    router: tuple[str, str] | None = None  # (module path inside a decoder layer, one of ROUTER_OUTPUTS)

    def classify(self, name: str) -> tuple[str, int | None]:
        """(kind, decoder block index or None) of a tensor name; `other` where no rule matches."""
        kind = next((k for k, pattern in self.rules if pattern.search(name)), "other")
        match = self.block.search(name) if kind not in ("vision", "mtp") else None
        return kind, int(match.group(1)) if match else None


def _load_raw(name: str) -> dict:
    path = resources.files("darwin") / "families" / f"{name}.yaml"
    if not path.is_file():
        raise DarwinError(f"unknown architecture family {name!r}")
    return yaml.safe_load(path.read_text())


@cache
def family(name: str) -> Family:
    raw = _load_raw(name)
    parent = family(raw["extends"]) if raw.get("extends") else None
    rules = [(kind, re.compile(rx)) for kind, rx in raw.get("rules", [])]
    for kind, _ in rules:
        if kind not in KINDS:
            raise DarwinError(f"family {name}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    block = raw.get("block")
    router = tuple(raw["router"]) if raw.get("router") else parent.router if parent else None
    if router is not None and (len(router) != 2 or router[1] not in ROUTER_OUTPUTS):
        raise DarwinError(f"family {name}: router must be [module path, {' | '.join(ROUTER_OUTPUTS)}], got {router}")
    return Family(
        name=name,
        model_types=tuple(raw.get("model_types", [])),
        block=re.compile(block) if block else parent.block,
        rules=tuple(rules) + (parent.rules if parent else ()),
        router=router,
    )


@cache
def _families_by_model_type() -> dict[str, str]:
    table = {}
    for entry in (resources.files("darwin") / "families").iterdir():
        if entry.name.endswith(".yaml"):
            name = entry.name.removesuffix(".yaml")
            for model_type in _load_raw(name).get("model_types", []):
                table[model_type] = name
    return table


def family_for_config(config: dict) -> Family:
    """The family of a checkpoint from its config.json (top-level or text model_type); the generic decoder
    table for a model type no family names."""
    for model_type in (config.get("model_type"), (config.get("text_config") or {}).get("model_type")):
        if model_type in _families_by_model_type():
            return family(_families_by_model_type()[model_type])
    return family(DEFAULT_FAMILY)
