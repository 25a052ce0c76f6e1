"""Prefect task of the release's quantization: MFP4 or NVFP4A16 with its roundtrip report as a table artifact."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from darwin.quantize import quantize
from darwin.quantize.calibration import Calibration
from darwin.quantize.roundtrip import roundtrip_table
from tasks import tracked
from tasks.policy import retry_unless_user_error


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_user_error,
      task_run_name="quantize-{scheme}")
def quantize_model(model: str, scheme: str, out: str, calibration: Calibration | None = None,
                   device: str = "auto") -> str:
    report_path = Path(out) / "roundtrip.json"
    # The output is written atomically and the report last: a finished one from an earlier attempt stands.
    if not (report_path.exists() and json.loads(report_path.read_text())["scheme"] == scheme):
        with tracked(f"{scheme} of {Path(model).name}", f"quantize-{scheme}-progress") as progress:
            quantize(model, scheme, out, calibration=calibration, device=device, progress=progress)
    report = json.loads(report_path.read_text())
    overall = report["overall"]
    create_table_artifact(key=f"roundtrip-{scheme}", table=roundtrip_table(report), description=(
        f"{scheme} roundtrip of {out}: relative Frobenius error {overall['relative_frobenius']:.4f}, "
        f"{overall['bytes_before'] / 2**20:.1f} -> {overall['bytes_after'] / 2**20:.1f} MiB, "
        f"kept tensors bit-identical: {report['kept_identical']}"))
    return out
