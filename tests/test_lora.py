"""A PEFT LoRA adapter as a parent (mergekit's `model+lora`): read tensor by tensor, it holds the bytes of peft's own
merge_and_unload, so merging or evolving with it gives what the merged model gives."""

import json
import shutil

import pandas as pd
import pico
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.genome import Genome
from darwin.merge import merge_to_dir, plan_merge

V5 = {"global_ratio": 0.5, "attn_ratio": 0.45, "ffn_ratio": 0.55, "embed_ratio": 0.5, "density_a": 0.9,
      "density_b": 0.9}


def make_adapter(base, out, **options):
    """An adapter as peft saves it after training: A and B nonzero (B scaled to a fine-tune's size), float32 under
    a bf16 model, `base_model_name_or_path` naming the base."""
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    config = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **options})
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base, adapter, out):
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    shutil.copy(base / "tokenizer.json", out)
    shutil.copy(base / "tokenizer_config.json", out)
    return out


def bits(tensor):
    return tensor.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def adapter(pico_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = pico_family["base"]
    path = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        modules_to_save=["lm_head"], rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16})
    return {"adapter": path, "merged": peft_merged(base, path, root / "merged")}


def test_an_adapter_parent_reads_as_peft_merges_it(pico_family, adapter):
    merged = Checkpoint(adapter["merged"])
    for spec in (f"{pico_family['base']}+{adapter['adapter']}", str(adapter["adapter"])):  # named, or from its config
        parent = Checkpoint(spec)
        assert parent.path == pico_family["base"] and parent.adapter.path == adapter["adapter"]
        assert set(parent.tensors) == set(merged.tensors)
        # the linear, embedding and whole-module (lm_head) kinds were all read from the adapter
        assert "model.layers.1.self_attn.q_proj.weight" in parent.adapter.deltas
        assert "model.embed_tokens.weight" in parent.adapter.deltas and "lm_head.weight" in parent.adapter.replaced
        for name in merged.tensors:
            assert torch.equal(bits(parent.read(name)), bits(merged.read(name))), name
        assert parent.fingerprint() != Checkpoint(pico_family["base"]).fingerprint()


@pytest.mark.parametrize("method", ["darwin-v5", "dare-ties"])
def test_merging_base_plus_adapter_equals_merging_peft_merged_model(pico_family, adapter, tmp_path, method):
    father, genome = Checkpoint(pico_family["father"]), Genome.from_dict(V5)
    base = Checkpoint(pico_family["base"]) if method == "dare-ties" else None
    children = {}
    for label, mother in (("adapter", f"{pico_family['base']}+{adapter['adapter']}"), ("merged", adapter["merged"])):
        plan = plan_merge(father, Checkpoint(mother), genome, method, base=base)
        children[label] = Checkpoint(merge_to_dir(plan, tmp_path / label))
    assert set(children["adapter"].tensors) == set(children["merged"].tensors)
    for name in children["merged"].tensors:
        assert torch.equal(bits(children["adapter"].read(name)), bits(children["merged"].read(name))), name
    report = json.loads((tmp_path / "adapter" / "merge_report.json").read_text())
    assert report["parents"]["mother"] == f"{pico_family['base']}+{adapter['adapter']}"


def test_an_adapter_of_a_release_reaches_the_names_the_release_stores(tmp_path):
    """peft names the modules of the text model transformers builds (`model.layers.*`); the release stores
    `model.language_model.layers.*`: transformers' own conversion rules map one onto the other."""
    release = pico.official_release(tmp_path / "release")
    path = make_adapter(release, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    parent = Checkpoint(f"{release}+{path}")
    merged = tf.AutoModelForCausalLM.from_pretrained(release, dtype="auto")
    state = PeftModel.from_pretrained(merged, path).merge_and_unload().state_dict()
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    # down_proj of the 4 layers, q_proj of the 2 full-attention ones
    assert name in parent.adapter.deltas and len(parent.adapter.deltas) == 4 + 2
    for name in parent.adapter.deltas:
        assert torch.equal(bits(parent.read(name)), bits(state[name.replace("language_model.", "")]))
    assert torch.equal(bits(parent.read("mtp.fc.weight")), bits(Checkpoint(release).read("mtp.fc.weight")))


def test_adapters_darwin_cannot_read_are_refused_in_one_line(pico_family, pico_checkpoint, tmp_path):
    base = pico_family["base"]
    dora = make_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    foreign = make_adapter(pico_checkpoint("llama"), tmp_path / "llama", target_modules=["o_proj"])  # in every layer
    nameless = tmp_path / "nameless"
    shutil.copytree(dora, nameless)
    config = json.loads((nameless / "adapter_config.json").read_text())
    (nameless / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    cases = {f"{base}+{dora}": "DoRA", f"{base}+{foreign}": "does not hold",
             f"{base}+{pico_family['mother']}": "holds no adapter_config.json", str(nameless): "names no base model",
             f"{base}+{tmp_path / 'missing'}": "does not exist"}
    for spec, message in cases.items():
        with pytest.raises(DarwinError, match=message) as error:
            Checkpoint(spec)
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_evolving_with_an_adapter_mother_equals_evolving_with_peft_merged_mother(prefect_api, pico_family, adapter,
                                                                                 tmp_path):
    from darwin.config import parse_config
    from flows import evolve

    runs = {}
    for label, mother in (("adapter", str(adapter["adapter"])), ("merged", str(adapter["merged"]))):
        config = parse_config({
            "father": str(pico_family["father"]), "mother": mother, "base": str(pico_family["base"]),
            "method": "dare-ties", "genome": "v6", "blocks": 2, "seed": 5, "phase1": {"steps": 2, "popsize": 4},
            "runner": {"workers": 1},
            "phase2": {"steps": 1, "popsize": 3, "tasks": [str(pico_family["task"])], "device": "cpu"}})
        summary = evolve.run_evolution(config, tmp_path / label, cache_dir=str(tmp_path / f"cache-{label}"))
        runs[label] = (summary, pd.read_parquet(tmp_path / label / "history.parquet"))
    (adapter_summary, adapter_history), (merged_summary, merged_history) = runs["adapter"], runs["merged"]
    assert not adapter_history["failed"].any() and (adapter_history["phase"] == 2).sum() == 3
    assert adapter_history["fitness"].tolist() == merged_history["fitness"].tolist()
    assert adapter_summary["best"]["genome_hash"] == merged_summary["best"]["genome_hash"]
    assert adapter_summary["heldout"] == merged_summary["heldout"]
    child, reference = Checkpoint(adapter_summary["best_dir"]), Checkpoint(merged_summary["best_dir"])
    for name in reference.tensors:
        assert torch.equal(bits(child.read(name)), bits(reference.read(name))), name
