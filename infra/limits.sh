#!/usr/bin/env bash
# GPU slots: every task tagged `gpu` (merge-and-evaluate, merge_child, quantize_model) takes one slot of the tag
# concurrency limit `gpu`, so the installation never runs more GPU tasks than it has GPUs.
#
#     DARWIN_GPUS=16 infra/limits.sh      (default: the GPUs nvidia-smi sees here, at least 1)
#
# `prefect concurrency-limit create` replaces an existing limit, so this is safe to re-run after adding nodes.
set -euo pipefail
gpus="${DARWIN_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
[ "${gpus:-0}" -ge 1 ] || gpus=1
prefect concurrency-limit create gpu "$gpus" >/dev/null
echo "tag concurrency limit gpu = $gpus"
