"""Tiny models of every supported family, built locally with transformers for tests (never downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers as tf

VOCAB = 320


def _text_kwargs(**extra):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    kwargs.update(extra)
    return kwargs


def _qwen35_text_kwargs(**extra):
    return _text_kwargs(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_value_head_dim=16,
        **extra,
    )


def llama_config():
    return tf.LlamaConfig(**_text_kwargs(tie_word_embeddings=False))


def qwen3_config():
    return tf.Qwen3Config(**_text_kwargs(tie_word_embeddings=False))


def qwen3_moe_config():
    return tf.Qwen3MoeConfig(
        **_text_kwargs(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    )


def qwen35_text_config():
    return tf.Qwen3_5TextConfig(**_qwen35_text_kwargs(tie_word_embeddings=False))


def qwen35_config():
    """The real checkpoints' layout: a vision tower and a language model (`model.language_model.*`)."""
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    return tf.Qwen3_5Config(text_config=_qwen35_text_kwargs(), vision_config=vision, tie_word_embeddings=False)


def qwen35_moe_text_config():
    return tf.Qwen3_5MoeTextConfig(
        **_qwen35_text_kwargs(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, tie_word_embeddings=False)
    )


def qwen35_moe_config():
    """The MoE release's layout: a vision tower and a language model with fused routed experts."""
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = _qwen35_text_kwargs(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=32)
    return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def gemma4_text_config():
    """An E-series text model: per-layer inputs, and the last two layers reuse the k/v of earlier ones. Gemma 4's
    full-attention layers have a head size of their own (global_head_dim), given so that a saved config holds it."""
    return tf.Gemma4TextConfig(**_text_kwargs(
        tie_word_embeddings=True, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=32, global_head_dim=16, num_kv_shared_layers=2))


def gemma4_moe_text_config():
    return tf.Gemma4TextConfig(**_text_kwargs(
        tie_word_embeddings=True, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=32, global_head_dim=16, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32))


BUILDERS = {
    "llama": (llama_config, tf.LlamaForCausalLM),
    "qwen3": (qwen3_config, tf.Qwen3ForCausalLM),
    "qwen3_moe": (qwen3_moe_config, tf.Qwen3MoeForCausalLM),
    "qwen3_5_text": (qwen35_text_config, tf.Qwen3_5ForCausalLM),
    "qwen3_5": (qwen35_config, tf.Qwen3_5ForConditionalGeneration),
    "qwen3_5_moe_text": (qwen35_moe_text_config, tf.Qwen3_5MoeForCausalLM),
    "qwen3_5_moe": (qwen35_moe_config, tf.Qwen3_5MoeForConditionalGeneration),
    "gemma4_text": (gemma4_text_config, tf.Gemma4ForCausalLM),
    "gemma4_moe_text": (gemma4_moe_text_config, tf.Gemma4ForCausalLM),
}


def build(family: str, seed: int = 0, dtype=torch.bfloat16):
    make_config, model_cls = BUILDERS[family]
    torch.manual_seed(seed)
    config = make_config()
    config.architectures = [model_cls.__name__]
    return model_cls(config).to(dtype).eval()


def save(model, path: Path, shard_size: str = "40KB") -> Path:
    model.save_pretrained(path, max_shard_size=shard_size)
    return path


def add_tensors(path: Path, tensors: dict, shard: str = "extra.safetensors") -> None:
    """Add tensors transformers does not build (Qwen3.5's `mtp.*`) as one more shard of a saved checkpoint."""
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path / shard, metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: shard for name in tensors})
    index_path.write_text(json.dumps(index, indent=2))


def mtp_tensors(hidden: int = 64, seed: int = 0, dtype=torch.bfloat16, experts: int = 0) -> dict:
    """The multi-token-prediction head of the real Qwen3.5 checkpoints, at pico size; with `experts`, the MoE
    releases' MTP layer, whose routed experts are stored per expert (32 wide, as the pico MoE's)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "mtp.fc.weight": (hidden, 2 * hidden),
        "mtp.norm.weight": (hidden,),
        "mtp.pre_fc_norm_embedding.weight": (hidden,),
        "mtp.pre_fc_norm_hidden.weight": (hidden,),
        "mtp.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "mtp.layers.0.mlp.down_proj.weight": (hidden, 2 * hidden),
        "mtp.layers.0.input_layernorm.weight": (hidden,),
    }
    if experts:
        del shapes["mtp.layers.0.mlp.down_proj.weight"]
        shapes["mtp.layers.0.mlp.gate.weight"] = (experts, hidden)
        for e in range(experts):
            for part, shape in (("gate_proj", (32, hidden)), ("up_proj", (32, hidden)), ("down_proj", (hidden, 32))):
                shapes[f"mtp.layers.0.mlp.experts.{e}.{part}.weight"] = shape
    return {name: (torch.randn(shape, generator=g) * 0.02).to(dtype) for name, shape in shapes.items()}


# Official Qwen3.5 releases keep these in float32 (the rest bf16); transformers-saved fine-tunes store them bf16
FLOAT32_IN_RELEASES = re.compile(r"linear_attn\.(A_log|norm\.weight)$")


def official_release(path: Path, seed: int = 0, shards: int = 3) -> Path:
    """A Qwen3.5 vision-language release as the hub stores it, written straight with safetensors (no transformers
    save): `model.language_model.*`, `model.visual.*` and `mtp.*`, bf16 with float32 A_log and linear-attention
    norms, in several shards with an index, the config and the demo's character tokenizer."""
    model = build("qwen3_5", seed=seed, dtype=torch.float32)
    tensors = {name: tensor.to(torch.float32 if FLOAT32_IN_RELEASES.search(name) else torch.bfloat16).contiguous()
               for name, tensor in model.state_dict().items()}
    tensors.update(mtp_tensors(seed=seed))
    return write_release(path, tensors, model.config, shards)


def moe_release(path: Path, seed: int = 0, shards: int = 3) -> Path:
    """A Qwen3.5-MoE vision-language release as the hub stores it (Qwen3.5-35B-A3B's layout): `official_release`'s
    layout with the routed experts fused, 3-D and without `.weight` (`mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I]), and the MTP layer's experts per expert."""
    model = build("qwen3_5_moe", seed=seed, dtype=torch.float32)
    tensors = {name: tensor.to(torch.float32 if FLOAT32_IN_RELEASES.search(name) else torch.bfloat16).contiguous()
               for name, tensor in model.state_dict().items()}
    tensors.update(mtp_tensors(seed=seed, experts=model.config.text_config.num_experts))
    return write_release(path, tensors, model.config, shards)


def gemma4_release(path: Path, seed: int = 0, shards: int = 3) -> Path:
    """A Gemma 4 E-series text release as the hub stores it: its last two layers share the k/v of earlier ones
    (`num_kv_shared_layers`), and the release still carries their k_proj, v_proj and k_norm, which transformers
    neither builds nor saves."""
    model = build("gemma4_text", seed=seed, dtype=torch.float32)
    tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()
               if name != "lm_head.weight"}  # tied to the embeddings: releases store it once
    g = torch.Generator().manual_seed(seed)
    config = model.config
    for layer in range(config.num_hidden_layers - config.num_kv_shared_layers, config.num_hidden_layers):
        prefix, donor = f"model.layers.{layer}.self_attn", f"model.layers.{layer - 2}.self_attn"
        for part in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            shape = tensors[f"{donor}.{part}"].shape
            tensors[f"{prefix}.{part}"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return write_release(path, tensors, config, shards)


def write_release(path: Path, tensors: dict, config, shards: int) -> Path:
    """`tensors` in `shards` safetensors files with the hub's index, config.json (bf16), a card of the release's
    own and the demo's character tokenizer."""
    import json

    from safetensors.torch import save_file

    from darwin.demo.tokenizer import build_tokenizer

    path.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * len(names) // shards:(k + 1) * len(names) // shards]
        save_file({name: tensors[name] for name in part}, path / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config = config.to_dict()
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "README.md").write_text("---\nlicense: other\nlibrary_name: transformers\n---\n# The release's own card\n")
    build_tokenizer().save_pretrained(path)
    return path


def fine_tune_of(release: Path, path: Path, seed: int, wrapper=None) -> Path:
    """A fine-tune of `release` as a training script leaves it: loaded by transformers (AutoModelForCausalLM, or
    `wrapper`), its weights moved, saved with save_pretrained (no mtp.*, float32 tensors stored bf16; the text
    class also drops the vision tower and names itself Qwen3_5ForCausalLM)."""
    from darwin.demo.tokenizer import build_tokenizer

    model = (wrapper or tf.AutoModelForCausalLM).from_pretrained(release, dtype=torch.bfloat16)
    perturbed(model, seed, scale=0.02)
    model.save_pretrained(path, max_shard_size="200KB")
    build_tokenizer().save_pretrained(path)
    return path


def perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tune' of a model: every floating weight moved by a small deterministic delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return model
