#!/usr/bin/env bash
# Everything issue 6 measures on a lent GPU, in one call (about 8 minutes at most):
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=480)
#
# Results go under $OUT (at most 8 files come back): the bench JSON (written after each
# configuration, so a stage cut short keeps what it measured), its log and table, the compiled-path
# tests run on the GPU, the short search (one archive), the environment and each stage's start time.
# Ray is not needed; the device's image has pytest and tqdm (for a machine without them,
# benchmarks/device_site.sh copies them into .device/site: carry ".device").
# DEVICE, SIZE, SEARCH_SIZE, BACKEND and CONFIGS exist for a dry run on the CPU (it checks the
# script, not the figures; the compiled tests may reach their time limits there; bf16 with
# channels_last is refused on the CPU):
#   DEVICE=cpu SIZE="--layers 3 --channels 4 --batch-size 8 --image-size 8" BACKEND=aot_eager \
#   SEARCH_SIZE="--set layers=3 --set init_channels=4" PY=.venv/bin/python OUT=/tmp/dry \
#   CONFIGS="darts entrannas dst entrannas+cudagraphs+bf16 dst+graphs+bf16" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:---layers 8 --channels 16 --batch-size 256 --image-size 32}
SEARCH_SIZE=${SEARCH_SIZE:-}
CONFIGS=${CONFIGS:-darts entrannas dst entrannas+cudagraphs+bf16+cl dst+cudagraphs+bf16+cl \
entrannas+cudagraphs dst+cudagraphs entrannas+bf16+cl dst+bf16+cl darts+bf16+cl \
entrannas+graphs+bf16+cl dst+graphs+bf16+cl}
SEARCH_BACKEND=${SEARCH_BACKEND:-cudagraphs}
# A shorter lease: STAGES="bench tests", BENCH_LIMIT (seconds), TEST_RUNS ("backend/mode:seconds ..."),
# TESTS (pytest arguments).
STAGES=${STAGES:-bench tests search}
BENCH_LIMIT=${BENCH_LIMIT:-300}
TEST_RUNS=${TEST_RUNS:-cudagraphs/default:45 $BACKEND/reduce-overhead:60}
TESTS=${TESTS:-tests/test_compiled.py}
BACKEND=${BACKEND:-inductor}
mkdir -p "$OUT"
PY=${PY:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .device/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.device/site"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/entrannas-inductor}
{ date -u; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1

stage() { echo "$(date -u +%T) $*" >> "$OUT/stages.txt"; }
wanted() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

# 1. Seconds per step, memory and projections, most wanted first (a cut-short stage keeps what it
#    measured): the DARTS configuration (the ratio's base), the defaults eager, CUDA graphs of the
#    traced graphs (quick to build) in bf16 and fp32, the eager fast paths, then inductor (slow to build).
if wanted bench; then
    stage bench
    # perf_hints says why inductor skipped CUDA graphs, if it did (left out where this torch lacks it).
    LOGS=perf_hints
    TORCH_LOGS=$LOGS "$PY" -c "import torch" 2>/dev/null || LOGS=
    TORCH_LOGS=$LOGS timeout "$BENCH_LIMIT" "$PY" -m entrannas.bench \
        --configs $CONFIGS $SIZE --steps 5 --repeats 3 --warmup 4 --compile-backend "$BACKEND" \
        --frozen-arch --check --device "$DEVICE" --out "$OUT/bench.json" > /dev/null 2> "$OUT/bench.log"
    echo "bench exit status $?" >> "$OUT/bench.log"
fi

# 2. The compiled super-net equals the eager one on the GPU, per backend/mode in TEST_RUNS.
if wanted tests; then
    for run in $TEST_RUNS; do
        stage "tests $run"
        compile=${run%:*}
        log="$OUT/tests-compiled-$DEVICE-${compile//\//-}.txt"
        [ "$DEVICE" = cpu ] && compile=aot_eager/default   # the dry run: no CUDA graphs on the CPU
        ENTRANNAS_TEST_DEVICE=$DEVICE ENTRANNAS_TEST_COMPILE=$compile timeout "${run##*:}" \
            "$PY" -m pytest -q -p no:cacheprovider $TESTS > "$log" 2>&1
        echo "pytest exit status $?" >> "$log"
    done
fi

# 3. A short search through the CLI with CUDA graphs: the epoch loop, the evaluation pass, a smaller
#    last batch, the records (history.jsonl counts compiled and eager passes per epoch).
if wanted search; then
    stage search
    rm -rf /tmp/entrannas-search
    SEARCH_COMPILE=reduce-overhead
    [ "$SEARCH_BACKEND" = inductor ] || SEARCH_COMPILE=default
    timeout 45 "$PY" -m entrannas search --set dataset=synthetic --set epochs=3 --set arch_warmup_epochs=1 \
        --set compile="$SEARCH_COMPILE" --set compile_backend="$SEARCH_BACKEND" --set compile_after=2 \
        $SEARCH_SIZE --set device="$DEVICE" --out /tmp/entrannas-search > "$OUT/search.log" 2>&1
    echo "search exit status $?" >> "$OUT/search.log"
    # the checkpoint is not needed back
    tar -czf "$OUT/search.tar.gz" --exclude='*.pt' -C /tmp entrannas-search
fi
stage done
tail -n 12 "$OUT"/bench.log "$OUT"/tests-compiled-*.txt "$OUT"/search.log 2>/dev/null
