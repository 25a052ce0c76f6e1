"""Phase 0, functional MRI: how much each decoder layer matters to each probe set.

The importance of layer L for a probe set is the cosine distance `1 - cos(h, h_L)` between the final hidden state
of the full model (`h`) and of the model with layer L skipped (`h_L`: the layer's output is replaced by its input,
so the residual stream passes through untouched), averaged over the probe's prompts. The final hidden state is the
decoder's output after its final norm (what the LM head reads), at the last real token of each prompt by default
(`pool="last"`: the position that predicts the next token) or averaged over the real tokens (`pool="mean"`).
Prompts are batched with right padding, so in a causal model (attention or recurrent) no real token ever sees a
pad, and pads are masked out of the pooling. Models run with `use_cache=False`: every pass starts from nothing,
which the Qwen3.5 hybrid (Gated DeltaNet + full attention) needs, as its cache holds recurrent state.

Probe sets are plain text files, one prompt per line, named after the set (`reasoning.txt` -> REASONING); the
five shipped sets live in `darwin/data/probes/`, and a directory of the same shape replaces them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from darwin.errors import DarwinError
from darwin.progress import Progress
from darwin.report import png, read_table, write_table
from darwin.runtime import pick_device

COLUMNS = ["layer", "probe", "importance"]
POOLS = ("last", "mean")


def load_probes(directory: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{PROBE: [prompt, ...]} from the `*.txt` files of a directory (the shipped sets when None); blank lines
    are skipped, every other line is one prompt."""
    root = resources.files("darwin") / "data" / "probes" if directory is None else Path(directory)
    if not root.is_dir():
        raise DarwinError(f"probe directory {root} does not exist")
    probes = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            prompts = [line.strip() for line in entry.read_text(encoding="utf-8").splitlines() if line.strip()]
            if prompts:
                probes[entry.name.removesuffix(".txt").upper()] = prompts
    if not probes:
        raise DarwinError(f"no probe prompts in {root} (expected NAME.txt files, one prompt per line)")
    return probes


def load_texts(path: str | os.PathLike) -> list[str]:
    """A calibration file: one text per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DarwinError(f"calibration file {path} does not exist")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise DarwinError(f"calibration file {path} has no text")
    return texts


def load_model(path_or_model, device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer), the model in eval mode on `device` in its checkpoint dtype. A multimodal Qwen3.5
    checkpoint (`Qwen3_5ForConditionalGeneration`) loads as its text model: transformers maps
    `model.language_model.*` onto `Qwen3_5ForCausalLM` and leaves the vision tower and MTP head on disk.
    An adapter parent loads as its base with the adapter merged. A live model is accepted too; its tokenizer comes
    from `model.name_or_path`."""
    from transformers import AutoTokenizer, PreTrainedModel

    device = pick_device(device)
    if isinstance(path_or_model, PreTrainedModel):
        model, source = path_or_model.to(device), path_or_model.name_or_path
    else:
        from darwin.checkpoint import Checkpoint

        checkpoint = Checkpoint(path_or_model, trust_remote_code=trust_remote_code)
        source = checkpoint.path
        model = checkpoint.load_model(dtype="auto", device_map=device, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DarwinError(f"no usable tokenizer beside the model at {source}: {first_line.strip()}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DarwinError(f"the tokenizer at {source} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, in order (`model.layers` of the text model under any CausalLM or multimodal head)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise DarwinError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def _pass_through(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def skipped(layer: torch.nn.Module) -> Iterator[None]:
    """Within the block, `layer` returns its input hidden states unchanged (the hook is removed on exit)."""
    handle = layer.register_forward_hook(_pass_through, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def batches(tokenizer, texts: list[str], batch_size: int, device) -> Iterator[tuple[int, dict]]:
    """(start index, encoded batch) with right padding: real tokens never attend to pads in a causal model."""
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="right")
        yield start, {key: encoded[key].to(device) for key in ("input_ids", "attention_mask")}


def final_hidden(model, batch: dict, pool: str = "last") -> torch.Tensor:
    """(batch, hidden) float32: the decoder's normed output at the last real token, or its masked mean."""
    hidden = model.get_decoder()(**batch, use_cache=False).last_hidden_state.float()
    mask = batch["attention_mask"]
    if pool == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(dim=1) - 1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


@torch.inference_mode()
def layer_importance(model, tokenizer, probes: dict[str, list[str]], device=None, batch_size: int = 8,
                     pool: str = "last", progress: Progress | None = None) -> pd.DataFrame:
    """DataFrame (layer, probe, importance): mean cosine distance over each probe's prompts between the full
    model's final hidden state and the one with that layer skipped; `progress(passes, all passes)`."""
    if pool not in POOLS:
        raise DarwinError(f"unknown pooling {pool!r} (one of {', '.join(POOLS)})")
    device = device or next(model.parameters()).device
    layers = decoder_layers(model)
    labels = [name for name, prompts in probes.items() for _ in prompts]
    texts = [prompt for prompts in probes.values() for prompt in prompts]
    distance = torch.zeros(len(layers), len(texts))
    passes = -(-len(texts) // batch_size) * (len(layers) + 1)
    for number, (start, batch) in enumerate(batches(tokenizer, texts, batch_size, device)):
        full = final_hidden(model, batch, pool)
        for index, layer in enumerate(layers):
            with skipped(layer):
                cut = final_hidden(model, batch, pool)
            cosine = torch.nn.functional.cosine_similarity(full, cut, dim=-1)
            distance[index, start:start + len(full)] = (1 - cosine).clamp_min(0).cpu()
        if progress is not None:
            progress((number + 1) * (len(layers) + 1), passes)
    frame = pd.DataFrame({"layer": [i for i in range(len(layers)) for _ in texts],
                          "probe": labels * len(layers), "importance": distance.flatten().tolist()})
    frame = frame.groupby(["layer", "probe"], sort=False, as_index=False)["importance"].mean()
    frame.attrs["pool"] = pool
    return frame[COLUMNS]


def probe_scores(frame: pd.DataFrame, weights: dict[str, float] | None = None) -> dict[int, float]:
    """{layer: sum_i importance[probe_i] * w_i}, the V6 probe score. Weights are normalised to sum to 1 (equal by
    default), so the score stays on the cosine-distance scale; a probe the weights leave out counts 0."""
    probes = list(dict.fromkeys(frame["probe"]))
    weights = dict.fromkeys(probes, 1.0) if weights is None else dict(weights)
    unknown = sorted(set(weights) - set(probes))
    if unknown:
        raise DarwinError(f"probe weights name unknown probes {unknown} (measured: {probes})")
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise DarwinError(f"probe weights must be non-negative with a positive sum, got {weights}")
    weighted = frame["importance"] * frame["probe"].map(weights).fillna(0.0) / total
    return {int(layer): float(score) for layer, score in weighted.groupby(frame["layer"]).sum().items()}


def plot_importance(frame: pd.DataFrame, title: str = "probe layer importance") -> bytes:
    """PNG: layers on x, one line per probe."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 4.5))
    ax = figure.add_subplot()
    for probe, rows in frame.groupby("probe", sort=False):
        ax.plot(rows["layer"], rows["importance"], marker="o", markersize=3, label=probe)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cosine distance when skipped")
    ax.set_title(f"{title} ({frame.attrs.get('pool', 'last')} token)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return png(figure)


def write_importance(frame: pd.DataFrame, out: str | os.PathLike) -> Path:
    """`probes.parquet` and `probes.png` in `out`, each written atomically; returns the parquet path."""
    return write_table(frame, out, "probes", plot_importance(frame))


def read_importance(path: str | os.PathLike) -> pd.DataFrame:
    return read_table(path, "probes", "run `darwin probe` first")


def importance_table(frame: pd.DataFrame) -> list[dict]:
    """Rows per layer, one column per probe (the artifact table)."""
    table = frame.pivot(index="layer", columns="probe", values="importance").round(5).reset_index()
    return table.to_dict(orient="records")


def importance_markdown(frame: pd.DataFrame, label: str) -> str:
    """The most important layer per probe, and how importance was measured."""
    how = (f"Cosine distance of the final hidden state ({frame.attrs.get('pool', 'last')} real token) when one "
           "decoder layer is skipped (its residual passes through).")
    lines = [f"### Probe layer importance: {label}", "", how, "", "| probe | top layer | importance |", "|---|---|---|"]
    for probe, rows in frame.groupby("probe", sort=False):
        top = rows.loc[rows["importance"].idxmax()]
        lines.append(f"| {probe} | {int(top['layer'])} | {top['importance']:.4f} |")
    return "\n".join(lines) + "\n"
