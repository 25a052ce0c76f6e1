"""Release flow: quantize the child for serving (MFP4 through ModelOpt, or NVFP4A16 in compressed-tensors) with a
roundtrip report decoded from the written files.

    darwin quantize MODEL --scheme mfp4|nvfp4a16 [--calibration FILE] [--device auto|cpu|cuda] --out OUT
"""

from __future__ import annotations

import argparse

from prefect import flow

from darwin.checkpoint import Checkpoint
from darwin.probes import load_texts
from darwin.quantize import SCHEMES, check_request, check_source
from darwin.runtime import pick_device
from flows.cli import device_type
from tasks.release import quantize_model


@flow(name="darwin-release", log_prints=True)
def release_flow(model: str, scheme: str, out: str, calibration: list[str] | None = None,
                 device: str = "auto") -> str:
    return quantize_model(model, scheme, out, calibration, device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local directory, hub id, or fsspec URL (s3://...) of the BF16 model")
    parser.add_argument("--scheme", required=True, choices=SCHEMES, help="quantization scheme")
    parser.add_argument("--calibration", metavar="FILE",
                        help="mfp4 calibration texts, one per line (default: the shipped probe prompts)")
    parser.add_argument("--device", default="auto", type=device_type,
                        help="auto, cpu, cuda or cuda:N (mfp4 calibration)")
    parser.add_argument("--out", required=True, help="directory for the quantized checkpoint and roundtrip.json")


def command(args: argparse.Namespace) -> int:
    # Bad input fails here, in one line, before Prefect starts.
    calibration = load_texts(args.calibration) if args.calibration else None
    check_request(args.scheme, calibration)
    check_source(Checkpoint(args.model))
    pick_device(args.device)
    print(release_flow(args.model, args.scheme, args.out, calibration, args.device))
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["quantize", *sys.argv[1:]]))
