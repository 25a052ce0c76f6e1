"""Publish against a real S3-protocol server (moto's, on 127.0.0.1) and a local path; the model card."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml
from huggingface_hub import ModelCard
from moto.server import ThreadedMotoServer

from darwin.errors import DarwinError
from darwin.modelcard import model_card, run_info_from_dir
from darwin.publish import JOURNAL, MANIFEST, PublishInterrupted, publish

MIB = 2**20
GENOME = {"global_ratio": 0.61, "attn_ratio": 0.27, "ffn_ratio": 0.83, "embed_ratio": 0.12,
          "density_a": 0.9, "density_b": 0.55}
SCORES = {"father": {"skill_a": 0.71, "skill_b": 0.22}, "mother": {"skill_a": 0.25, "skill_b": 0.68},
          "child": {"skill_a": 0.66, "skill_b": 0.64}}


class MotoS3:
    """moto's S3 server in this process; its buckets live in module state, so they survive a stop and restart."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()

    def require_auth(self, on: bool):
        """moto checks access keys against its IAM only when asked to (`/moto-api/reset-auth`)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                         headers={"Content-Type": "text/plain"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_s3, monkeypatch, tmp_path):
    """A fresh bucket on the moto server, with the AWS settings a user would export for MinIO or the like."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"release-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def local_files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def run_dir(tmp_path, pico_checkpoint):
    """A run as the evolution leaves it: best/ (a real tiny checkpoint), summary, history, health, a quantized dir."""
    run = tmp_path / "darwin-pico-run"
    shutil.copytree(pico_checkpoint("qwen3_5"), run / "best")
    (run / "best" / "merge_report.json").write_text(json.dumps({
        "method": "darwin-v5", "genome": GENOME, "genome_hash": "f00d" * 16,
        "parents": {"father": "/cache/models--org--father-9b/snapshots/abc", "mother": "/models/mother", "base": None},
        "tensors": {}}))
    heldout = {"split": "test", "questions": 400, "scores": SCORES,
               "metrics": {"skill_a": {"metric": "acc_norm", "output_type": "multiple_choice"},
                           "skill_b": {"metric": "exact_match,strict-match", "output_type": "generate_until"}},
               "fitness": {"father": 0.465, "mother": 0.465, "child": 0.65},
               "p_values": {"father": 0.012, "mother": 0.031}}
    (run / "summary.json").write_text(json.dumps({"heldout": heldout, "genome": GENOME, "genome_hash": "f00d" * 16}))
    pd.DataFrame({"phase": [1, 1, 1, 2, 2], "generation": [0, 0, 1, 0, 0], "fitness": [0.1, 0.3, 0.2, 0.6, 0.65],
                  "genome_hash": list("abcde")}).to_parquet(run / "history.parquet")
    (run / "health").mkdir()
    (run / "health" / "health.json").write_text(json.dumps({"verdict": "pass", "layers": []}))
    quant = run / "quantized" / "nvfp4a16"
    quant.mkdir(parents=True)
    (quant / "model.safetensors").write_bytes(b"\x01" * 4096)
    (quant / "roundtrip.json").write_text(json.dumps({  # the layout darwin.quantize.roundtrip writes
        "scheme": "nvfp4a16", "source": str(run / "best"), "quantized": str(quant),
        "overall": {"quantized_tensors": 12, "kept_tensors": 3, "max_abs_error": 0.031, "mean_abs_error": 0.0012,
                    "relative_frobenius": 0.094, "bytes_before": 8_000_000, "bytes_after": 2_500_000},
        "tensors": [], "kept": ["a", "b", "c"]}))
    return run


@pytest.fixture
def model_dir(tmp_path):
    """A model directory with one file big enough for a multipart upload at 5 MiB parts, and small ones."""
    model = tmp_path / "model"
    (model / "nested").mkdir(parents=True)
    (model / "model-00001-of-00001.safetensors").write_bytes(bytes(range(256)) * (11 * MIB // 256) + b"tail")
    (model / "config.json").write_text('{"architectures": ["Qwen3_5ForCausalLM"]}')
    (model / "nested" / "report.json").write_text('{"ok": true}')
    (model / "tokenizer.json").write_text("{}")
    return model


def test_files_and_manifest_arrive_with_matching_checksums(bucket, model_dir):
    url = publish(model_dir, f"s3://{bucket}/child/v1", card="# card\n", extra={"genome_hash": "ab" * 32,
                  "commit": "0123abc"}, chunksize=5 * MIB, max_concurrency=2)
    assert url == f"s3://{bucket}/child/v1/manifest.json"
    remote = s3_objects(bucket, "child/v1")
    manifest = json.loads(remote.pop(MANIFEST))
    assert JOURNAL not in remote
    expected = {**local_files(model_dir), "README.md": b"# card\n"}
    assert remote == expected
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]} == \
        {rel: (len(data), sha256(data)) for rel, data in expected.items()}
    assert manifest["genome_hash"] == "ab" * 32 and manifest["commit"] == "0123abc" and manifest["created"]
    etag = boto3.client("s3").head_object(Bucket=bucket, Key="child/v1/model-00001-of-00001.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3")  # 11 MiB in 5 MiB parts: a three-part multipart upload


def test_server_stopped_midway_leaves_no_manifest_and_rerun_finishes(bucket, model_dir, moto_s3):
    dest = f"s3://{bucket}/interrupted"
    first = []

    def stop_server_after_first(rel, done, total):
        first.append(rel)
        moto_s3.stop()

    try:
        with pytest.raises(PublishInterrupted, match="stopped after 1 of 4 files"):
            publish(model_dir, dest, workers=1, chunksize=5 * MIB, on_uploaded=stop_server_after_first)
    finally:
        moto_s3.start()
    remote = s3_objects(bucket, "interrupted")
    assert MANIFEST not in remote
    assert set(remote) == {first[0], JOURNAL}

    uploaded = []
    publish(model_dir, dest, workers=1, chunksize=5 * MIB, on_uploaded=lambda rel, done, total: uploaded.append(rel))
    assert sorted(uploaded) == sorted(set(local_files(model_dir)) - set(first))
    remote = s3_objects(bucket, "interrupted")
    manifest = json.loads(remote.pop(MANIFEST))
    assert remote == local_files(model_dir)
    assert {e["path"]: e["sha256"] for e in manifest["files"]} == {k: sha256(v) for k, v in remote.items()}


def test_missing_bucket_is_one_clear_error(bucket, model_dir):
    with pytest.raises(DarwinError, match=f"bucket 'no-such-{bucket}' does not exist") as err:
        publish(model_dir, f"s3://no-such-{bucket}/x")
    assert "\n" not in str(err.value)


def test_bad_credentials_are_one_clear_error(bucket, model_dir, moto_s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    moto_s3.require_auth(True)
    try:
        with pytest.raises(DarwinError, match="denied.*credentials") as err:
            publish(model_dir, f"s3://{bucket}/x")
    finally:
        moto_s3.require_auth(False)
    assert "\n" not in str(err.value)
    assert s3_objects(bucket, "x") == {}


def test_unreachable_endpoint_is_one_clear_error(bucket, model_dir, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{probe.getsockname()[1]}")
    with pytest.raises(DarwinError, match="cannot reach"):
        publish(model_dir, f"s3://{bucket}/x")


def test_file_destination_resumes_and_reuploads_a_damaged_file(tmp_path, model_dir):
    dest = tmp_path / "out" / "release"

    def disk_full(rel, done, total):
        raise OSError(28, "No space left on device")

    with pytest.raises(PublishInterrupted, match="No space left"):
        publish(model_dir, f"file://{dest}", workers=1, on_uploaded=disk_full)
    assert not (dest / MANIFEST).exists()
    publish(model_dir, f"file://{dest}")
    assert {k: v for k, v in local_files(dest).items() if k != MANIFEST} == local_files(model_dir)

    (dest / "config.json").write_text("{}")  # damaged behind the manifest's back: the size no longer matches
    uploaded = []
    publish(model_dir, str(dest), on_uploaded=lambda rel, done, total: uploaded.append(rel))
    assert uploaded == ["config.json"]
    assert (dest / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def test_model_card_names_hub_parents_by_their_repos():
    """A revision is not part of a repo id; an adapter parent (BASE+ADAPTER) is named by its adapter's repo."""
    from darwin.modelcard import card_data

    data = card_data({"father": "org/father-9b@v2", "mother": "org/father-9b+org/mother-lora", "method": "dare-ties"})
    assert data.base_model == ["org/father-9b", "org/mother-lora"] and data.base_model_relation == "merge"


def test_model_card_from_a_run(run_dir):
    info = run_info_from_dir(run_dir)
    card = model_card({**info, "location": "s3://bucket/darwin-pico"})
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta == ModelCard(card).data.to_dict()  # huggingface_hub reads back what it wrote
    assert meta["base_model"] == ["org/father-9b"] and meta["base_model_relation"] == "merge"  # hub ids only
    assert {"merge", "darwin", "evolutionary-merge", "nvfp4"} <= set(meta["tags"])
    [index] = meta["model-index"]
    assert index["name"] == "darwin-pico-run"
    assert {(r["task"]["type"], r["dataset"]["name"], r["dataset"]["split"], r["metrics"][0]["type"],
             r["metrics"][0]["value"]) for r in index["results"]} == \
        {("multiple-choice", "skill_a", "test", "acc_norm", 0.66),
         ("text-generation", "skill_b", "test", "exact_match,strict-match", 0.64)}
    assert "darwin merge --father org/father-9b --mother /models/mother --genome genome.json --method darwin-v5" in body
    for gene, value in GENOME.items():
        assert f"| {gene} | {value} |" in body
    assert "| skill_a | 0.71 | 0.25 | 0.66 |" in body and "| skill_b | 0.22 | 0.68 | 0.64 |" in body
    assert "f00d" * 16 in body and "p = 0.012 vs father" in body
    assert "On the `test` split (400 questions), which the search never scored" in body
    assert "| nvfp4a16 | `quantized/nvfp4a16` | 12 | 3 |" in body and "0.094" in body
    assert "5 genomes evaluated, 3 in Phase 1, 2 in Phase 2" in body and "**pass**" in body
    assert "vllm serve ./darwin-pico-run/best" in body and "modelopt_fp4`" in body
    assert "vllm serve ./darwin-pico-run/quantized/nvfp4a16   # nvfp4a16" in body
    assert "--quantization modelopt_fp4   # mfp4" not in body  # no mfp4 in this run


def test_model_card_of_per_expert_nvfp4_experts_points_to_vllm_only(run_dir):
    """A release whose fused experts were cut per expert says so; its nvfp4a16 experts are not offered to
    transformers, which loads NVFP4 experts without their global scale."""
    plain = model_card(run_info_from_dir(run_dir))
    assert "released per expert" not in plain and "The nvfp4a16 experts are for vLLM" not in plain
    quantized = run_dir / "quantized" / "nvfp4a16"
    roundtrip = json.loads((quantized / "roundtrip.json").read_text())
    roundtrip["tensors"].append({"name": "model.layers.0.mlp.experts.0.gate_proj.weight", "kind": "expert",
                                 "slice_of": "model.layers.0.mlp.experts.gate_up_proj[0, 0:32]"})
    (quantized / "roundtrip.json").write_text(json.dumps(roundtrip))
    body = model_card(run_info_from_dir(quantized))
    assert "released per expert (`mlp.experts.N.gate_proj`" in body
    assert "The nvfp4a16 experts are for vLLM" in body and "from_pretrained" not in body
    assert "vllm serve ./nvfp4a16   # nvfp4a16" in body and "# BF16" not in body  # the quantization alone


def test_a_quantized_model_published_alone_is_a_quantization(run_dir):
    quantized = run_dir / "quantized" / "nvfp4a16"
    (quantized / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5ForCausalLM"],
                                                       "quantization_config": {"quant_method": "compressed-tensors"}}))
    meta = ModelCard(model_card(run_info_from_dir(quantized))).data.to_dict()
    assert "base_model" not in meta  # made from a local child: nothing on the hub to name
    info = {**run_info_from_dir(quantized), "child_of": "org/darwin-child"}
    meta = ModelCard(model_card(info)).data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"]) == (["org/darwin-child"], "quantized")


def test_model_card_with_nothing_known_still_renders():
    card = model_card({})
    assert card.startswith("---\n") and "## Usage" in card and "## Genome" not in card and "## Held-out" not in card


def test_cli_publishes_a_run_with_its_card(prefect_api, bucket, run_dir):
    from flows.cli import main

    assert main(["publish", str(run_dir), f"s3://{bucket}/runs/pico"]) == 0
    remote = s3_objects(bucket, "runs/pico")
    manifest = json.loads(remote.pop(MANIFEST))
    assert remote.pop("README.md").decode().count("| density_b | 0.55 |") == 1
    assert remote == local_files(run_dir)
    assert manifest["genome_hash"] == "f00d" * 16 and manifest["name"] == "darwin-pico-run"
    assert main(["publish", str(run_dir / "missing"), f"s3://{bucket}/x"]) == 2


def test_a_user_error_inside_the_flow_is_one_line(bucket, model_dir, tmp_path):
    """The missing bucket is found inside the publish flow: Prefect's traceback of it stays off the terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([str(Path(sys.executable).parent / "darwin"), "publish", str(model_dir),
                           f"s3://no-such-{bucket}/x"], env={**env, "PREFECT_HOME": str(tmp_path / "prefect")},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "error" in line]
    assert errors == [f"darwin publish: error: bucket 'no-such-{bucket}' does not exist "
                      f"(destination s3://no-such-{bucket}/x)"], done.stderr


def test_task_does_not_retry_a_missing_bucket(prefect_api, bucket, model_dir):
    from test_operations import task_run_count

    from tasks.publish import publish_release

    state = publish_release(str(model_dir), f"s3://no-such-{bucket}/x", return_state=True)
    assert state.is_failed()
    assert task_run_count(state) == 1


def test_retry_policy_retries_interruptions_only():
    from prefect.states import Failed

    from tasks.policy import retry_unless_user_error

    def verdict(exc):
        return retry_unless_user_error(None, None, Failed(data=exc, message=str(exc)))

    assert verdict(PublishInterrupted("stopped after 1 of 4 files")) and verdict(ConnectionResetError("reset"))
    assert not verdict(DarwinError("bucket 'x' does not exist"))
