"""Release flow: quantize the child for serving (MFP4 through ModelOpt, or NVFP4A16 in compressed-tensors) with a
roundtrip report decoded from the written files.

    darwin quantize MODEL --scheme mfp4|nvfp4a16 [--calibration FILE|TASK [--calibration-samples N]
                    [--calibration-seq-len L]] [--device auto|cpu|cuda] --out OUT
"""

from __future__ import annotations

import argparse

from prefect import flow

from darwin.checkpoint import Checkpoint
from darwin.quantize import SCHEMES, check_request, check_source
from darwin.quantize.calibration import SAMPLES, SEQ_LEN, Calibration, calibration_set
from darwin.runtime import pick_device
from flows.cli import device_type
from tasks.policy import on_gpu
from tasks.release import quantize_model


@flow(name="darwin-release", log_prints=True)
def release_flow(model: str, scheme: str, out: str, calibration: Calibration | None = None,
                 device: str = "auto") -> str:
    with on_gpu(device if SCHEMES[scheme].calibrated else "cpu"):  # round-to-nearest runs on the CPU, no GPU slot
        return quantize_model(model, scheme, out, calibration, device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local directory, hub id, or fsspec URL (s3://...) of the BF16 model")
    parser.add_argument("--scheme", required=True, choices=list(SCHEMES), help="quantization scheme")
    parser.add_argument("--calibration", metavar="FILE|TASK",
                        help="mfp4 calibration: a text file (one sample per line) or an lm-eval task name or YAML "
                             "(its documents); default: the 25 shipped probe prompts")
    parser.add_argument("--calibration-samples", type=int, default=SAMPLES, metavar="N",
                        help=f"at most N calibration texts (default {SAMPLES}, as ModelOpt's hf_ptq)")
    parser.add_argument("--calibration-seq-len", type=int, default=SEQ_LEN, metavar="L",
                        help=f"each cut to L tokens (default {SEQ_LEN}, as hf_ptq)")
    parser.add_argument("--device", default="auto", type=device_type,
                        help="auto, cpu, cuda or cuda:N (mfp4 calibration)")
    parser.add_argument("--out", required=True, help="directory for the quantized checkpoint and roundtrip.json")


def command(args: argparse.Namespace) -> int:
    # Bad input fails here, in one line, before Prefect starts.
    calibration = None
    if SCHEMES[args.scheme].calibrated:
        calibration = calibration_set(args.calibration, args.calibration_samples, args.calibration_seq_len)
    elif args.calibration:
        check_request(args.scheme, args.calibration)
    check_source(Checkpoint(args.model))
    pick_device(args.device)
    print(release_flow(args.model, args.scheme, args.out, calibration, args.device))
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["quantize", *sys.argv[1:]]))
