import pytest

import pico
from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.kinds import family, family_for_config

# Kinds that may legitimately stay unclassified: none. Every weight of these families must have a real kind.
FAMILIES = ["llama", "qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "gemma4_text",
            "gemma4_moe_text"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_tensor_of_every_family_has_a_kind(pico_checkpoint, name):
    checkpoint = Checkpoint(pico_checkpoint(name))
    kinds = {n: checkpoint.kind(n) for n in checkpoint.tensors}
    assert not [n for n, (kind, _) in kinds.items() if kind == "other"]
    layers = checkpoint.config.get("num_hidden_layers") or checkpoint.config["text_config"]["num_hidden_layers"]
    blocks = {block for kind, block in kinds.values() if block is not None}
    assert blocks == set(range(layers))


def test_qwen35_real_checkpoint_names():
    table = family_for_config({"model_type": "qwen3_5_moe", "text_config": {"model_type": "qwen3_5_moe_text"}})
    prefix = "model.language_model.layers.7."
    expected = {
        prefix + "linear_attn.in_proj_qkv.weight": ("linear_attn", 7),
        prefix + "linear_attn.A_log": ("linear_attn", 7),
        prefix + "self_attn.q_norm.weight": ("attn", 7),
        prefix + "mlp.experts.12.down_proj.weight": ("expert", 7),
        prefix + "mlp.experts.gate_up_proj": ("expert", 7),
        prefix + "mlp.shared_expert.up_proj.weight": ("shared_expert", 7),
        prefix + "mlp.shared_expert_gate.weight": ("router", 7),
        prefix + "mlp.gate.weight": ("router", 7),
        prefix + "input_layernorm.weight": ("norm", 7),
        "model.language_model.embed_tokens.weight": ("embed", None),
        "model.language_model.norm.weight": ("norm", None),
        "lm_head.weight": ("lm_head", None),
        "model.visual.blocks.3.attn.qkv.weight": ("vision", None),
        "model.visual.merger.linear_fc1.weight": ("vision", None),
        "mtp.layers.0.mlp.experts.3.up_proj.weight": ("mtp", None),
        "mtp.fc.weight": ("mtp", None),
    }
    assert {name: table.classify(name) for name in expected} == expected


def test_gemma4_multimodal_towers_are_vision():
    table = family_for_config({"model_type": "gemma4"})
    assert table.classify("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight") == ("vision", None)
    assert table.classify("model.audio_tower.layers.2.feed_forward1.ffw_layer_1.weight")[0] == "vision"
    assert table.classify("model.language_model.layers.3.router.proj.weight") == ("router", 3)


def test_unknown_model_type_uses_the_generic_decoder_table():
    assert family_for_config({"model_type": "brand-new"}).name == "decoder"
    assert family_for_config({"model_type": "brand-new"}).classify("model.layers.2.mlp.up_proj.weight") == ("mlp", 2)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(DarwinError, match="unknown architecture family 'nope'"):
        family("nope")


def test_pico_models_really_are_tiny():
    assert sum(p.numel() for p in pico.build("qwen3_5_moe_text").parameters()) < 1_000_000
