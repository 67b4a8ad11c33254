#!/usr/bin/env bash
# JAX on a GPU vs transformers PyTorch (bf16, sdpa) on the same random Qwen2.5-0.5B weights, plus
# parity on the GPU. Self-contained: needs python3 with jax[cuda], torch, transformers, safetensors
# and ml_dtypes (no Beam, no network). Usage: bash benchmarks/gpu.sh [results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Let JAX and PyTorch share the card: no up-front reservation of 75% of its memory by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m benchmarks.gpu ${1:+--out "$1"}
