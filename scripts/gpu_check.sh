#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU: the parity tests on CUDA (float32 and bfloat16 against
# transformers on the same GPU, batch = alone, CUDA = CPU) and the offline throughput benchmark on the GPU.
# Usage: bash scripts/gpu_check.sh [--quick]   (--quick: a small benchmark, e.g. on a lent machine's short lease)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch " + torch.__version__
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| bf16:", torch.cuda.is_bf16_supported())
PY
"$PY" -m pytest -q tests/gpu
SCALE=1.0
[ "${1:-}" = "--quick" ] && SCALE=0.25
for dtype in bfloat16 float32; do
  "$PY" benchmarks/throughput.py --device cuda --dtype "$dtype" --quantization none --scale "$SCALE" \
      --workloads fixed,mixed,single --kv-cache-gib 8 --max-num-seqs 256 --max-num-batched-tokens 8192
done
