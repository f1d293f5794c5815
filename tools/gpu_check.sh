#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: the CUDA tests, then the predictor
# benchmark (images/s, fp16 vs fp32, 256x256, batch 32, base_filters=64, depth=4, and with
# torch.compile). Prints the figures; logs and JSON go to $OUT (or bench-results/).
#
# The GPU machines this project is lent have torch, safetensors, click, numpy, Pillow, pytest
# and hypothesis installed but no network, so nothing is pip-installed: the checkout is laid
# out as an installed ckptfmt would be (models/ as ckptfmt.models, the entry points of
# pyproject.toml in a .dist-info) in a temporary folder on PYTHONPATH.
#
#   bash tools/gpu_check.sh            (about 3 minutes on an H100)
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "gpu_check: unknown option '$1'; it takes none (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
mkdir -p "$out"
python=$(command -v python3)
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$python" - "$site" <<'PY'
import os, sys, tomllib
from pathlib import Path
site, root = Path(sys.argv[1]), Path.cwd()
(site / "ckptfmt").mkdir()
for entry in (root / "ckptfmt").iterdir():
    (site / "ckptfmt" / entry.name).symlink_to(entry)
(site / "ckptfmt" / "models").symlink_to(root / "models")
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
info = site / f"ckptfmt-{project['version']}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ckptfmt\nVersion: {project['version']}\n")
lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
         for group, points in project.get("entry-points", {}).items()]
(info / "entry_points.txt").write_text("\n".join(lines))
PY
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

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
