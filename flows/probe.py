"""Phase 0 flow, functional MRI: probe layer importance of one model, and its MoE routing when it has experts.

    darwin probe MODEL --out DIR [--probes DIR] [--calibration FILE] [--device auto|cpu|cuda] [--label NAME]

Writes DIR/probes.parquet (layer, probe, importance) and DIR/probes.png; for a model with routed experts also
DIR/routing.parquet (layer, expert, frequency, entropy, dead) and DIR/routing.png. `darwin merge --probes-father
DIR` reads this directory.
"""

from __future__ import annotations

import argparse

from prefect import flow

from darwin.checkpoint import Checkpoint
from darwin.probes import load_probes, load_texts
from darwin.runtime import pick_device
from flows.cli import device_type
from tasks.policy import on_gpu
from tasks.probe import probe_model, routing_stats


@flow(name="darwin-probe", log_prints=True)
def probe_flow(model: str, out: str, probes_dir: str | None = None, calibration: str | None = None,
               device: str = "auto", label: str = "model", trust_remote_code: bool = False) -> dict:
    with on_gpu(device):
        importance = probe_model(model, out, probes_dir, device, label, trust_remote_code)
        routing = routing_stats(model, out, calibration, probes_dir, device, label, trust_remote_code)
    return {"probes": importance, "routing": routing}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local directory, hub id, or fsspec URL (s3://...)")
    parser.add_argument("--out", required=True, help="directory for probes.parquet/png (and routing.parquet/png)")
    parser.add_argument("--probes", help="directory of NAME.txt probe sets, one prompt per line (replaces the five "
                                         "shipped sets)")
    parser.add_argument("--calibration", help="text file, one text per line, for MoE routing (default: the probes)")
    parser.add_argument("--device", default="auto", type=device_type, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--label", default="model", help="name used in artifact keys (e.g. father, mother)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modelling code")


def command(args: argparse.Namespace) -> int:
    # Bad input fails here, before Prefect starts.
    Checkpoint(args.model)
    load_probes(args.probes)
    if args.calibration:
        load_texts(args.calibration)
    pick_device(args.device)
    result = probe_flow(args.model, args.out, args.probes, args.calibration, args.device, args.label,
                        args.trust_remote_code)
    print("\n".join(path for path in result.values() if path))
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["probe", *sys.argv[1:]]))
