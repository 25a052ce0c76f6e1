#!/usr/bin/env bash
# Register darwin with a Prefect server (PREFECT_API_URL): work pools, this host's `gpu:<host>` limit, the result
# storage block, then every deployment of deployments/prefect.yaml.
#
#     PREFECT_API_URL=http://127.0.0.1:4200/api infra/register.sh
#
# DARWIN_GPU_POOL_TYPE  process (default: one GPU box runs flows as subprocesses) or kubernetes (H100 nodes, from
#                       infra/pools/gpu-h100-kubernetes.json; the kubernetes worker needs prefect-kubernetes)
# DARWIN_GPUS           slots of the `gpu:<host>` tag limit (default: GPUs seen here, at least 1; every GPU worker
#                       sets its own host's at start, infra/worker.sh)
# DARWIN_RESULTS_URL    if set, result storage block darwin-results at this fsspec URL (s3://bucket/prefix)
# The deployments' pull step reads DARWIN_HOME on each worker (infra/worker.sh sets it; the image uses /opt/darwin):
# nothing of the deployer's paths is baked into them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
gpu_type="${DARWIN_GPU_POOL_TYPE:-process}"

prefect work-pool create darwin-cpu --type process --overwrite >/dev/null
case "$gpu_type" in
  process) prefect work-pool create darwin-gpu --type process --overwrite >/dev/null ;;
  kubernetes) prefect work-pool create darwin-gpu --type kubernetes --overwrite \
                --base-job-template infra/pools/gpu-h100-kubernetes.json >/dev/null ;;
  *) echo "DARWIN_GPU_POOL_TYPE must be process or kubernetes, not $gpu_type" >&2; exit 2 ;;
esac
echo "work pools darwin-cpu (process), darwin-gpu ($gpu_type)"
infra/limits.sh
if [ -n "${DARWIN_RESULTS_URL:-}" ]; then
  python infra/result_storage.py "$DARWIN_RESULTS_URL"
fi
prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml >/dev/null
prefect deployment ls
