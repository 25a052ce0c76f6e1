"""Prefect tasks of the functional MRI: probe layer importance and MoE routing (one GPU task per model each). Each
publishes a table and a markdown artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from darwin import moe, probes
from tasks import artifact_key, tracked
from tasks.policy import retry_unless_user_error


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_user_error,
      task_run_name="probe-{label}")
def probe_model(model: str, out: str, probes_dir: str | None = None, device: str = "auto", label: str = "model",
                trust_remote_code: bool = False) -> str:
    loaded, tokenizer = probes.load_model(model, device, trust_remote_code)
    with tracked(f"probes of {label}", f"probes-{label}-progress", unit="pass") as progress:
        frame = probes.layer_importance(loaded, tokenizer, probes.load_probes(probes_dir), progress=progress)
    path = probes.write_importance(frame, out)
    create_table_artifact(key=artifact_key("probes", label), table=probes.importance_table(frame),
                          description=f"probe importance per layer of {label} ({path})")
    create_markdown_artifact(key=artifact_key("probes", label, "summary"),
                             markdown=probes.importance_markdown(frame, label))
    return str(path)


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_user_error,
      task_run_name="routing-{label}")
def routing_stats(model: str, out: str, calibration: str | None = None, probes_dir: str | None = None,
                  device: str = "auto", label: str = "model", trust_remote_code: bool = False) -> str | None:
    """`routing.parquet` for a model with routed experts; None (nothing loaded) for a dense one."""
    if not moe.checkpoint_has_experts(model):
        return None
    texts = probes.load_texts(calibration) if calibration else [
        prompt for prompts in probes.load_probes(probes_dir).values() for prompt in prompts]
    loaded, tokenizer = probes.load_model(model, device, trust_remote_code)
    frame = moe.routing_stats(loaded, tokenizer, texts)
    path = moe.write_routing(frame, out)
    create_table_artifact(key=artifact_key("routing", label), table=moe.routing_table(frame),
                          description=f"MoE routing per layer of {label}: {frame.attrs['dead_rule']} ({path})")
    create_markdown_artifact(key=artifact_key("routing", label, "summary"),
                             markdown=moe.routing_markdown(frame, label))
    return str(path)
