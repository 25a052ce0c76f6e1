"""The child in memory: a built model's parameters overwritten with the merged tensors (Phase 2 evaluates so)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from darwin.checkpoint import to_torch
from darwin.errors import DarwinError
from darwin.merge.engine import merged_tensors
from darwin.merge.plan import MergePlan
from darwin.placement import place_in_model

if TYPE_CHECKING:
    import torch

# Kinds of tensors (darwin/families) that AutoModelForCausalLM builds no parameter for: Phase 2 leaves them out
UNBUILT_KINDS = ("vision", "mtp")


def merge_into_model(plan: MergePlan, model: torch.nn.Module, device: str = "cpu") -> dict[str, dict]:
    """Fill an already-built model's parameters with the merged tensors (Phase 2 evaluates from memory), placed
    as transformers places that checkpoint's tensors (`place_in_model`: renamed, or converted, e.g. per-expert
    tensors fused). Tensors the model does not build (UNBUILT_KINDS) do not change its fitness and are merged only
    on disk; the tensors the father alone holds are already the skeleton's."""
    import torch

    state = model.state_dict()
    placement = place_in_model(model, [tp.name for tp in plan.tensors])
    # a tensor the father alone holds and the model does not build (a release's k/v of Gemma 4's kv-shared layers)
    # cannot change what the skeleton computes either
    missing = [tp.name for tp in plan.tensors if not placement.placed(tp.name) and tp.kind not in UNBUILT_KINDS
               and tp.carried != "father"]
    if missing:
        raise DarwinError(f"the model has no parameter for {len(missing)} checkpoint tensors, e.g. {missing[0]}")
    by_name = {tp.name: tp for tp in plan.tensors}
    # a converted parameter is built from all its sources, the father's own ones too
    wanted = [tp.name for tp in plan.tensors if placement.placed(tp.name) and (tp.carried != "father"
                                                                               or tp.name in placement.group_of)]
    pending: dict[str, dict[str, torch.Tensor]] = {}  # converted parameter -> its merged sources so far
    rows = {}
    with torch.no_grad():
        for name, raw, row in merged_tensors(plan, wanted, device=device):
            tensor = to_torch(raw, plan.source(by_name[name]).dtype)
            rows[name] = row
            if name in placement.direct:
                state[placement.direct[name]].copy_(tensor)
                continue
            target = placement.group_of[name]
            pending.setdefault(target, {})[name] = tensor.clone()  # `raw` may be recycled memory
            converter, sources = placement.converted[target]
            if len(pending[target]) == len(sources):
                group = copy.deepcopy(converter)  # it collects the tensors it converts
                for source, pattern in sources:
                    group.add_tensor(target, source, pattern, pending[target][source])
                for parameter, value in group.convert(target, model=model, config=model.config).items():
                    state[parameter].copy_(value)
                del pending[target]
    return rows
