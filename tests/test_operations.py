"""Operations end to end: a real `prefect server start`, an evolution run against it read back through the API, the
deployments registered by infra/register.sh and run once through a process worker, result storage on S3 (moto),
merge retries, and the compose file."""

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml
from test_evolve import config_for
from test_publish import MotoS3

from darwin.checkpoint import Checkpoint
from darwin.errors import DarwinError
from darwin.genome import Genome
from darwin.parents import Parents
from tasks.merge import merge_child

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 120
RUN_TIMEOUT = 420
GENOME = Genome.from_dict({"global_ratio": 0.5, "attn_ratio": 0.5, "ffn_ratio": 0.5, "embed_ratio": 0.5,
                           "density_a": 0.8, "density_b": 0.8})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrefectServer:
    """`prefect server start` in its own process group with its own PREFECT_HOME; `env` is what its clients use.
    With `auth` ("user:password") the server takes only clients that send it (PREFECT_API_AUTH_STRING)."""

    def __init__(self, home: Path, auth: str | None = None):
        self.home = home
        self.url = f"http://127.0.0.1:{free_port()}/api"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        self.env = {**base, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_URL": self.url, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    # the infra scripts call `prefect` and `darwin`: this interpreter's, even from an unactivated venv
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    **({"PREFECT_API_AUTH_STRING": auth} if auth else {})}
        self.server_env = {"PREFECT_SERVER_API_AUTH_STRING": auth} if auth else {}
        self.process = None
        self.start_seconds = None

    def start(self):
        port = self.url.split(":")[-1].split("/")[0]
        started = time.perf_counter()
        env = {**{k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}, **self.server_env}
        with open(self.home / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
            self.process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                             "--port", port, "--no-ui", "--analytics-off"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - started < SERVER_START_TIMEOUT:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(self.home / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                self.start_seconds = time.perf_counter() - started
                print(f"prefect server up in {self.start_seconds:.1f} s")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"prefect server not up after {SERVER_START_TIMEOUT} s")

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def run(self, *args, env=None, timeout=RUN_TIMEOUT) -> subprocess.CompletedProcess:
        done = subprocess.run([str(a) for a in args], env={**self.env, **(env or {})}, cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def query(self, read):
        """Run `read(client)` against this server through prefect.client.orchestration.get_client."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        async def go():
            with temporary_settings({PREFECT_API_URL: self.url,
                                     PREFECT_API_AUTH_STRING: self.env.get("PREFECT_API_AUTH_STRING")}):
                async with get_client() as client:
                    return await read(client)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_results(tmp_path_factory):
    """moto's S3 server with a results bucket, and the AWS settings a worker would have for MinIO."""
    moto = MotoS3()
    moto.start()
    home = tmp_path_factory.mktemp("aws")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": moto.endpoint,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(home / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(home / "none")}
    try:
        boto3.client("s3", endpoint_url=moto.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="darwin-results")
        yield env
    finally:
        moto.stop()


def write_config(path: Path, family, **overrides) -> Path:
    path.write_text(yaml.safe_dump(config_for(family, **overrides).model_dump(mode="json")))
    return path


def flow_runs(client, name=None):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])) if name else None)


@pytest.mark.slow
def test_evolution_on_a_real_server_shows_its_dag_artifacts_and_results(server, s3_results, pico_family, tmp_path):
    started = time.perf_counter()
    server.run(BIN / "python", "infra/result_storage.py", "s3://darwin-results/prefect", env=s3_results)
    config = write_config(tmp_path / "evolve.yaml", pico_family, phase1__popsize=4, phase2__steps=1,
                          phase2__popsize=2)
    run = tmp_path / "run"
    server.run(BIN / "darwin", "evolve", config, "--out", run, env={
        **s3_results, "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": "remote-file-system/darwin-results"})
    print(f"darwin evolve against the server: {time.perf_counter() - started:.1f} s")

    async def read(client):
        (evolve,) = await flow_runs(client, "darwin-evolve")
        return evolve, await client.read_task_runs(), await client.read_artifacts()

    evolve, task_runs, artifacts = server.query(read)
    assert evolve.state.is_completed()
    completed = {t.name for t in task_runs if t.state.is_completed()}
    shards = {f"mri-{shard}" for model in ("father", "mother") for shard in Checkpoint(pico_family[model]).shards}
    assert shards <= completed
    genomes = pd.read_parquet(run / "history.parquet").query("phase == 2")["genome_hash"]
    assert len(genomes) == 2 and {f"eval-{h[:12]}" for h in genomes} <= completed
    keys = {a.key for a in artifacts}
    assert {"mri-father", "mri-mother", "top-genomes", "evolution", "health", "evolution-phase2"} <= keys
    progress = [a for a in artifacts if a.key == "evolution-phase2"]
    assert progress[-1].data == 100.0
    # task results went to the S3 result storage block, not to the local default
    stored = boto3.client("s3", endpoint_url=s3_results["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1").list_objects_v2(
        Bucket="darwin-results", Prefix="prefect/").get("KeyCount", 0)
    assert stored >= len(shards) + len(genomes)


@pytest.mark.slow
def test_a_fitness_cache_on_s3_serves_every_run(prefect_api, s3_results, pico_family, tmp_path, monkeypatch):
    """The cache at an S3 URL (moto's server here; MinIO or S3 on a cluster): a second run on another machine's
    disk evaluates nothing, the bucket holds whole entries only, and no file of either run holds the S3 secret."""
    import darwin.fitness
    from flows import evolve

    for name, value in s3_results.items():
        monkeypatch.setenv(name, value)
    secret = "darwin-test-secret-9f3c2a"  # moto takes any key: one no file of a run may contain
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    config = config_for(pico_family, phase1__steps=0, phase2__steps=1)
    cache = "s3://darwin-results/fitness-cache"
    first = evolve.run_evolution(config, tmp_path / "one", cache_dir=cache)
    calls = []
    real = darwin.fitness.merge_into_model
    monkeypatch.setattr(darwin.fitness, "merge_into_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = evolve.run_evolution(config, tmp_path / "two", cache_dir=cache)
    assert calls == [] and second["best"] == first["best"]
    client = boto3.client("s3", endpoint_url=s3_results["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="darwin-results", Prefix="fitness-cache/")["Contents"]]
    assert len(keys) == 3 and all(key.endswith(".json") and "/." not in key for key in keys)
    written = [path for run in ("one", "two") for path in (tmp_path / run).rglob("*") if path.is_file()]
    assert written and not [path for path in written if secret.encode() in path.read_bytes()]
    assert not [key for key in keys if secret.encode() in client.get_object(Bucket="darwin-results", Key=key)["Body"]
                .read()]


class RayCluster:
    """A Ray head and a second Ray node, each its own `ray start` on this machine, with token authentication (what
    `ray start` enables by default) and the environment a real node would have."""

    def __init__(self, env: dict):
        self.port = free_port()
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self):
        started = time.perf_counter()
        common = ["--num-cpus", "1", "--object-store-memory", str(256 << 20), "--disable-usage-stats"]
        for node in (["--head", "--port", str(self.port), "--include-dashboard=false"],
                     ["--address", f"127.0.0.1:{self.port}"]):
            subprocess.run([str(BIN / "ray"), "start", *node, *common], env=self.env, check=True,
                           capture_output=True, timeout=120)
        print(f"two Ray nodes up in {time.perf_counter() - started:.1f} s")

    def stop(self):
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)


def task_workers() -> list[int]:
    """Ray worker processes evaluating a genome (Ray titles a busy worker after its task: prefect-ray names the task
    after the Prefect task)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::evaluate_candidate"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_two_node_ray_run_survives_a_killed_worker(pico_family, s3_results, tmp_path):
    """`runner: ray` across two Ray nodes, against a Prefect server behind an auth string, the fitness cache on S3:
    a Ray worker killed in the middle of a Phase 2 generation is retried, and the run ends with the history and
    best child of an uninterrupted run; no file either run wrote holds a secret."""
    auth = f"darwin:{secrets.token_hex(12)}"
    server = PrefectServer(tmp_path / "prefect-home", auth=auth)
    (tmp_path / "prefect-home").mkdir()
    s3_secret = f"darwin-test-secret-{secrets.token_hex(8)}"  # moto takes any key: one no file may contain
    cluster = RayCluster({**server.env, **s3_results, "AWS_SECRET_ACCESS_KEY": s3_secret})
    config = write_config(tmp_path / "config.yaml", pico_family, phase1__steps=0, phase2__steps=2,
                          phase2__popsize=3, runner={"kind": "ray", "address": f"127.0.0.1:{cluster.port}"})
    try:
        server.start()
        cluster.start()
        runs, killed = {}, []
        for label in ("killed", "uninterrupted"):
            started = time.perf_counter()
            command = [str(BIN / "darwin"), "evolve", str(config), "--out", str(tmp_path / label),
                       "--fitness-cache", f"s3://darwin-results/cache-{label}"]
            with open(tmp_path / f"{label}.log", "wb") as log:
                run = subprocess.Popen(command, env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                while label == "killed" and not killed and run.poll() is None:
                    busy = task_workers()
                    if busy and (tmp_path / label / "history.parquet").exists():  # Phase 2's 2nd generation
                        os.kill(busy[0], signal.SIGKILL)
                        killed.append(busy[0])
                    time.sleep(0.1)
                assert run.wait(timeout=RUN_TIMEOUT) == 0, (tmp_path / f"{label}.log").read_text()[-3000:]
            print(f"darwin evolve on two Ray nodes ({label}): {time.perf_counter() - started:.1f} s")
            runs[label] = (pd.read_parquet(tmp_path / label / "history.parquet"),
                           json.loads((tmp_path / label / "summary.json").read_text()))
    finally:
        cluster.stop()
        server.stop()
    assert killed, "no Ray worker was running a task to kill"
    (killed_history, killed_summary), (history, summary) = runs["killed"], runs["uninterrupted"]
    columns = ["phase", "generation", "genome_hash", "fitness"]
    assert not killed_history["failed"].any() and len(history) == 6
    pd.testing.assert_frame_equal(killed_history[columns], history[columns])
    assert killed_summary["best"]["genome_hash"] == summary["best"]["genome_hash"]
    best = {label: Checkpoint(tmp_path / label / "best") for label in runs}
    assert all(best["killed"].read_array(n).tobytes() == best["uninterrupted"].read_array(n).tobytes()
               for n in best["uninterrupted"].tensors)
    nodes = {worker.split(":")[1] for worker in history["worker"]}
    assert len(nodes) >= 2  # evaluated by more than one Ray worker process
    secrets_ = [auth.split(":")[1], cluster.env["RAY_AUTH_TOKEN"], s3_secret]
    written = [path for label in runs for path in (tmp_path / label).rglob("*") if path.is_file()]
    assert not [path for path in written if any(secret.encode() in path.read_bytes() for secret in secrets_)]


def test_register_deploy_and_run_once_through_a_process_worker(server, pico_family, tmp_path):
    started = time.perf_counter()
    # the deployer's DARWIN_HOME is not the workers': the pull step must read the worker's
    server.run("infra/register.sh", env={"DARWIN_GPU_POOL_TYPE": "kubernetes", "DARWIN_GPUS": "3",
                                         "DARWIN_HOME": "/nowhere/on/the/deployer"})
    print(f"infra/register.sh: {time.perf_counter() - started:.1f} s")

    async def registered(client):
        pools = {name: await client.read_work_pool(name) for name in ("darwin-cpu", "darwin-gpu")}
        return pools, await client.read_deployments(), await client.read_concurrency_limit_by_tag(
            f"gpu:{socket.gethostname()}")

    pools, deployments, gpu_limit = server.query(registered)
    assert pools["darwin-cpu"].type == "process" and pools["darwin-gpu"].type == "kubernetes"
    container = pools["darwin-gpu"].base_job_template["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert gpu_limit.concurrency_limit == 3
    by_name = {d.name: d for d in deployments}
    assert set(by_name) == {"evolve-nightly", "evolve-cpu", "release", "profile"}
    nightly = by_name["evolve-nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.work_pool_name == "darwin-gpu"
    assert nightly.parameters["config_path"] == "deployments/configs/nightly.yaml"
    assert "/nowhere/on/the/deployer" not in json.dumps(nightly.pull_steps)

    config = write_config(tmp_path / "smoke.yaml", pico_family, phase1__steps=0, phase2__steps=1, phase2__popsize=2)
    run = tmp_path / "deployed-run"
    started = time.perf_counter()
    created = server.run(BIN / "prefect", "deployment", "run", "darwin-evolve-from-file/evolve-cpu",
                         "-p", f"config_path={json.dumps(str(config))}", "-p", f"run_dir={json.dumps(str(run))}")
    worker = server.run("infra/worker.sh", "cpu", "--run-once", env={"PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results")})
    print(f"deployment run through a process worker: {time.perf_counter() - started:.1f} s")

    async def runs(client):
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        return await client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[by_name["evolve-cpu"].id])))

    (deployed,) = server.query(runs)
    assert str(deployed.id) in created.stdout
    assert deployed.state.is_completed(), f"{deployed.state.message}\n{worker.stdout[-4000:]}{worker.stderr[-4000:]}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"]["phase2"] == 2
    assert any((tmp_path / "results").iterdir())  # the worker persists results locally by default


def test_merge_fails_once_then_succeeds_on_retry(prefect_api, pico_family, tmp_path, monkeypatch):
    import tasks.merge

    real = tasks.merge.merge_to_dir
    attempts = []

    def flaky(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.merge, "merge_to_dir", flaky)
    out = tmp_path / "child"
    state = merge_child.with_options(retry_delay_seconds=0)(
        Parents(str(pico_family["father"]), str(pico_family["mother"]), "darwin-v5"), GENOME, str(out),
        return_state=True)
    assert state.is_completed() and len(attempts) == 2
    assert json.loads((out / "merge_report.json").read_text())["genome_hash"]
    assert task_run_count(state) == 2


def test_merge_user_error_is_not_retried(prefect_api, pico_family, pico_checkpoint, tmp_path):
    stranger = pico_checkpoint("llama")  # another architecture: the parents do not match
    state = merge_child.with_options(retry_delay_seconds=0)(
        Parents(str(pico_family["father"]), str(stranger), "darwin-v5"), GENOME, str(tmp_path / "child"),
        return_state=True)
    assert state.is_failed()
    with pytest.raises(DarwinError):
        state.result()
    assert task_run_count(state) == 1
    assert not (tmp_path / "child").exists()


def task_run_count(state) -> int:
    """How often the API says the task ran, once it has the run's final state: a task called outside a flow reports
    through events, which the server records a moment later."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for _ in range(300):
            try:
                run = client.read_task_run(state.state_details.task_run_id)
            except ObjectNotFound:  # its first event not recorded yet
                run = None
            if run is not None and run.state is not None and run.state.is_final() and run.run_count:
                return run.run_count
            time.sleep(0.1)
    raise AssertionError(f"the API never recorded the end of task run {state.state_details.task_run_id}")


@pytest.mark.slow
def test_first_runs_start_on_a_busy_machine(pico_checkpoint, tmp_path):
    """A fresh PREFECT_HOME (Prefect's temporary server creates its database) with both cores busy: Prefect's own
    20 s start-up limit failed here 3 times of 3; darwin's limit lets all three first runs through."""
    model = pico_checkpoint("llama")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        for attempt in range(3):
            home = tmp_path / f"home{attempt}"
            started = time.perf_counter()
            out = tmp_path / f"mri{attempt}"
            done = subprocess.run([str(BIN / "darwin"), "profile", str(model), "--out", str(out)],
                                  env={**env, "PREFECT_HOME": str(home), "HOME": str(home)}, capture_output=True,
                                  text=True, timeout=600, check=False)
            print(f"first run {attempt}: exit {done.returncode} in {time.perf_counter() - started:.1f} s")
            assert done.returncode == 0, done.stderr[-3000:]
            assert (out / "mri.parquet").exists()
    finally:
        for loop in busy:
            loop.kill()
            loop.wait()


def test_a_server_that_does_not_start_is_one_line(pico_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([str(BIN / "darwin"), "profile", str(pico_checkpoint("llama")), "--out", str(tmp_path / "m")],
                          env={**env, "PREFECT_HOME": str(tmp_path / "home"),
                               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    # beside Prefect's own notices of the server it started and stopped, one line
    ours = [line for line in done.stderr.strip().splitlines()
            if "temporary server on http://127.0.0.1" not in line and "docs.prefect.io" not in line]
    assert ours == [
        "darwin profile: error: Prefect's temporary API server did not answer within 1 s; raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` and export "
        "PREFECT_API_URL=http://127.0.0.1:4200/api"]


def test_sample_configs_are_valid_run_configs():
    from darwin.config import load_config

    configs = sorted((ROOT / "deployments" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
    scheduled = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    for deployment in scheduled:
        path = deployment["parameters"].get("config_path")
        assert path is None or (ROOT / path).exists(), deployment["name"]


def compose_with(env_file: Path) -> dict:
    """infra/compose.yaml with ${NAME}, ${NAME:-default} and ${NAME:?message} filled as compose fills them from
    `env_file` (YAML merge keys resolved), without a Docker engine."""
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))

    def fill(match):
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if values.get(name):
            return values[name]
        assert op != ":?", f"{name} is required and {env_file.name} does not set it"
        return rest if op == ":-" else ""

    text = re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", fill, (ROOT / "infra" / "compose.yaml").read_text())
    return yaml.safe_load(text.replace("$$", "$"))


def test_compose_stack_is_safe_by_default():
    sample = ROOT / "infra" / "env.sample"
    services = compose_with(sample)["services"]
    root_keys = {line.split("=", 1)[1] for line in sample.read_text().splitlines()
                 if line.startswith(("MINIO_ROOT_USER=", "MINIO_ROOT_PASSWORD="))}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # published on this host only
        assert "8265" not in " ".join(str(p) for p in service.get("ports", [])), name  # no Ray dashboard
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        env = service.get("environment", {})
        if "PREFECT_API_URL" in env:  # every Prefect client authenticates, and no worker holds MinIO's root keys
            assert env["PREFECT_API_AUTH_STRING"] == services["prefect-server"]["environment"][
                "PREFECT_SERVER_API_AUTH_STRING"] != ""
            assert not {env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]} & root_keys, name
    assert "127.0.0.1" in services["ray-head"]["command"][services["ray-head"]["command"].index("--dashboard-host") + 1]
    assert "mc admin user add" in services["minio-setup"]["command"][0]
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'pip install "vllm==$VLLM_VERSION"' in dockerfile and "pip install vllm;" not in dockerfile


def test_compose_file_is_valid(tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("no docker client here")
    check = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        pytest.skip(f"docker has no compose plugin here: {check.stderr.strip().splitlines()[0]}")
    done = subprocess.run(["docker", "compose", "-f", "infra/compose.yaml", "--env-file", "infra/env.sample",
                           "--profile", "setup", "--profile", "ray", "config", "--format", "json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker-cpu"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
