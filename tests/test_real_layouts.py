"""An official Qwen3.5 release (written straight with safetensors in the hub's layout) with a fine-tune of it saved by
transformers, the pair users really have: the pairing rules (README's "Merging a release with its fine-tune") in the merge, and Phase 2
in memory on that layout."""

import json
import shutil

import numpy as np
import pandas as pd
import pico
import pytest
import torch
import transformers as tf

from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.genome import Genome
from darwin.merge import merge_into_model, merge_to_dir, plan_merge

V5 = {"global_ratio": 0.5, "attn_ratio": 0.45, "ffn_ratio": 0.55, "embed_ratio": 0.5, "density_a": 0.9,
      "density_b": 0.9}
V6 = {**V5, "block_0": 0.5, "block_1": 0.55, "mri_trust": 0.3, "merge_method_weight": 0.8}


@pytest.fixture(scope="module")
def release_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    release = pico.official_release(root / "release")
    return {"release": release,
            "text": pico.fine_tune_of(release, root / "fine-tune-text", seed=1),
            "vl": pico.fine_tune_of(release, root / "fine-tune-vl", seed=2,
                                    wrapper=tf.Qwen3_5ForConditionalGeneration)}


@pytest.mark.parametrize("wrapper", ["text", "vl"])
@pytest.mark.parametrize("method", ["darwin-v5", "darwin-v6", "dare-ties"])
def test_a_release_merges_with_its_transformers_saved_fine_tune(release_pair, tmp_path, wrapper, method):
    father, mother = Checkpoint(release_pair["release"]), Checkpoint(release_pair[wrapper])
    genome = Genome.from_dict(V5 if method == "darwin-v5" else V6)
    base = father if method == "dare-ties" else None
    child = Checkpoint(merge_to_dir(plan_merge(father, mother, genome, method, base=base), tmp_path / "child"))
    # every tensor of the father, in his dtype (float32 A_log and norms stay float32)
    assert {n: i.dtype for n, i in child.tensors.items()} == {n: i.dtype for n, i in father.tensors.items()}
    assert child.config == father.config
    assert not (child.path / "README.md").exists()  # the release's card describes the release, not this child
    report = json.loads((child.path / "merge_report.json").read_text())["tensors"]
    only_father = sorted(n for n in father.tensors if n not in mother.tensors)
    assert only_father and all(n.startswith(("mtp.", "model.visual.")) for n in only_father)
    assert any(n.startswith("mtp.") for n in only_father)
    assert (wrapper == "text") == any(n.startswith("model.visual.") for n in only_father)
    for name in only_father:  # carried byte for byte, and reported
        assert report[name]["carried"] == "father"
        assert np.array_equal(child.read_array(name), father.read_array(name))
    shared = [n for n in father.tensors if n in mother.tensors]
    dtype_only = [n for n in shared if father.tensors[n].dtype != mother.tensors[n].dtype]
    assert dtype_only and all("linear_attn" in n for n in dtype_only)
    merged = [n for n in shared if not report[n].get("transplant")
              and not np.array_equal(child.read_array(n), father.read_array(n))
              and not np.array_equal(child.read_array(n), mother.read_array(n))]
    assert len(merged) > len(shared) // 2
    if method != "dare-ties":  # dare-ties on base = father adds the mother's delta: dtype-only tensors move too
        assert any(n in merged for n in dtype_only)
    # the child loads with the father's architecture class and generates
    model = getattr(tf, father.config["architectures"][0]).from_pretrained(child.path)
    tokens = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)


def test_strict_refuses_every_difference_and_a_quantized_parent_is_refused(release_pair, tmp_path):
    father, mother = Checkpoint(release_pair["release"]), Checkpoint(release_pair["text"])
    with pytest.raises(DarwinError) as error:
        plan_merge(father, mother, Genome.from_dict(V5), "darwin-v5", strict=True)
    message = str(error.value)
    assert "architectures" in message and "only in father" in message and "\n" not in message
    quantized = tmp_path / "quantized"
    shutil.copytree(release_pair["text"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(DarwinError, match="quantized"):
        plan_merge(father, Checkpoint(quantized), Genome.from_dict(V5), "darwin-v5")
    assert not (tmp_path / "child").exists()


def test_phase2_merges_into_the_text_model_transformers_builds_from_a_release(release_pair):
    father, mother = Checkpoint(release_pair["release"]), Checkpoint(release_pair["text"])
    model = tf.AutoModelForCausalLM.from_pretrained(father.path, dtype=torch.bfloat16)
    assert type(model).__name__ == "Qwen3_5ForCausalLM" and "model.embed_tokens.weight" in model.state_dict()
    plan = plan_merge(father, mother, Genome.from_dict(V6), "darwin-v6")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = merge_into_model(plan, model)
    assert rows and not any(name.startswith(("mtp.", "model.visual.")) for name in rows)
    on_disk = merge_to_dir(plan, release_pair["release"].parent / "phase2-reference")
    child = tf.AutoModelForCausalLM.from_pretrained(on_disk, dtype=torch.bfloat16).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    for key, value in model.state_dict().items():  # what Phase 2 scores is the child written to disk
        assert torch.equal(value, child[key].to(value.dtype)), key


def evolve_pair(father, mother, task, run_dir):
    """(summary, history) of `darwin evolve` darwin-v6 (probes) on a pair, Phase 2 2 x 3 on a local task."""
    from darwin.config import parse_config
    from flows import evolve

    config = parse_config({
        "father": str(father), "mother": str(mother), "method": "darwin-v6", "genome": "v6", "blocks": 2, "seed": 1,
        "phase1": {"steps": 2, "popsize": 4}, "runner": {"workers": 1},
        "phase2": {"steps": 2, "popsize": 3, "tasks": [str(task)], "device": "cpu"}})
    summary = evolve.run_evolution(config, run_dir / "run", cache_dir=str(run_dir / "cache"))
    return summary, pd.read_parquet(run_dir / "run" / "history.parquet")


@pytest.mark.slow
def test_evolution_on_a_release_and_its_fine_tune(prefect_api, release_pair, pico_family, tmp_path):
    summary, history = evolve_pair(release_pair["release"], release_pair["text"], pico_family["task"], tmp_path)
    assert (history["phase"] == 2).sum() == 6 and not history["failed"].any()
    assert (tmp_path / "run" / "probes" / "father" / "probes.parquet").exists()
    best = Checkpoint(summary["best_dir"])
    assert set(best.tensors) == set(Checkpoint(release_pair["release"]).tensors)
    assert summary["health"] == "pass"
    assert summary["heldout"]["questions"] == 12


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    release = pico.gemma4_release(root / "release")
    return {"release": release, "fine_tune": pico.fine_tune_of(release, root / "fine-tune", seed=1)}


@pytest.mark.parametrize("method", ["darwin-v5", "darwin-v6", "dare-ties"])
def test_a_gemma4_release_merges_with_its_fine_tune(gemma_pair, tmp_path, method):
    """The release's k/v of its kv-shared layers, which transformers neither builds nor saves, are carried."""
    father, mother = Checkpoint(gemma_pair["release"]), Checkpoint(gemma_pair["fine_tune"])
    genome = Genome.from_dict(V5 if method == "darwin-v5" else V6)
    base = father if method == "dare-ties" else None
    child = Checkpoint(merge_to_dir(plan_merge(father, mother, genome, method, base=base), tmp_path / "child"))
    assert {n: i.dtype for n, i in child.tensors.items()} == {n: i.dtype for n, i in father.tensors.items()}
    report = json.loads((child.path / "merge_report.json").read_text())["tensors"]
    only_father = sorted(n for n in father.tensors if n not in mother.tensors)
    assert only_father == [f"model.layers.{layer}.self_attn.{part}.weight" for layer in (2, 3)
                           for part in ("k_norm", "k_proj", "v_proj")]
    for name in only_father:
        assert report[name]["carried"] == "father"
        assert np.array_equal(child.read_array(name), father.read_array(name))
    shared = [n for n in father.tensors if n in mother.tensors]
    merged = [n for n in shared if not np.array_equal(child.read_array(n), father.read_array(n))
              and not np.array_equal(child.read_array(n), mother.read_array(n))]
    assert len(merged) > len(shared) // 2
    model = tf.Gemma4ForCausalLM.from_pretrained(child.path)
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.slow
def test_evolution_on_a_gemma4_release_and_its_fine_tune(prefect_api, gemma_pair, pico_family, tmp_path):
    summary, history = evolve_pair(gemma_pair["release"], gemma_pair["fine_tune"], pico_family["task"], tmp_path)
    assert (history["phase"] == 2).sum() == 6 and not history["failed"].any()
    assert history.query("phase == 2")["fitness"].nunique() > 1  # the genomes differ in what the model computes
    best = Checkpoint(summary["best_dir"])
    assert set(best.tensors) == set(Checkpoint(gemma_pair["release"]).tensors)
    assert summary["health"] == "pass"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nvfp4a16", "mfp4"])
def test_release_formats_keep_what_they_do_not_quantize_as_the_release_holds_it(release_pair, tmp_path, scheme):
    from darwin.quantize import quantize

    release = Checkpoint(release_pair["release"])
    out = Checkpoint(quantize(release.path, scheme, tmp_path / scheme, device="cpu"))
    report = json.loads((out.path / "roundtrip.json").read_text())
    assert report["kept_identical"] and report["kept"]
    float32 = [n for n, info in release.tensors.items() if info.dtype == "F32"]
    assert float32 and all(n in report["kept"] and out.tensors[n].dtype == "F32" for n in float32)
    for name in report["kept"]:
        assert np.array_equal(out.read_array(name), release.read_array(name)), name
