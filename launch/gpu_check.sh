#!/usr/bin/env bash
# One short GPU slot (one H100/H200, a fresh machine with this repository) -> the numbers docs/benchmarks.md lacks.
#   bash launch/gpu_check.sh              install from constraints.txt, run parts a-f, write their rows into the GPU
#                                         section of docs/benchmarks.md (results and logs: runs/gpu_check/<date>/)
#   bash launch/gpu_check.sh --dry-run    the plan: each part's command and time cap, and the total (<= 600 s)
#   bash launch/gpu_check.sh --cpu-smoke  every part at toy size on the CPU (CI); writes OUT/benchmarks.md, not the page
# Other flags (--only a,c --doc PAGE --out DIR) go to `python -m mimtrain.bench.gpu_check`, which holds the plan.
# --no-install: use the existing .venv as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
install=1
args=()
for a in "$@"; do
    case "$a" in
        --no-install) install=0 ;;
        --dry-run | --cpu-smoke) install=0; args+=("$a") ;;  # CI and the plan use the environment they run in
        *) args+=("$a") ;;
    esac
done
if [ "$install" = 1 ] && [ ! -f "$VENV/.installed" ]; then
    t0=$(date +%s)
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
    touch "$VENV/.installed"
    echo "[gpu_check] install took $(( $(date +%s) - t0 )) s"
fi
PY=${PYTHON:-$VENV/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m mimtrain.bench.gpu_check "${args[@]}"
