#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: the CUDA tests, then the predictor
# benchmark (images/s, fp16 vs fp32, 256x256, batch 32, base_filters=64, depth=4, and with
# torch.compile). Prints the figures; logs and JSON go to $OUT (or bench-results/).
#
# The GPU machines this project is lent have torch, safetensors, click, numpy, Pillow, pytest
# and hypothesis installed but no network, so the checkout is used in place (PYTHONPATH)
# rather than pip-installed.
#
#   bash tools/gpu_check.sh            (about 3 minutes on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=$(command -v python3)

"$python" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "safetensors", "click", "numpy", "PIL", "pytest", "hypothesis")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}; pip install them first")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here; run this on a machine with an NVIDIA GPU")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== CUDA tests"
set -o pipefail
"$python" -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$out/gpu-tests.log"

echo "== predictor benchmark"
"$python" tools/bench.py --only predict --device cuda --predict-config 64,4 --batch 32 --repeats 3 \
    --compile --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log"
