#!/usr/bin/env bash
# The one-shot GPU check, for the day a GPU machine is lent: one command, at most about 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh            # on the GPU machine: the gpu tests, then bench_gpu.py -> results/gpu.md
#   bash benchmarks/gpu_check.sh --tiny DIR # the CPU-possible part at tiny size (CI runs it): DIR/gpu.md
# It runs from the repository root with the project installed (pip install -e ".[test]").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--tiny" ]; then
    python benchmarks/bench_gpu.py --tiny --out "${2:?--tiny needs an output folder}"
    exit 0
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run with --tiny DIR on a CPU'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# the gpu-marked tests (CPU vs GPU agreement of eps and JVPs in float16/bfloat16, the IVF index on the GPU)
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests
timeout 360 python benchmarks/bench_gpu.py
