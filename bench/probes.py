"""What probing costs: layer importance (layers + 1 forward passes over the probe prompts) and MoE routing
stats, on random models of the pico families scaled up (CPU unless CUDA is present).

Run: python bench/probes.py [--layers 8] [--hidden 256] [--threads N] [--families qwen3 qwen3_5_moe_text]
On a CPU shared with other jobs, --threads 1 avoids OpenMP threads waiting on each other (measured here with a
load of ~5 on 2 cores: one forward pass 0.06 s with 1 thread, 2 s with 2).
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pico
import picotok
import torch

from darwin import moe, probes
from darwin.runtime import pick_device


def build(family: str, layers: int, hidden: int):
    make_config, model_cls = pico.BUILDERS[family]
    config = make_config()
    text = getattr(config, "text_config", config)
    text.num_hidden_layers, text.hidden_size, text.intermediate_size = layers, hidden, 2 * hidden
    text.num_attention_heads, text.head_dim = hidden // 32, 32
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(layers)]
    torch.manual_seed(0)
    return model_cls(config).to(torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--families", nargs="+", default=["qwen3", "qwen3_5_text", "qwen3_5_moe_text"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device("auto")
    tokenizer, sets = picotok.build(), probes.load_probes()
    texts = [prompt for prompts in sets.values() for prompt in prompts]
    print(f"device {device}, {len(texts)} probe prompts, {args.layers} layers, hidden {args.hidden}")
    for family in args.families:
        model = build(family, args.layers, args.hidden).to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        start = time.perf_counter()
        probes.layer_importance(model, tokenizer, sets)
        importance = time.perf_counter() - start
        line = f"{family:18s} {params:7.1f}M params  importance {importance:6.2f} s"
        if moe.routers(model):
            start = time.perf_counter()
            moe.routing_stats(model, tokenizer, texts)
            line += f"  routing {time.perf_counter() - start:6.2f} s"
        print(line)


if __name__ == "__main__":
    main()
