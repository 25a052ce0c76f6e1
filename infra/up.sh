#!/usr/bin/env bash
# Start the stack.
#
#     infra/up.sh local     a Prefect server on 127.0.0.1:4200 in the foreground (SQLite under PREFECT_HOME)
#     infra/up.sh compose   the compose installation: Postgres, Prefect server, MinIO, CPU and GPU workers
#                           (needs infra/.env: copy infra/env.sample and fill in the passwords), then registration
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-local}" in
  local)
    export PREFECT_SERVER_ANALYTICS_ENABLED=false
    echo "export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT:-4200}/api   # in the shells of workers and flows"
    exec prefect server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}" ;;
  compose)
    [ -f "$root/infra/.env" ] || { echo "infra/.env is missing: cp infra/env.sample infra/.env and set passwords" >&2; exit 2; }
    docker compose -f "$root/infra/compose.yaml" up -d --build --wait prefect-server minio worker-cpu worker-gpu
    docker compose -f "$root/infra/compose.yaml" run --rm minio-setup
    docker compose -f "$root/infra/compose.yaml" run --rm register ;;
  *) echo "usage: infra/up.sh local|compose" >&2; exit 2 ;;
esac
