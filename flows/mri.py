"""Phase 0 flow: the static MRI of a model, one task per safetensors shard, gathered into `mri.parquet`.

    darwin profile MODEL --out DIR [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse

from prefect import flow, unmapped
from prefect.futures import as_completed

from darwin.checkpoint import Checkpoint
from darwin.runtime import pick_device
from flows.cli import device_type
from tasks import tracked
from tasks.mri import profile_shard, write_profile


@flow(name="darwin-profile", log_prints=True)
def profile_flow(model: str, out: str, device: str = "auto", label: str = "model") -> str:
    checkpoint = Checkpoint(model)
    rows = profile_shard.map(unmapped(checkpoint.source), checkpoint.shards, unmapped(pick_device(device)))
    with tracked(f"MRI of {label}", f"mri-{label}-progress", unit="shard") as progress:
        for done, _ in enumerate(as_completed(rows), 1):
            progress(done, len(rows))
    return write_profile(rows, out, label)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local directory, hub id, or fsspec URL (s3://...)")
    parser.add_argument("--out", required=True, help="directory for mri.parquet and mri.png")
    parser.add_argument("--device", default="auto", type=device_type, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--label", default="model", help="name used in artifact keys (e.g. father, mother)")


def command(args: argparse.Namespace) -> int:
    Checkpoint(args.model)  # bad input fails here, before Prefect starts
    path = profile_flow(args.model, args.out, args.device, args.label)
    print(path)
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["profile", *sys.argv[1:]]))
