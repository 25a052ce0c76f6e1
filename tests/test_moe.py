"""MoE routing stats on pico MoE models: frequencies, entropy, and exactly the experts a rigged router starves."""

import json
import math

import numpy as np
import pandas as pd
import pico
import picotok
import pytest
import torch

from darwin import moe, probes
from darwin.experts import in_layout_of

DEAD = {0: {3}, 1: {1, 2}, 2: set(), 3: {0}}
TEXTS = ["The capital of France is Paris.", "def add(a, b): return a + b", "What is 17 times 23?",
         "Translate into French: the cat sleeps.", "If all A are B and all B are C, are all A C?"]


def rigged_moe(dead: dict[int, set[int]], family: str = "qwen3_moe"):
    """A pico MoE (Qwen3-MoE; Qwen3.5-MoE with its linear attention and shared expert, text or vision-language; Gemma 4
    MoE) whose routers never pick
    the `dead` experts. Residual channel 0 is held at a constant positive value (set in every embedding, and no
    attention, expert or shared expert writes to it; in Gemma 4, whose every write passes a post-norm, their weight
    is 0 there), so after the RMSNorm it is positive for every token; a router row with -4 there loses to every row
    with +4, whatever the other (random, small) channels say."""
    model = pico.build(family, dtype=torch.float32)
    text = getattr(model.model, "language_model", model.model)  # a vision-language model's text model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text.embed_tokens.weight[:, 0] = 0.1 if hasattr(text.layers[0], "router") else 8.0
        for index, layer in enumerate(text.layers):
            if hasattr(layer, "router"):  # Gemma 4: every write to the residual passes a post-norm with a weight
                for norm in ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm"):
                    getattr(layer, norm).weight[0] = 0
                # the router's own input scale lifts channel 0 there alone: the dead rows lose by a wide margin
                # while the other channels, at full size, spread the tokens over the live experts
                layer.router.scale[0] = 50.0
                router = layer.router.proj.weight
                router.copy_(torch.randn(router.shape, generator=g))
                for expert in range(router.shape[0]):
                    router[expert, 0] = -4.0 if expert in dead[index] else 4.0
                continue
            attention = getattr(layer, "self_attn", None)
            (attention.o_proj if attention is not None else layer.linear_attn.out_proj).weight[0] = 0
            layer.mlp.experts.down_proj[:, 0] = 0
            if hasattr(layer.mlp, "shared_expert"):
                layer.mlp.shared_expert.down_proj.weight[0] = 0
            router = layer.mlp.gate.weight
            router.copy_(torch.randn(router.shape, generator=g) * 0.1)
            for expert in range(router.shape[0]):
                router[expert, 0] = -4.0 if expert in dead[index] else 4.0
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return picotok.build()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe_text", "gemma4_moe_text"])
def test_a_router_that_never_selects_some_experts_reports_exactly_those_dead(tokenizer, family):
    frame = moe.routing_stats(rigged_moe(DEAD, family), tokenizer, TEXTS, batch_size=2)
    assert moe.dead_expert_map(frame) == DEAD
    dead_rows = frame[frame["dead"]]
    assert (dead_rows["frequency"] == 0).all()
    assert (frame.loc[~frame["dead"], "frequency"] >= 0.025).all()
    assert "0.05 * top_k / num_experts" in frame.attrs["dead_rule"]


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe_text", "gemma4_moe_text"])
def test_frequencies_count_top_k_selections_of_real_tokens(family, tokenizer):
    model = pico.build(family)
    with torch.no_grad():  # pico Qwen3-MoE routers start at zero; give them all something to route with
        for router, _ in moe.routers(model).values():
            for weight in (p for p in router.parameters() if p.ndim == 2):
                weight.normal_(0, 0.5)
    frame = moe.routing_stats(model, tokenizer, TEXTS, batch_size=2)
    real_tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
    assert frame.attrs["tokens"] == real_tokens
    assert frame.attrs["top_k"] == 2
    assert sorted(frame["layer"].unique()) == [0, 1, 2, 3]
    sums = frame.groupby("layer")["frequency"].sum()
    assert sums.to_numpy() == pytest.approx([2.0] * 4)
    entropy = frame.groupby("layer")["entropy"].agg(["min", "max"])
    assert (entropy["min"] == entropy["max"]).all()
    assert ((entropy["min"] > 0) & (entropy["min"] < math.log2(4))).all()


def test_uniform_router_has_maximal_entropy(tokenizer):
    """All-zero router weights give a uniform softmax: exactly log2(E) bits."""
    model = pico.build("qwen3_5_moe_text")
    with torch.no_grad():
        for layer in probes.decoder_layers(model):
            layer.mlp.gate.weight.zero_()
    frame = moe.routing_stats(model, tokenizer, TEXTS)
    assert frame["entropy"].to_numpy() == pytest.approx([2.0] * len(frame))


def test_dense_model_has_no_routers(pico_checkpoint):
    assert moe.routers(pico.build("llama")) == {}
    assert not moe.checkpoint_has_experts(pico_checkpoint("llama"))
    assert moe.checkpoint_has_experts(pico_checkpoint("qwen3_5_moe_text"))


def test_routing_files_keep_the_rule(tmp_path, tokenizer):
    frame = moe.routing_stats(rigged_moe(DEAD), tokenizer, TEXTS)
    path = moe.write_routing(frame, tmp_path)
    again = moe.read_routing(path)
    pd.testing.assert_frame_equal(again, frame)
    assert again.attrs["dead_rule"] == frame.attrs["dead_rule"]
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert [row["dead_experts"] for row in moe.routing_table(frame)] == ["3", "1 2", "", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe_text", "qwen3_5_moe", "gemma4_moe_text"])
def test_evolution_takes_a_dead_expert_from_the_live_parent(prefect_api, pico_family, tmp_path, family):
    """A MoE pair as transformers saves it, per expert (Qwen3-MoE) or fused 3-D (Qwen3.5-MoE), whose mother's router
    never picks expert 2 of layer 1: darwin-v5's run profiles the routing, Phase 2 scores every genome in memory
    (experts fused in the model) and the best child's expert 2 of layer 1 is the father's, byte for byte (in a fused
    tensor, its slice), while the live experts are merged. A Qwen3.5-MoE saved fresh by transformers comes out per
    expert: the fused pair is the hub's layout, the father written straight with safetensors and the mother loaded
    from that layout and saved by transformers, which keeps it. "qwen3_5_moe" is the vision-language release
    (Qwen3.5-35B-A3B's layout: `model.language_model.*`, a vision tower, an MTP layer with per-expert experts,
    float32 A_log and norms) against its fine-tune saved through AutoModelForCausalLM (text model only, bf16):
    transformers saves that fine-tune per expert, so the pair's expert layouts differ and merge expert by expert;
    the child keeps the release's layout, vision tower and MTP byte for byte. Gemma 4 MoE stores its experts
    fused beside the dense MLP (`layers.N.experts.*`, router `layers.N.router.*`)."""
    from darwin.checkpoint import Checkpoint
    from darwin.config import parse_config
    from flows import evolve

    import transformers as tf

    fused, release = family != "qwen3_moe", family == "qwen3_5_moe"
    layers = "model.language_model.layers" if release else "model.layers"
    experts_of = "experts" if family.startswith("gemma4") else "mlp.experts"  # inside a decoder layer
    paths = {}
    for role, dead, seed in (("father", {}, None), ("mother", {1: {2}}, 3)):
        model = rigged_moe({layer: dead.get(layer, set()) for layer in range(4)}, family)
        if seed is not None:
            pico.perturbed(model, seed, scale=0.01)
        if fused:
            tensors = {name: tensor.to(torch.float32 if release and pico.FLOAT32_IN_RELEASES.search(name)
                                       else torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()
                       if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}  # stored once
            if release:
                tensors.update(pico.mtp_tensors(seed=seed or 0, experts=4))
            paths[role] = pico.write_release(tmp_path / role, tensors, model.config, shards=2)
            if role == "mother":
                tf.AutoModelForCausalLM.from_pretrained(paths[role], dtype=torch.bfloat16).save_pretrained(
                    tmp_path / "mother-saved", max_shard_size="200KB")
                paths[role] = tmp_path / "mother-saved"
        else:
            paths[role] = pico.save(model.to(torch.bfloat16), tmp_path / role)
        picotok.save_beside(paths[role])
    for role in paths:  # the layout on disk: a release's fine-tune saved through the text class comes out per expert
        per_expert = not fused or (release and role == "mother")
        assert per_expert == any(".experts.0." in name and not name.startswith("mtp.")
                                 for name in Checkpoint(paths[role]).tensors), role
    config = parse_config({
        "father": str(paths["father"]), "mother": str(paths["mother"]), "method": "darwin-v5", "seed": 0,
        "phase1": {"steps": 2, "popsize": 4}, "runner": {"workers": 1}, "heldout": {"split": None},
        "phase2": {"steps": 1, "popsize": 3, "tasks": [str(pico_family["task"])], "device": "cpu"}})
    summary = evolve.run_evolution(config, tmp_path / "run", cache_dir=str(tmp_path / "cache"))
    history = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert (history["phase"] == 2).sum() == 3 and not history["failed"].any()
    dead = {role: moe.dead_expert_map(moe.read_routing(tmp_path / "run" / "probes" / role / "routing.parquet"))
            for role in ("father", "mother")}
    assert 2 in dead["mother"][1] and 2 not in dead["father"][1]
    expected = {str(layer): {str(e): "mother" if e in dead["father"][layer] else "father"
                             for e in dead["father"][layer] ^ dead["mother"][layer]}
                for layer in dead["father"] if dead["father"][layer] ^ dead["mother"][layer]}
    report = json.loads((tmp_path / "run" / "best" / "merge_report.json").read_text())
    assert report["dead_experts_from"] == expected and expected["1"]["2"] == "father"
    assert report["experts_relaid"] == (["mother"] if release else [])
    child = Checkpoint(summary["best_dir"])
    father = Checkpoint(paths["father"])
    parents = {"father": father, "mother": in_layout_of(Checkpoint(paths["mother"]), father)}
    for layer, experts in expected.items():
        for expert, donor in experts.items():
            if fused:
                for name in (f"{layers}.{layer}.{experts_of}.{part}" for part in ("gate_up_proj", "down_proj")):
                    piece = child.read_array(name)
                    assert np.array_equal(piece[int(expert)], parents[donor].read_array(name)[int(expert)]), name
                    live = [e for e in range(piece.shape[0]) if str(e) not in experts]
                    assert not np.array_equal(piece[live], parents["father"].read_array(name)[live])  # merged
                continue
            names = [n for n in child.tensors if n.startswith(f"{layers}.{layer}.{experts_of}.{expert}.")]
            assert names
            for name in names:
                assert np.array_equal(child.read_array(name), parents[donor].read_array(name)), name
    if release:  # what the fine-tune dropped is the release's, byte for byte, in the release's dtypes
        carried = [n for n in parents["father"].tensors if n.startswith(("mtp.", "model.visual."))]
        assert any(n.startswith("mtp.layers.0.mlp.experts.3.") for n in carried)
        for name in carried:
            assert np.array_equal(child.read_array(name), parents["father"].read_array(name)), name
        assert child.tensors[f"{layers}.0.linear_attn.A_log"].dtype == "F32"
