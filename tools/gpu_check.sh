#!/usr/bin/env bash
# One prepared check of gmae on a GPU machine, in stages that each have a time box; OUT/report.json is rewritten
# as each stage ends (a run cut short keeps what it measured), each stage's output is in OUT/logs/.
#
#   tools/gpu_check.sh OUT                                     # one CUDA GPU: the default stages
#   GPU_CHECK_STAGES=preflight,bench tools/gpu_check.sh OUT    # the named stages only (in the order below)
#   tools/gpu_check.sh OUT --device cpu                        # smoke mode: the same stages, tiny, on the CPU
#                                                                # (tests/test_gpu_check.py)
#
# Stages (docs/gpu.md has each one's budget on an H100); the default is preflight,tests,bench,pretrain, and every
# run starts with the preflight, named or not:
#   preflight      (20 s) CUDA available to torch, a C compiler and Python.h (triton builds a launcher for each
#                  kernel with them), pytest importable, one tiny Triton kernel compiled and launched; the versions
#                  of everything. A missing piece stops the run with one line saying what is missing.
#   tests          (150 s) the GPU test files, tests/test_render_triton.py (triton vs torch, values and every
#                  gradient, and the parity at GMAE's shapes: B 64, k 256 and 4096, 224 px) and
#                  tests/test_render_gsplat.py (skipped without gsplat): one pytest run and junit file per file
#   bench          (120 s) gmae bench --json: render forward+backward ms per backend (render_backends) and the
#                  GMAE/MAE step ratio at ViT-B/16 (step_ratio_base224: bf16, k = 256 as 256x1 and 64x4)
#   pretrain       (90 s) 300 steps of the tiny preset on CUDA with the triton backend: a finite, falling loss
#   bench_compile  (optional, 300 s) the step ratio with --compile: three ViT-B models compiled cold, minutes
#   gsplat         (optional, 120 s) a prebuilt (binary) gsplat wheel brought along in GSPLAT_WHEELS, installed
#                  and imported without building, its parity test and render_backends with it. A wheel without
#                  compiled CUDA code would build gsplat's sources on first use (minutes): it is not installed.
#
# Environment: PYTHON (default python3), GPU_CHECK_STAGES, GPU_CHECK_BUDGET_S (default 900: the whole run),
# GSPLAT_WHEELS (default .whl/: gsplat's binary wheel, and the wheels of any package the machine lacks, which are
# installed behind the machine's own before the first stage: the machine cannot download).
set -uo pipefail

ALL_STAGES=(preflight tests bench pretrain bench_compile gsplat)
DEFAULT_STAGES=preflight,tests,bench,pretrain

usage() { echo "usage: [GPU_CHECK_STAGES=$DEFAULT_STAGES] $0 OUT [--device cuda|cpu]" >&2; exit 2; }
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
SELECTED=${GPU_CHECK_STAGES:-$DEFAULT_STAGES}
case ",$SELECTED," in *,preflight,*) ;; *) SELECTED=preflight,$SELECTED ;; esac
for name in ${SELECTED//,/ }; do
    case " ${ALL_STAGES[*]} " in
        *" $name "*) ;;
        *) echo "GPU_CHECK_STAGES: no stage '$name'; the stages are ${ALL_STAGES[*]} (comma-separated)" >&2; exit 2 ;;
    esac
done
selected() { case ",$SELECTED," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_BUDGET_S:-900}
DEADLINE=$((SECONDS + BUDGET))
WHEELS=${GSPLAT_WHEELS:-$ROOT/.whl}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gmae-gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
: > "$OUT/stages.tsv"
rm -f "$OUT/report.json"
cd "$ROOT" || exit 2

TEST_FILES=(tests/test_render_triton.py tests/test_render_gsplat.py)
if [ "$DEVICE" = cpu ]; then
    # Smoke mode: the kernels run in Triton's CPU interpreter; every stage tiny.
    export TRITON_INTERPRET=1
    BENCH_SHAPE=(--render-batch 1 --render-k 8 --render-size 16 --batch-size 2 --repeats 1)
    BENCH_EAGER=(render_backends)
    BENCH_COMPILED=(step_ratio_tiny)
    TEST_K="dispatch_through_rasterize and interpreter"
    PRETRAIN=(--device cpu --img-size 16 --patch-size 8 -k 4 --batch-size 2 --steps 6)
    # torch.compile of three models takes minutes on a CPU: the smoke run checks the plumbing only
    COMPILE_ENV=(TORCH_COMPILE_DISABLE=1)
    declare -A BOX=([preflight]=60 [tests]=180 [bench]=180 [pretrain]=180 [bench_compile]=180 [gsplat]=60)
else
    BENCH_SHAPE=()
    BENCH_EAGER=(render_backends step_ratio_base224)
    BENCH_COMPILED=(step_ratio_base224)
    TEST_K=""
    PRETRAIN=(--device cuda --steps 300)
    COMPILE_ENV=()
    # seconds; docs/gpu.md has the budget table these come from
    declare -A BOX=([preflight]=20 [tests]=150 [bench]=120 [pretrain]=90 [bench_compile]=300 [gsplat]=120)
fi

report() { "$PY" tools/gpu_check_report.py report "$OUT" "$DEVICE" "$SELECTED" > /dev/null 2>> "$OUT/logs/report.log"; }

# stage NAME BUDGET_S CMD...: run CMD with its output in logs/NAME.log, for at most BUDGET_S seconds (less if the
# whole run's deadline comes first); its status and time go to stages.tsv, and report.json is rewritten.
stage() {
    local name=$1 budget=$2; shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >> "$OUT/stages.tsv"
        echo "[$name] skipped: no time left" | tee "$OUT/logs/$name.log"
        report
        return 1
    fi
    echo "[$name] up to ${budget}s: $*"
    local t0=$SECONDS
    timeout -k 10 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$budget" >> "$OUT/stages.tsv"
    echo "[$name] exit $rc after $((SECONDS - t0))s"
    report
    return $rc
}

# Wheels brought along (the machine cannot download): those of packages the machine lacks (pytest, ...),
# installed now, behind the machine's own; gsplat's only in its stage.
DEPS="$SCRATCH/deps"
# shellcheck disable=SC2046  # one wheel path per word
DEP_WHEELS=$("$PY" tools/gpu_check_report.py missing $(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/gsplat-'))
if [ -n "$DEP_WHEELS" ]; then
    # shellcheck disable=SC2086  # one wheel path per word
    "$PY" -m pip install --no-index --no-deps --target "$DEPS" $DEP_WHEELS > "$OUT/logs/wheels.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:$DEPS" PATH="$PATH:$DEPS/bin"
fi

# every run starts with it (seconds): a machine that cannot run the check stops here
if selected preflight; then
    if ! stage preflight "${BOX[preflight]}" "$PY" tools/gpu_check_preflight.py "$OUT" "$DEVICE"; then
        grep '^preflight: ' "$OUT/logs/preflight.log" >&2 || tail -3 "$OUT/logs/preflight.log" >&2
        echo "stopped: the machine cannot run the check (report: $OUT/report.json)" >&2
        exit 1
    fi
fi

if selected tests; then
    # one pytest run per file, each with its own junit: a file cut off by the time box loses only its own results
    mkdir -p "$OUT/logs/junit"
    stage tests "${BOX[tests]}" env OUT_DIR="$OUT" PY="$PY" TEST_K="$TEST_K" bash -c 'rc=0
        for f in "$@"; do
            echo "== $f"
            "$PY" -m pytest -q -o addopts="" -p no:cacheprovider --junitxml="$OUT_DIR/logs/junit/$(basename "$f" .py).xml" \
                ${TEST_K:+-k "$TEST_K"} "$f"
            c=$?; [ $c -eq 0 ] || [ $c -eq 5 ] || rc=$c  # 5: nothing selected
        done
        exit $rc' _ "${TEST_FILES[@]}"
fi

if selected bench; then
    stage bench "${BOX[bench]}" sh -c '"$@" > "'"$OUT"'/bench.json"' _ "$PY" -m gmae bench --device "$DEVICE" --json \
        --only "${BENCH_EAGER[@]}" --precision bf16 "${BENCH_SHAPE[@]}"
fi

if selected pretrain; then
    stage pretrain "${BOX[pretrain]}" "$PY" -m gmae pretrain --render-backend triton --out "$OUT/pretrain" --quiet \
        --checkpoint-every 100000 "${PRETRAIN[@]}"
fi

if selected bench_compile; then
    stage bench_compile "${BOX[bench_compile]}" env "${COMPILE_ENV[@]}" sh -c '"$@" > "'"$OUT"'/bench_compile.json"' _ \
        "$PY" -m gmae bench --device "$DEVICE" --json --only "${BENCH_COMPILED[@]}" --precision bf16 --compile \
        "${BENCH_SHAPE[@]}"
fi

if selected gsplat; then
    # a binary wheel (a platform tag, not "any"): its CUDA code is compiled already
    GSPLAT_WHEEL=$(ls "$WHEELS"/gsplat-*.whl 2>/dev/null | grep -v -- '-any\.whl$' | head -1)
    if [ -z "$GSPLAT_WHEEL" ]; then
        echo "no prebuilt gsplat wheel in $WHEELS ($(ls "$WHEELS"/gsplat-*.whl 2>/dev/null | xargs -r -n1 basename \
            | tr '\n' ' ')): a wheel without compiled CUDA code builds gsplat on first use, minutes; not in this check" \
            > "$OUT/logs/gsplat.log"
        printf '%s\t%s\t%s\t%s\n' gsplat "no-wheel" 0 0 >> "$OUT/stages.tsv"
        report
    else
        SITE="$SCRATCH/site"
        echo "wheel $GSPLAT_WHEEL" > "$OUT/logs/gsplat_install.log"
        "$PY" -m pip install --no-index --no-deps --target "$SITE" "$GSPLAT_WHEEL" >> "$OUT/logs/gsplat_install.log" 2>&1
        export PYTHONPATH="$PYTHONPATH:$SITE"
        GSPLAT_END=$((SECONDS + BOX[gsplat]))
        # gsplat loads its compiled module when gsplat.cuda._backend is imported; were it to build instead, the
        # time box ends it
        if stage gsplat $((GSPLAT_END - SECONDS)) "$PY" -c "
import time; t = time.time()
from gsplat.cuda._backend import _C
if _C is None:
    raise SystemExit('error: gsplat has no CUDA extension (the wheel has no compiled module for this machine)')
print(f'gsplat_import_s {time.time() - t:.1f}')"; then
            mkdir -p "$OUT/logs/junit"
            stage gsplat_tests $((GSPLAT_END - SECONDS)) "$PY" -m pytest -q -o addopts="" -p no:cacheprovider \
                --junitxml="$OUT/logs/junit/test_render_gsplat.xml" tests/test_render_gsplat.py
            stage gsplat_bench $((GSPLAT_END - SECONDS)) sh -c '"$@" > "'"$OUT"'/bench_gsplat.json"' _ "$PY" -m gmae \
                bench --device "$DEVICE" --json --only render_backends "${BENCH_SHAPE[@]}"
        fi
    fi
fi

"$PY" tools/gpu_check_report.py report "$OUT" "$DEVICE" "$SELECTED"
