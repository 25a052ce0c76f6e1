#!/usr/bin/env bash
# GPU slots of one host: every task that may use a GPU (merge-and-evaluate, merge_child, probes, held-out scoring,
# mfp4 calibration) takes one slot of the tag concurrency limit `gpu:<host>` (tasks.policy.gpu_tag), so a host
# never runs more GPU tasks than it has GPUs, whichever worker or flow run started them (Prefect's per-worker
# limits); on the host, darwin.runtime.lease gives each its own GPU. CPU-only steps (device cpu, nvfp4a16) take none.
#
#     DARWIN_GPUS=8 infra/limits.sh      (default: the GPUs nvidia-smi sees here, at least 1; DARWIN_GPU_HOST: the
#                                         host it is for, default this one; infra/worker.sh gpu runs it)
#
# `prefect concurrency-limit create` replaces an existing limit, so this is safe to re-run after adding GPUs.
set -euo pipefail
gpus="${DARWIN_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
[ "${gpus:-0}" -ge 1 ] || gpus=1
host="${DARWIN_GPU_HOST:-$(python3 -c 'import socket; print(socket.gethostname())')}"
prefect concurrency-limit create "gpu:$host" "$gpus" >/dev/null
echo "tag concurrency limit gpu:$host = $gpus"
