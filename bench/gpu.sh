#!/usr/bin/env bash
# The CUDA checks of one lent GPU in one command (<= 8 min on one H100): the CUDA-relevant tests,
# distill tokens/s and peak memory 1.5B -> 0.5B (real shapes, random weights) against TRL, and the
# safety score's batched speed against a single-stream loop. Numbers: results/gpu/*.json
# (also copied to $OUT when set, with the log). What each arm does: bench/gpu.py's docstring.
#
#   bash bench/gpu.sh --wheels      # here, with a network: packages the GPU machine may lack -> .whl/
#   bash bench/gpu.sh               # there (offline), from the repository root; .whl/ carried along
#   bash bench/gpu.sh --quick --device cpu   # tiny shapes on any CPU (< 2 min)
#
# Nothing downloads on the GPU machine. Python: $PYTHON, else the first of .venv/bin/python,
# python3, python whose torch sees CUDA (else the first with torch at all). Wheels in .whl/ are
# installed offline into a temp folder put first on PYTHONPATH; slmkit itself runs from src/.
# Something missing (torch with CUDA, transformers, TRL) is one line; the arms that can still run
# do, and the exit status is non-zero.
set -u
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-480}   # seconds for everything; bench/gpu.py gets the rest after set-up

# transformers >= 5.24 (pyproject), TRL 1.16 and what they need beyond the GPU image's packages
# (the image had transformers 5.17 and huggingface_hub 1.33, no TRL or datasets: KINDS.md, 2026-11)
WHEELS="transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 regex==2026.12.2 trl==1.16.0
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 httpx2==2.17.0 httpcore2==2.17.0
        truststore==0.10.5 hf-xet==1.8.0 click==8.5.1 tomlkit==0.15.3"

if [ "${1:-}" = "--wheels" ]; then
    mkdir -p .whl
    exec "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $WHEELS
fi

start=$(date +%s)
pick_python() {
    local fallback=""
    for py in ${PYTHON:-} .venv/bin/python python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        case "$("$py" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" in
            True) echo "$py"; return;;
            False) [ -z "$fallback" ] && fallback=$py;;
        esac
    done
    echo "$fallback"
}
PY=$(pick_python)
if [ -z "$PY" ]; then
    echo "bench/gpu.sh: no python with torch here (set PYTHON=...); nothing ran"
    exit 2
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/slmkit-gpu-site.XXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "bench/gpu.sh: installing .whl/*.whl failed; going on with $PY's own packages"
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

status=0
"$PY" - "$@" <<'EOF' || status=1
import importlib, sys
need = {"torch": None, "transformers": "5.24", "trl": None, "accelerate": None, "pytest": None}
bad = []
for name, least in need.items():
    try:
        v = importlib.import_module(name).__version__
    except Exception as e:
        bad.append(f"{name} missing ({type(e).__name__})"); continue
    if least and tuple(int(x) for x in v.split(".")[:2]) < tuple(int(x) for x in least.split(".")):
        bad.append(f"{name} {v} < {least}")
hint = " (bench/gpu.sh --wheels here, then carry .whl)" if bad else ""
import torch
if not torch.cuda.is_available() and "cpu" not in sys.argv:
    bad.append(f"torch {torch.__version__} sees no CUDA device")
if bad:
    print("bench/gpu.sh: missing: " + "; ".join(bad) + hint)
    sys.exit(1)
EOF

args=("$@")
[ -n "${OUT:-}" ] && args+=(--copy-to "$OUT")
left=$(( BUDGET - ($(date +%s) - start) - 15 ))
log=/dev/null; [ -n "${OUT:-}" ] && log="$OUT/gpu.log"
set -o pipefail
timeout --kill-after=10 $(( left + 10 )) "$PY" bench/gpu.py --budget "$left" "${args[@]}" 2>&1 | tee "$log"
rc=$?
[ $rc -ne 0 ] && status=$rc
echo "bench/gpu.sh: exit $status after $(( $(date +%s) - start )) s"
exit $status
