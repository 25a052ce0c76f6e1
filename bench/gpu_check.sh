#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py: CUDA merge bytes against CPU's, one Phase 2 candidate on a ~1B Qwen3.5 with
# lm-eval ARC-Challenge, ModelOpt MFP4 on CUDA) on a machine with one CUDA GPU and no network, in at most 8 minutes.
#
#   here:   bash bench/gpu_check.sh --fetch     wheels for the GPU machine's Python and ARC's splits into .gpu-check/
#           bash bench/gpu_check.sh --dry-run   the same code on this machine's CPU, at small sizes
#   there:  bash bench/gpu_check.sh             (the device tool: carry [".gpu-check"]); figures in $OUT/gpu_check.json
#
# The GPU machine has torch, transformers (older), safetensors, huggingface_hub, peft, pandas, pyarrow and matplotlib
# but not lm-eval, cma, ModelOpt or compressed-tensors: WHEELS is what darwin's core needs beyond that image, at the
# versions this project is tested with (Prefect and Ray are not among them: darwin/ never imports them).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-check
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
WHEELS="annotated-types==0.8.0 chardet==6.0.0.post1 cma==4.5.0 compressed-tensors==0.20.1 dataproperty==1.1.1
datasets==5.2.0 defusedxml==0.7.1 dill==0.4.1 evaluate==0.4.6 lm-eval==0.4.13 loguru==0.7.3 mbstrdecoder==1.1.5
more-itertools==11.2.1 multiprocess==0.70.19 nltk==3.10.4 nvidia-modelopt==0.47.0 omegaconf==2.4.0 pathvalidate==3.3.1
pulp==3.3.2 pydantic==2.14.4 pydantic-core==2.50.5 pytablewriter==1.2.1 rouge-score==0.1.2 sqlitedict==2.1.0
tabledata==1.3.5 tcolorpy==0.1.7 transformers==5.23.0 typepy==1.3.5 typing-inspection==0.4.5 word2number==1.1"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1

case "${1:-}" in
  --fetch)
    python -m pip --version >/dev/null
    mkdir -p "$KIT/wheels" "$KIT/arc"
    for spec in $WHEELS; do
      # a binary wheel for the GPU machine's CPython where one exists, else a pure-Python wheel built from the sdist
      python -m pip download -q --no-deps --dest "$KIT/wheels" --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any "$spec" 2>/dev/null || python -m pip wheel -q --no-deps -w "$KIT/wheels" "$spec"
    done
    arc=${ARC_DIR:-../shared/data/arc}
    cp "$arc"/validation.jsonl "$arc"/test.jsonl "$KIT/arc/"
    du -sh "$KIT"
    ;;
  --dry-run)
    python bench/gpu_check.py --arc "${ARC_DIR:-../shared/data/arc}" --out "${OUT:-/tmp/gpu-check-out}" --dry-run
    ;;
  "")
    [ -d "$KIT/wheels" ] || { echo "gpu_check: no $KIT/wheels (run bash bench/gpu_check.sh --fetch first)"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m pip install -q --no-index --no-deps "$KIT"/wheels/*.whl
    # the C kernel for the CPU side of the merge comparison (without it, CPU merges take the torch path)
    python3 setup.py -q build_ext --inplace || echo "gpu_check: the C kernel was not built"
    OUT=${OUT:-/tmp/gpu-check-out}
    timeout 450 python3 bench/gpu_check.py --arc "$KIT/arc" --out "$OUT" 2>&1 | tee "$OUT.log"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh [--fetch | --dry-run]"; exit 2
    ;;
esac
