"""Phase 0 for mixture-of-experts models: how the router spreads a calibration set over the experts.

Per decoder layer and expert, over the real (non-pad) tokens of the calibration texts:
- `frequency` = top-k selections of the expert / tokens (so a layer's frequencies sum to top_k, and the uniform
  share is top_k / num_experts);
- `entropy` = H = -sum_i p_i log2 p_i of the router softmax p, in bits, averaged over tokens (one value per layer,
  repeated on its expert rows);
- `dead` = frequency < 0.05 * top_k / num_experts (below 5% of the uniform share: docs/method.md's rule).

Router outputs are read with forward hooks on the router modules (where the family table puts them:
darwin/families `router`), so the top-k is exactly the one transformers routes with: `Qwen3MoeTopKRouter` /
`Qwen3_5MoeTopKRouter` (`mlp.gate`) return (logits, top-k weights, top-k indices), the softmax taken in float32
before `torch.topk`; Gemma 4's `router` returns the softmax itself in place of the logits. The router sees the
batch flattened to (batch * sequence, hidden), so the attention mask flattened the same way selects the real
tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import torch

from darwin.errors import DarwinError
from darwin.kinds import family_for_config
from darwin.probes import batches, decoder_layers
from darwin.report import png, read_table, write_table

COLUMNS = ["layer", "expert", "frequency", "entropy", "dead"]
DEAD_SHARE = 0.05


def dead_rule(top_k: int, num_experts: int) -> str:
    threshold = DEAD_SHARE * top_k / num_experts
    return (f"dead when frequency < {DEAD_SHARE} * top_k / num_experts = {DEAD_SHARE} * {top_k} / {num_experts} "
            f"= {threshold:.6g}, where frequency = top-k selections of the expert / calibration tokens")


def checkpoint_has_experts(model: str | os.PathLike) -> bool:
    """Whether a checkpoint holds routed experts, from its tensor names (no weights are loaded)."""
    from darwin.checkpoint import Checkpoint

    checkpoint = Checkpoint(model)
    return any(checkpoint.kind(name)[0] == "expert" for name in checkpoint.tensors)


def routers(model) -> dict[int, tuple[torch.nn.Module, str]]:
    """{layer: (router module, 'logits' | 'probs')} for the decoder layers that route to experts, where the model's
    family (darwin/families) says its router is."""
    router = family_for_config(model.config.to_dict()).router
    if router is None:
        return {}
    path, output = router
    found = {}
    for index, layer in enumerate(decoder_layers(model)):
        try:
            module = layer.get_submodule(path)
        except AttributeError:  # a dense layer of a family with experts (or a dense model of it)
            continue
        # A dense MLP's `gate` would be a plain projection: routers hold one weight row per expert.
        if not isinstance(module, torch.nn.Linear):
            found[index] = (module, output)
    return found


class _Recorder:
    """Accumulates one layer's selections and entropy over the real tokens of each batch."""

    def __init__(self, output: str):
        self.output = output
        self.mask: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.entropy = 0.0
        self.tokens = 0
        self.top_k = 0

    def __call__(self, module, args, result):
        if not (isinstance(result, tuple) and len(result) == 3):
            raise DarwinError(f"router {type(module).__name__} does not return (scores, weights, indices)")
        scores, _, indices = result
        keep = self.mask
        scores, indices = scores[keep].float(), indices[keep]
        probs = scores.softmax(dim=-1) if self.output == "logits" else scores
        if self.counts is None:
            self.counts = torch.zeros(probs.shape[-1], dtype=torch.long, device=probs.device)
            self.top_k = indices.shape[-1]
        self.counts += torch.bincount(indices.flatten(), minlength=probs.shape[-1])
        self.entropy += float(-torch.special.xlogy(probs, probs).sum() / math.log(2))
        self.tokens += probs.shape[0]


@torch.inference_mode()
def routing_stats(model, tokenizer, texts: list[str], device=None, batch_size: int = 8) -> pd.DataFrame:
    """DataFrame (layer, expert, frequency, entropy, dead); `attrs` hold the dead rule, top_k and token count."""
    found = routers(model)
    if not found:
        raise DarwinError(f"{type(model).__name__} has no expert routers to profile")
    device = device or next(model.parameters()).device
    recorders = {index: _Recorder(output) for index, (_, output) in found.items()}
    handles = [module.register_forward_hook(recorders[index]) for index, (module, _) in found.items()]
    try:
        for _, batch in batches(tokenizer, texts, batch_size, device):
            for recorder in recorders.values():
                recorder.mask = batch["attention_mask"].flatten().bool()
            model.get_decoder()(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for index, recorder in recorders.items():
        frequency = (recorder.counts.double() / recorder.tokens).cpu().tolist()
        threshold = DEAD_SHARE * recorder.top_k / len(frequency)
        rows += [(index, expert, f, recorder.entropy / recorder.tokens, f < threshold)
                 for expert, f in enumerate(frequency)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    any_recorder = next(iter(recorders.values()))
    frame.attrs.update(dead_rule=dead_rule(any_recorder.top_k, len(any_recorder.counts)),
                       top_k=any_recorder.top_k, tokens=any_recorder.tokens)
    return frame


def dead_expert_map(frame: pd.DataFrame) -> dict[int, set[int]]:
    """{layer: {dead expert, ...}} for every profiled layer (an empty set where all experts live)."""
    dead = {int(layer): set() for layer in frame["layer"].unique()}
    for layer, expert in frame.loc[frame["dead"], ["layer", "expert"]].itertuples(index=False):
        dead[int(layer)].add(int(expert))
    return dead


def plot_routing(frame: pd.DataFrame, title: str = "expert activation frequency") -> bytes:
    """PNG heatmap, layers (rows) x experts (columns) of frequency, dead experts crossed out."""
    from matplotlib.figure import Figure

    table = frame.pivot(index="layer", columns="expert", values="frequency").sort_index()
    width, height = min(16, max(6.5, 3 + 0.12 * table.shape[1])), min(14, max(4, 2.5 + 0.3 * table.shape[0]))
    figure = Figure(figsize=(width, height))
    ax = figure.add_subplot()
    image = ax.imshow(table.to_numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    dead = frame[frame["dead"]]
    rows = {layer: i for i, layer in enumerate(table.index)}
    ax.scatter(dead["expert"], dead["layer"].map(rows), marker="x", s=12, color="cyan", label="dead")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, math.ceil(len(table.index) / 20))
    ax.set_yticks(range(0, len(table.index), step), table.index[::step])
    ax.set_title(f"{title}\nx: dead (frequency < {DEAD_SHARE} * top_k / num_experts)", fontsize="small")
    figure.colorbar(image, ax=ax, shrink=0.8, label="top-k selections / token")
    return png(figure)


def write_routing(frame: pd.DataFrame, out: str | os.PathLike) -> Path:
    """`routing.parquet` (the dead rule in its pandas metadata, `attrs`) and `routing.png`, written atomically."""
    return write_table(frame, out, "routing", plot_routing(frame))


def read_routing(path: str | os.PathLike) -> pd.DataFrame:
    return read_table(path, "routing", "run `darwin probe` on the MoE model first")


def routing_table(frame: pd.DataFrame) -> list[dict]:
    """Per layer: entropy, dead count and ids, min and max frequency (the artifact table)."""
    rows = []
    for layer, group in frame.groupby("layer"):
        rows.append({"layer": int(layer), "entropy_bits": round(float(group["entropy"].iloc[0]), 4),
                     "dead": int(group["dead"].sum()),
                     "dead_experts": " ".join(str(e) for e in group.loc[group["dead"], "expert"]),
                     "min_frequency": round(float(group["frequency"].min()), 5),
                     "max_frequency": round(float(group["frequency"].max()), 5)})
    return rows


def routing_markdown(frame: pd.DataFrame, label: str) -> str:
    dead = frame.groupby("layer")["dead"].sum()
    return (f"### MoE routing: {label}\n\n"
            f"- calibration tokens: {frame.attrs.get('tokens', '?')}, top_k: {frame.attrs.get('top_k', '?')}, "
            f"experts per layer: {frame['expert'].nunique()}\n"
            f"- rule: {frame.attrs.get('dead_rule', '')}\n"
            f"- dead experts: {int(dead.sum())} in {int((dead > 0).sum())} of {len(dead)} layers\n"
            f"- routing entropy (bits, mean over tokens): {frame.groupby('layer')['entropy'].first().mean():.3f} "
            f"averaged over layers\n")
