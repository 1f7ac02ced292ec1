#!/usr/bin/env bash
# One prepared check of gmae on a GPU machine, in at most 8 minutes; writes OUT/report.json and OUT/logs/.
#
#   scripts/gpu_check.sh OUT                 # on a machine with one CUDA GPU
#   scripts/gpu_check.sh OUT --device cpu    # smoke mode: the same stages, tiny, on the CPU (tests/test_gpu_check.py)
#
# Stages, in order, each time-boxed (a stage that runs out of time is recorded as timed out, not fatal):
#   1. environment: GPU, torch, CUDA, triton (and nvcc) versions
#   2. the suite's GPU-marked tests (pytest -m gpu), which include triton vs torch parity at GMAE shapes
#      (B 64, k 256 and 4096, 224 px)
#   3. gmae bench --device cuda --json: render forward+backward ms per backend (render_backends) and the
#      GMAE/MAE step ratio at ViT-B/16 (step_ratio_base224: bf16, k = 256 as 256x1 and 64x4), without and
#      with --compile
#   4. a 300-step tiny pre-training on CUDA with the triton backend: a finite, falling loss, and images/s
#   5. last, in what is left of 240 s: gsplat built from a wheel brought along (the machine cannot download:
#      GSPLAT_WHEELS, default .whl/, holds gsplat's wheel and any others the machine lacks: its dependencies,
#      ninja, gmae's own; they are installed behind the machine's packages) and its parity test; the build's
#      time or its first error line; then, if time is left, render_backends again with gsplat among them
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 480: the whole run), GSPLAT_WHEELS.
set -uo pipefail

usage() { echo "usage: $0 OUT [--device cuda|cpu]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda
while [ $# -gt 0 ]; do
    case $1 in
        --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
        *) usage ;;
    esac
done
case $DEVICE in cuda|cpu) ;; *) echo "--device must be cuda or cpu; got $DEVICE" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET))
WHEELS=${GSPLAT_WHEELS:-$ROOT/.whl}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gmae-gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
: > "$OUT/stages.tsv"
cd "$ROOT" || exit 2

if [ "$DEVICE" = cpu ]; then
    # Smoke mode: the kernels run in Triton's CPU interpreter; every stage tiny.
    export TRITON_INTERPRET=1
    BENCH_SHAPE=(--render-batch 1 --render-k 8 --render-size 16 --batch-size 2 --repeats 1)
    BENCH_EAGER=(render_backends)
    BENCH_COMPILED=(step_ratio_tiny)
    TESTS=(tests/test_render_triton.py -k "dispatch_through_rasterize and interpreter")
    PRETRAIN=(--device cpu --img-size 16 --patch-size 8 -k 4 --batch-size 2 --steps 6)
    # torch.compile of three models takes minutes on a CPU: the smoke run checks the plumbing only
    COMPILE_ENV=(TORCH_COMPILE_DISABLE=1)
    # budgets (s): environment, tests, bench, bench --compile, pretrain; gsplat gets the rest (at most 240)
    B_ENV=60; B_TESTS=120; B_BENCH=180; B_COMPILE=180; B_PRETRAIN=180
else
    BENCH_SHAPE=()
    BENCH_EAGER=(render_backends step_ratio_base224)
    BENCH_COMPILED=(step_ratio_base224)
    TESTS=(-m gpu tests/)
    PRETRAIN=(--device cuda --steps 300)
    COMPILE_ENV=()
    # 240 s for stages 1-4, so that gsplat's 240 s fit in 8 minutes; what a stage leaves goes to the next ones
    B_ENV=15; B_TESTS=90; B_BENCH=45; B_COMPILE=55; B_PRETRAIN=35
fi

# stage NAME BUDGET_S CMD...: run CMD with its output in logs/NAME.log, for at most BUDGET_S seconds (less if the
# whole run's deadline comes first, 10 s kept for the report); its status and time go to stages.tsv.
# planned NAME BUDGET_S CMD...: the same, for stages 1-4, whose budgets add up: a stage may also use what the ones
# before it left unused, so that a quick stage gives its time to a slow one.
PLANNED=$SECONDS
planned() {
    local name=$1; PLANNED=$((PLANNED + $2)); shift 2
    stage "$name" $((PLANNED - SECONDS)) "$@"
}
stage() {
    local name=$1 budget=$2; shift 2
    local left=$((DEADLINE - SECONDS - 10))
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >> "$OUT/stages.tsv"
        echo "[$name] skipped: no time left" | tee "$OUT/logs/$name.log"
        return 1
    fi
    echo "[$name] up to ${budget}s: $*"
    local t0=$SECONDS
    timeout -k 10 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$budget" >> "$OUT/stages.tsv"
    echo "[$name] exit $rc after $((SECONDS - t0))s"
    return $rc
}

# Wheels brought along (the machine cannot download): those of packages the machine lacks (pytest, numba, ... ;
# ninja and gsplat's dependencies), installed now; gsplat's own in stage 5.
DEPS="$SCRATCH/deps"
# shellcheck disable=SC2046  # one wheel path per word
DEP_WHEELS=$("$PY" scripts/gpu_check_report.py missing $(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/gsplat-'))
if [ -n "$DEP_WHEELS" ]; then
    # shellcheck disable=SC2086  # one wheel path per word
    "$PY" -m pip install --no-index --no-deps --target "$DEPS" $DEP_WHEELS > "$OUT/logs/wheels.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:$DEPS" PATH="$PATH:$DEPS/bin"
fi

# 1. environment
planned environment "$B_ENV" "$PY" scripts/gpu_check_report.py environment "$OUT/environment.json"

# 2. GPU-marked tests (smoke: one interpreted triton test)
planned tests "$B_TESTS" "$PY" -m pytest -q -o addopts="" -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/logs/tests.xml" "${TESTS[@]}"

# 3. bench, eager then compiled
planned bench "$B_BENCH" sh -c '"$@" > "'"$OUT"'/bench.json"' _ "$PY" -m gmae bench --device "$DEVICE" --json \
    --only "${BENCH_EAGER[@]}" --precision bf16 "${BENCH_SHAPE[@]}"
planned bench_compile "$B_COMPILE" env "${COMPILE_ENV[@]}" sh -c '"$@" > "'"$OUT"'/bench_compile.json"' _ "$PY" -m gmae \
    bench --device "$DEVICE" --json --only "${BENCH_COMPILED[@]}" --precision bf16 --compile "${BENCH_SHAPE[@]}"

# 4. tiny pre-training with the triton backend
planned pretrain "$B_PRETRAIN" "$PY" -m gmae pretrain --render-backend triton --out "$OUT/pretrain" --quiet \
    --checkpoint-every 100000 "${PRETRAIN[@]}"

# 5. gsplat from a wheel, built and tested in what is left of 240 s
GSPLAT_WHEEL=$(ls "$WHEELS"/gsplat-*.whl 2>/dev/null | head -1)
if [ -z "$GSPLAT_WHEEL" ]; then
    echo "no gsplat wheel in $WHEELS" > "$OUT/logs/gsplat_build.log"
    printf '%s\t%s\t%s\t%s\n' gsplat_build "no-wheel" 0 0 >> "$OUT/stages.tsv"
else
    GSPLAT_END=$((SECONDS + 240))
    SITE="$SCRATCH/site"
    export TORCH_EXTENSIONS_DIR="$SCRATCH/torch_extensions"
    CUDA_HOME=${CUDA_HOME:-$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)}
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    # CUDA 13 moved cub/ and thrust/ to include/cccl; only this GPU's architecture; one compile job per core
    export CPATH="$CUDA_HOME/include/cccl${CPATH:+:$CPATH}"
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ "$DEVICE" = cuda ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
        export TORCH_CUDA_ARCH_LIST
    fi
    echo "wheel $GSPLAT_WHEEL CUDA_HOME=$CUDA_HOME CPATH=$CPATH MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}" \
        > "$OUT/logs/gsplat_env.log"
    "$PY" -m pip install --no-index --no-deps --target "$SITE" "$GSPLAT_WHEEL" >> "$OUT/logs/gsplat_env.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:$SITE"
    # gsplat compiles its CUDA kernels when gsplat.cuda._backend is first imported
    if stage gsplat_build $((GSPLAT_END - SECONDS)) "$PY" -c "
import time; t = time.time()
from gsplat.cuda._backend import _C
if _C is None:
    raise SystemExit('error: gsplat has no CUDA extension (no CUDA toolkit, or its build failed: see above)')
print(f'gsplat_build_s {time.time() - t:.1f}')"; then
        stage gsplat_tests $((GSPLAT_END - SECONDS)) "$PY" -m pytest -q -o addopts="" -p no:cacheprovider \
            --junitxml="$OUT/logs/gsplat_tests.xml" tests/test_render_gsplat.py
        # and, if time is left, its render time beside triton's and torch's
        stage gsplat_bench $((GSPLAT_END - SECONDS)) sh -c '"$@" > "'"$OUT"'/bench_gsplat.json"' _ "$PY" -m gmae bench \
            --device "$DEVICE" --json --only render_backends "${BENCH_SHAPE[@]}"
    fi
fi

"$PY" scripts/gpu_check_report.py report "$OUT" "$DEVICE" "$GSPLAT_WHEEL"
