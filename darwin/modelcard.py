"""The release's model card: a README.md in the Hugging Face style (YAML front matter, then markdown).

`model_card(run_info)` renders a plain dict; every key is optional and a missing one drops its section:

    name          str    title (default "Darwin child")
    relation      str    "merge" (default) | "quantized": a quantized model published alone
    child_of      str    the model a quantized release was made from (its `base_model` when a hub id)
    license       str    default "apache-2.0"
    father, mother, base   str   model ids or paths; father and mother on the hub become the `base_model` list
    method        str    darwin-v5 | darwin-v6 | dare-ties
    architecture  str    e.g. Qwen3_5ForConditionalGeneration
    genome        {gene: value}          genome_hash  str
    heldout       summary.json's held-out report: {"split": str, "questions": n,
                  "scores": {"father" | "mother" | "child": {task: value}},
                  "fitness": {"father" | "mother" | "child": value}, "p_values": {"father" | "mother": p}}
    evolution     {"genomes": n, "phase1": n, "phase2": n, "best_fitness": x}
    health        {"verdict": str}
    child_path    str    where the BF16 child sits in the release ("best" in a run, "." for a model)
    quantization  [{"scheme": "mfp4" | "nvfp4a16", "path": str, "quantized": n, "kept": n,
                    "size_before": bytes, "size_after": bytes, "max_abs_error": x, "mean_abs_error": x,
                    "rel_fro_error": x, "experts": n quantized expert linears, "per_expert": n of them cut from fused
                    3-D tensors}]
    location      str    where the release is published (shown in the download line)
    files         [str]  reports shipped with the release (history.parquet, mri/, health/, ...)

`run_info_from_dir(path)` builds that dict from a run directory (`best/`, `summary.json`, `history.parquet`,
`health/`, `quantized/`, `mri/`) or from a model directory (`merge_report.json`, `roundtrip.json`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from darwin.merge import REPORT_NAME
from darwin.quantize import SCHEMES

ROLES = ("father", "mother", "child")
# routed experts stored fused (3-D) are released per expert: the names vLLM loads quantized experts from
PER_EXPERT = ("Routed experts stored fused in the child (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) are "
              "released per expert (`mlp.experts.N.gate_proj` / `up_proj` / `down_proj`), each with its own scales.")
REPORTS = ("summary.json", "history.parquet", "evolution.png", "mri", "probes", "health", REPORT_NAME)


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _size(n) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# lm-eval's output type of a task -> the hub's model-index task type
MODEL_INDEX_TASKS = {"multiple_choice": "multiple-choice", "generate_until": "text-generation"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_repo(model: str | None) -> str | None:
    """The Hugging Face hub repo (org/name) `model` names, the only kind of name `base_model` may hold: of a parent
    `BASE+ADAPTER` the adapter's, of `org/name@revision` the repo."""
    if not model or Path(model).exists():
        return None
    repo = model.rsplit("+", 1)[-1].partition("@")[0]
    return repo if HUB_ID.fullmatch(repo) and not Path(repo).exists() else None


def card_data(info: dict):
    """The card's metadata as huggingface_hub models it (`ModelCardData`): the parents on the hub as `base_model`
    of a `merge`, or the child as that of a `quantized` release; the held-out scores as the `model-index`."""
    from huggingface_hub import EvalResult, ModelCardData

    quantized = info.get("relation") == "quantized"
    candidates = [info.get("child_of")] if quantized else [info.get("father"), info.get("mother")]
    bases = [repo for repo in map(_hub_repo, candidates) if repo]
    schemes = [q.get("scheme") for q in info.get("quantization") or []]
    tags = ["merge", "darwin", "evolutionary-merge", info.get("method"), *(["nvfp4", *schemes] if schemes else [])]
    heldout = info.get("heldout") or {}
    metrics = heldout.get("metrics") or {}
    results = [EvalResult(task_type=MODEL_INDEX_TASKS.get(metrics[task]["output_type"], "text-generation"),
                          dataset_type=task, dataset_name=task, dataset_split=heldout.get("split"),
                          metric_type=metrics[task]["metric"], metric_value=round(value, 4))
               for task, value in ((heldout.get("scores") or {}).get("child") or {}).items() if task in metrics]
    return ModelCardData(license=info.get("license", "apache-2.0"), library_name="transformers",
                         base_model=bases or None, base_model_relation=("quantized" if quantized else "merge")
                         if bases else None, tags=list(dict.fromkeys(t for t in tags if t)),
                         model_name=info.get("name", "Darwin child"), eval_results=results or None)


def _front_matter(info: dict) -> str:
    return "---\n" + card_data(info).to_yaml() + "\n---"


def _lineage(info: dict) -> str:
    father, mother = info.get("father", "father"), info.get("mother", "mother")
    lines = ["## Lineage", "", "```"]
    if info.get("base"):
        lines += [f"{info['base']}  (shared base)", "    │", "    ▼"]
    lines += [f"{father}  (father)", "    │", "    ▼", f"{mother}  (mother)", "    │",
              f"    │   {info.get('method', 'evolutionary merge')}", "    ▼", f"{info.get('name', 'child')}  (child)"]
    for q in info.get("quantization") or []:
        lines += ["    │", "    ▼",
                  f"{info.get('name', 'child')}-{q.get('scheme')}  ({q.get('scheme')}, at {q.get('path')})"]
    return "\n".join(lines + ["```"])


def _method(info: dict) -> str:
    method = info.get("method", "an evolutionary merge")
    intro = (f"## Method\n\nMerged with **{method}**: each tensor's mix of father and mother follows the genome "
             "below (CMA-ES searched it, scored on the fitness tasks), guided by the parents' MRI profiles.")
    paragraphs = [intro]
    if info.get("architecture"):
        paragraphs.append(f"Architecture: `{info['architecture']}`.")
    evo = info.get("evolution") or {}
    parts = [f"{evo[k]} {label}" for k, label in (("genomes", "genomes evaluated"), ("phase1", "in Phase 1"),
                                                   ("phase2", "in Phase 2")) if evo.get(k) is not None]
    if evo.get("best_fitness") is not None:
        parts.append(f"best fitness {_number(evo['best_fitness'])}")
    if parts:
        paragraphs.append("Evolution: " + ", ".join(parts) + ".")
    if (info.get("health") or {}).get("verdict") is not None:
        paragraphs.append("Health check (child against both parents, layer by layer): "
                          f"**{info['health']['verdict']}**.")
    return "\n\n".join(paragraphs)


def _genome(info: dict) -> str:
    rows = [[gene, value] for gene, value in info["genome"].items()]
    out = "## Genome\n\n" + _table(["gene", "value"], rows)
    if info.get("genome_hash"):
        out += f"\n\ngenome_hash: `{info['genome_hash']}`"
    if info.get("father") and info.get("mother") and info.get("method"):
        base = f" --base {info['base']}" if info.get("base") else ""
        out += ("\n\nThe child, byte for byte, from its parents (the genome alone fixes every mask):\n\n```bash\n"
                f"echo '{json.dumps(info['genome'])}' > genome.json\n"
                f"darwin merge --father {info['father']} --mother {info['mother']}{base} --genome genome.json "
                f"--method {info['method']} --out child\n```")
    return out


def _scores(info: dict) -> str:
    heldout = info["heldout"]
    scores, fitness, p_values = heldout.get("scores") or {}, heldout.get("fitness") or {}, heldout.get("p_values") or {}
    tasks = list(dict.fromkeys(task for role in ROLES for task in (scores.get(role) or {})))
    rows = [[task, *[(scores.get(role) or {}).get(task) for role in ROLES]] for task in tasks]
    if fitness:
        rows.append(["**fitness**", *[fitness.get(role) for role in ROLES]])
    out = (f"## Held-out scores\n\nOn the `{heldout.get('split')}` split ({heldout.get('questions')} questions), which "
           "the search never scored (it tuned on another split).\n\n" + _table(["task", *ROLES], rows))
    if p_values:
        out += "\n\nPaired McNemar test of the child against each parent: " + ", ".join(
            f"p = {_number(p)} vs {role}" for role, p in p_values.items()) + "."
    return out


def _quantization(info: dict) -> str:
    rows = [[q.get("scheme"), f"`{q.get('path', '')}`", q.get("quantized"), q.get("kept"),
             _size(q.get("size_before")), _size(q.get("size_after")), q.get("max_abs_error"),
             q.get("mean_abs_error"), q.get("rel_fro_error")] for q in info["quantization"]]
    legend = "\n".join(f"- `{name}`: {scheme.card}" for name, scheme in SCHEMES.items()
                       if any(q.get("scheme") == name for q in info["quantization"]))
    if any(q.get("per_expert") for q in info["quantization"]):
        legend += "\n\n" + PER_EXPERT
    return ("## Quantization\n\nNVFP4: E2M1 values, an FP8 E4M3 scale per 16 weights, an FP32 global scale. "
            "Roundtrip errors are measured on the written files, dequantized, against the BF16 weights.\n\n"
            + _table(["scheme", "path", "tensors quantized", "kept BF16", "size before", "size after",
                      "max abs error", "mean abs error", "rel. Frobenius error"], rows) + "\n\n" + legend)


def _usage(info: dict) -> str:
    local = "./" + info.get("name", "release").split("/")[-1]

    def inside(rel: str | None) -> str:
        return local if rel in (None, "", ".") else f"{local}/{rel}"

    quantized = info.get("quantization") or []
    # A release of a quantized model alone has no BF16 child to serve: its child_path is the quantization's own.
    alone = info.get("child_path") in {q.get("path") for q in quantized}
    child = inside(info.get("child_path")) if ("child_path" in info and not alone) or not quantized else None
    serve = [f"vllm serve {child}   # BF16"] if child else []
    for q in quantized:
        flag = SCHEMES[q["scheme"]].vllm_flag if q.get("scheme") in SCHEMES else ""
        serve.append(f"vllm serve {inside(q.get('path'))}" + (f" {flag}" if flag else "") + f"   # {q.get('scheme')}")
    out = ["## Usage"]
    if info.get("location"):
        out.append(f"Download the release first (any S3 client or fsspec):\n\n```bash\n"
                   f"aws s3 cp --recursive {info['location']} {local}   # or: s3fs / fsspec / cp -r\n```")
    out.append("vLLM (`--quantization modelopt_fp4` for mfp4; compressed-tensors nvfp4a16 loads automatically):\n\n"
               "```bash\n" + "\n".join(serve) + "\n```")
    # transformers 5.23 dequantizes NVFP4 experts without their global scale (its CompressedTensorsDequantize
    # passes weight_packed and weight_scale only) and loads wrong weights without a warning
    loads = [q for q in quantized if q.get("scheme") in SCHEMES and SCHEMES[q["scheme"]].transformers_loads]
    loadable = child or next((inside(q.get("path")) for q in loads if not q.get("experts")), None)
    for scheme in dict.fromkeys(q["scheme"] for q in loads if q.get("experts")):
        out.append(f"The {scheme} experts are for vLLM: transformers (5.23) loads NVFP4 experts without their global "
                   "scale, so its expert weights would be wrong.")
    if loadable:
        out.append("transformers (the BF16 child, or nvfp4a16 with compressed-tensors installed):\n\n```python\n"
                   "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   f'model = AutoModelForCausalLM.from_pretrained("{loadable}", dtype="auto")\n'
                   f'tokenizer = AutoTokenizer.from_pretrained("{loadable}")\n```')
    return "\n\n".join(out)


def model_card(run_info: dict) -> str:
    """README.md text for a release; sections whose keys are missing from `run_info` are left out."""
    info = {k: v for k, v in run_info.items() if v not in (None, {}, [])}
    name = info.get("name", "Darwin child")
    parents = " and ".join(f"**{info[r]}** ({r})" for r in ("father", "mother") if info.get(r))
    intro = f"# {name}\n\nAn evolutionary merge" + (f" of {parents}" if parents else "") + \
        ", bred by darwin: MRI of both parents, CMA-ES over merge genomes, MRI-guided merge, health check."
    sections = [_front_matter(info), intro, _lineage(info), _method(info)]
    if info.get("genome"):
        sections.append(_genome(info))
    if info.get("heldout"):
        sections.append(_scores(info))
    if info.get("quantization"):
        sections.append(_quantization(info))
    sections.append(_usage(info))
    if info.get("files"):
        sections.append("## Files\n\n" + "\n".join(f"- `{f}`" for f in info["files"]) +
                        "\n\n`manifest.json` lists every file with its size and sha256; it is written last.")
    return "\n\n".join(sections) + "\n"


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _hub_id(path: str | None) -> str | None:
    """An HF cache snapshot path (`.../models--org--name/snapshots/<rev>`) back to `org/name`."""
    if not path:
        return path
    for part in Path(path).parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return path


def _roundtrip(report: dict, path: str) -> dict:
    """One quantization row from the `overall` block of a roundtrip.json (darwin.quantize.roundtrip)."""
    overall = report.get("overall") or {}
    return {"scheme": report.get("scheme"), "path": path, "quantized": overall.get("quantized_tensors"),
            "kept": overall.get("kept_tensors"), "size_before": overall.get("bytes_before"),
            "size_after": overall.get("bytes_after"), "max_abs_error": overall.get("max_abs_error"),
            "mean_abs_error": overall.get("mean_abs_error"), "rel_fro_error": overall.get("relative_frobenius"),
            "experts": sum(row.get("kind") == "expert" for row in report.get("tensors") or []),
            "per_expert": sum("slice_of" in row for row in report.get("tensors") or [])}


def _inside(path: Path, release: Path) -> str | None:
    """`path` relative to the published directory, or None when it is not part of the release."""
    try:
        return path.resolve().relative_to(release.resolve()).as_posix()
    except ValueError:
        return None


def run_info_from_dir(path: str | Path, release: str | Path | None = None) -> dict:
    """The card's input from what a run (or a model) directory holds; absent files leave their keys out.

    `release` is the directory actually published when it is not `path` itself (e.g. `RUN/quantized/mfp4` with the
    card from RUN): paths in the card are then relative to it, and what lies outside it is left out.
    """
    root = Path(path)
    release = Path(release) if release is not None else root
    is_run = (root / "best").is_dir()
    child = root / "best" if is_run else root
    summary = _load_json(root / "summary.json")
    merge = _load_json(child / REPORT_NAME)
    config = (yaml.safe_load((root / "config.yaml").read_text()) or {}) if (root / "config.yaml").is_file() else {}
    parents = merge.get("parents") or {}
    architectures = _load_json(child / "config.json").get("architectures") or [None]
    info = {
        "name": root.resolve().name,
        # a quantized model published alone is a quantization of the child, not a merge of the parents
        "relation": "quantized" if not is_run and _load_json(root / "config.json").get("quantization_config")
        else "merge",
        "child_of": _load_json(root / "roundtrip.json").get("source"),
        "father": config.get("father") or _hub_id(parents.get("father")),
        "mother": config.get("mother") or _hub_id(parents.get("mother")),
        "base": config.get("base") or _hub_id(parents.get("base")),
        "method": config.get("method") or merge.get("method"),
        "architecture": architectures[0],
        "genome": summary.get("genome") or merge.get("genome"),
        "genome_hash": summary.get("genome_hash") or merge.get("genome_hash"),
        "heldout": summary.get("heldout"),
        "child_path": _inside(child, release),
        "quantization": [_roundtrip(_load_json(p), _inside(p.parent, release))
                         for p in sorted(root.rglob("roundtrip.json")) if _inside(p.parent, release) is not None],
        "files": [rel + ("/" if (root / name).is_dir() else "") for name in REPORTS
                  if (root / name).exists() and (rel := _inside(root / name, release)) is not None],
    }
    if (root / "history.parquet").is_file():
        import pandas as pd

        history = pd.read_parquet(root / "history.parquet")
        phases = history["phase"].value_counts().to_dict() if "phase" in history else {}
        info["evolution"] = {"genomes": len(history), "phase1": phases.get(1), "phase2": phases.get(2),
                             "best_fitness": float(history["fitness"].max()) if "fitness" in history else None}
    health = next((_load_json(p) for p in sorted((root / "health").glob("*.json"))
                   if "verdict" in _load_json(p)), {}) if (root / "health").is_dir() else {}
    if health:
        info["health"] = {"verdict": health["verdict"]}
    return {k: v for k, v in info.items() if v not in (None, {}, [])}
