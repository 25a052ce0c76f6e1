#!/usr/bin/env bash
# Start a worker for the CPU or GPU pool; extra arguments go to `prefect worker start` (e.g. --run-once).
#
#     infra/worker.sh cpu
#     CUDA_VISIBLE_DEVICES=0,1,2,3 infra/worker.sh gpu --name h100-a
#
# Results of tasks persist by default, to PREFECT_LOCAL_STORAGE_PATH (default $DARWIN_HOME/.prefect-results) or to
# the block named by PREFECT_DEFAULT_RESULT_STORAGE_BLOCK when that is set (see infra/result_storage.py).
set -euo pipefail
kind="${1:?usage: infra/worker.sh cpu|gpu [prefect worker start options]}"
shift
case "$kind" in
  cpu|gpu) ;;
  *) echo "usage: infra/worker.sh cpu|gpu [prefect worker start options]" >&2; exit 2 ;;
esac
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
export DARWIN_HOME="${DARWIN_HOME:-$(cd "$(dirname "$0")/.." && pwd)}"
export PREFECT_RESULTS_PERSIST_BY_DEFAULT="${PREFECT_RESULTS_PERSIST_BY_DEFAULT:-true}"
export PREFECT_LOCAL_STORAGE_PATH="${PREFECT_LOCAL_STORAGE_PATH:-$DARWIN_HOME/.prefect-results}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
if [ "$kind" = gpu ]; then
  "$(dirname "$0")/limits.sh"  # this host's GPU slots
fi
exec prefect worker start --pool "darwin-$kind" --name "${DARWIN_WORKER_NAME:-$kind-$(hostname)}" "$@"
