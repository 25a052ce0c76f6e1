"""Whether two parents (and a base) can be merged tensor by tensor, or which differences refuse them."""

from __future__ import annotations

import re

from darwin.checkpoint.dtypes import dtype_name
from darwin.checkpoint.reader import Checkpoint
from darwin.errors import DarwinError

# What must agree between the language models of two parents whose wrappers differ (ForConditionalGeneration of a
# release, ForCausalLM of its fine-tune): the text config's shape of the network and its vocabulary.
LANGUAGE_MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "intermediate_size", "vocab_size")
WRAPPERS = re.compile(r"For(CausalLM|ConditionalGeneration)$")


def language_model_config(config: dict) -> dict:
    text = config.get("text_config") or config
    return {key: text.get(key) for key in LANGUAGE_MODEL_KEYS if text.get(key) is not None}


def check_compatible(father: Checkpoint, mother: Checkpoint, base: Checkpoint | None = None, strict: bool = False,
                     limit: int = 5) -> None:
    """Refuse parents that cannot be merged tensor by tensor, naming the first problems (README: "Merging a release
    with its fine-tune").

    Allowed unless `strict`: tensors held by one parent only (carried), shared tensors that differ in dtype only
    (merged in float32), architectures that differ by the wrapper only when the language models agree. Always
    refused: a quantized parent, another family, language model or vocabulary, a shared tensor of another shape, and
    a tensor father and mother share but the base lacks."""
    for label, checkpoint in (("father", father), ("mother", mother), ("base", base)):
        if checkpoint is not None and checkpoint.config.get("quantization_config"):
            raise DarwinError(f"the {label} {checkpoint.path} is quantized (quantization_config in config.json): "
                              "merge the unquantized checkpoints")
    for label, other in (("mother", mother), ("base", base)):
        if other is None:
            continue
        problems = []
        arch_a, arch_b = father.config.get("architectures"), other.config.get("architectures")
        if arch_a and arch_b and arch_a != arch_b:
            same_model = [WRAPPERS.sub("", a) for a in arch_a] == [WRAPPERS.sub("", b) for b in arch_b]
            if strict or not same_model:
                problems.append(f"architectures {arch_a} vs {arch_b}")
        lm_a, lm_b = language_model_config(father.config), language_model_config(other.config)
        differ = [key for key in lm_a if key in lm_b and lm_a[key] != lm_b[key]]
        if father.family.name != other.family.name or differ:
            problems.append(f"language models differ ({father.family.name} vs {other.family.name}" +
                            "".join(f"; {key} {lm_a[key]} vs {lm_b[key]}" for key in differ) + ")")
        if strict or label == "base":
            only_a = [n for n in father.tensors if n not in other.tensors and (strict or n in mother.tensors)]
            problems += [f"{n} only in father" + ("" if strict else " and mother") for n in only_a[:limit]]
        if strict:
            problems += [f"{n} only in {label}" for n in other.tensors if n not in father.tensors][:limit]
        for name, info in father.tensors.items():
            peer = other.tensors.get(name)
            if peer is not None and (peer.shape != info.shape or (strict and peer.dtype != info.dtype)):
                problems.append(f"{name} {dtype_name(info.dtype)}{list(info.shape)} vs "
                                f"{dtype_name(peer.dtype)}{list(peer.shape)}")
            if len(problems) >= limit:
                break
        if problems:
            raise DarwinError(f"father and {label} do not match: " + "; ".join(problems[:limit]))

