#!/usr/bin/env bash
# The GPU suite on a lent H200 (about 4 minutes; the lease has 15). Prepare HERE first, once:
#   bash benchmarks/gpu/fetch_wheels.sh          # megatron-core + diffusers wheels into .whl/ (8.5 MB)
# then, from the repository root, through the device tool:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=420)
# The lent machine has torch, transformers, einops, safetensors, ...; the carried wheels and the project go
# in with --no-deps on top of its torch. Results: $OUT/gpu_suite.json and $OUT/gpu_suite.log (the table is
# printed last). Extra arguments go to suite.py (e.g. --only peaks train).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
SITE=/tmp/xomni_site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 3
fi
# The project itself, without dependencies, into that torch (falls back to the source tree on the path).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" . \
  || echo "[run.sh] pip install of the project failed: using the source tree"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
python3 -c "import torch, transformers, megatron.core, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', megatron.core.__version__, 'diffusers', diffusers.__version__)" || exit 4
timeout 480 python3 benchmarks/gpu/suite.py --out "$OUT/gpu_suite.json" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
exit "${PIPESTATUS[0]}"
