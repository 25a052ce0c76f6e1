"""Phase 3 flow, health check: the child's probe importance against both parents', layer by layer.

    darwin health CHILD --father A --mother B --out DIR [--interference 1.5] [--function-loss 0.5] [--noise 0]
                  [--probes DIR]

Probes the three models (DIR/child, DIR/father, DIR/mother hold their probes.parquet; a parent already probed
with `darwin probe` can be given as that output directory with --father-probes / --mother-probes), then writes
DIR/health.json (per-layer values, flags, verdict) and DIR/health.png. Exit code 0 on pass, 3 on fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from darwin.checkpoint import Checkpoint
from darwin.health import Thresholds
from darwin.probes import load_probes, read_importance
from darwin.runtime import pick_device
from flows.cli import device_type
from tasks.health import health_check
from tasks.policy import on_gpu
from tasks.probe import probe_model

FAIL_EXIT = 3


@flow(name="darwin-health", log_prints=True)
def health_flow(child: str, father: str, mother: str, out: str, thresholds: Thresholds = Thresholds(),
                device: str = "auto", probed: dict[str, str | None] | None = None, probes_dir: str | None = None,
                trust_remote_code: bool = False) -> dict:
    """`probed`: role -> `darwin probe` output of a parent already probed (its tables are reused)."""
    models, probed = {"child": child, "father": father, "mother": mother}, probed or {}
    with on_gpu(device):
        tables = [probed.get(role) or probe_model(model, str(Path(out) / role), probes_dir, device, role,
                                                  trust_remote_code) for role, model in models.items()]
    return health_check(*tables, out, thresholds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("child", help="the merged child: local directory, hub id, or fsspec URL")
    parser.add_argument("--father", required=True, help="parent A")
    parser.add_argument("--mother", required=True, help="parent B")
    parser.add_argument("--out", required=True, help="directory for health.json and health.png")
    parser.add_argument("--interference", type=float, default=1.5, help="flag child > X * max(parents)")
    parser.add_argument("--function-loss", type=float, default=0.5, help="flag child < X * min(parents)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="raise importances to max(1e-3, X * peak) first (default 0: no floor)")
    parser.add_argument("--probes", help="directory of NAME.txt probe sets (replaces the shipped sets)")
    parser.add_argument("--father-probes", help="`darwin probe` output of the father, reused instead of probing")
    parser.add_argument("--mother-probes", help="`darwin probe` output of the mother, reused instead of probing")
    parser.add_argument("--device", default="auto", type=device_type, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoints' own modelling code")


def command(args: argparse.Namespace) -> int:
    # Bad input fails here, before Prefect starts.
    for model in (args.child, args.father, args.mother):
        Checkpoint(model)
    for given in (args.father_probes, args.mother_probes):
        if given:
            read_importance(given)
    thresholds = Thresholds(args.interference, args.function_loss, args.noise)
    load_probes(args.probes)
    pick_device(args.device)
    report = health_flow(args.child, args.father, args.mother, args.out, thresholds, args.device,
                         {"father": args.father_probes, "mother": args.mother_probes}, args.probes,
                         args.trust_remote_code)
    flagged = {flag: report[flag] for flag in ("interference", "function_loss") if report[flag]}
    print(f"health {report['verdict']}: {flagged or 'no layer flagged'} ({Path(args.out) / 'health.json'})")
    return 0 if report["verdict"] == "pass" else FAIL_EXIT


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["health", *sys.argv[1:]]))
