#!/usr/bin/env bash
# Everything issue 6 measures on a lent GPU, in one call (about 9 minutes at most):
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#
# Stages (STAGES, each with its own time limit; a stage cut short keeps what it measured):
#   bench     seconds per step, memory, projections, a check against fp32 eager and a kernel profile
#             (--profile) per configuration: DARTS first (the ratios' base), the defaults eager, CUDA
#             graphs recorded from the eager kernels (compile: capture; built in about one eager step),
#             the same with each source's ops on 4 CUDA streams (+streams: graphs that branch), then
#             channels_last in fp32 (cuDNN's depthwise and channels-last batch-norm kernels instead
#             of the NCHW ones: the search cells' batch norms have no affine weights, so torch never
#             hands them to cuDNN, and its NCHW statistics kernels run one block per channel, 4 to 16
#             blocks after the bottleneck);
#   arch      (run first: its figures decide the targets) the same measurements, settled at a searched
#             architecture instead of the initial state (random for entrannas; every op on every edge
#             for dst): DARTS_V2 (mostly separable convs) for the top-2 modes,
#             benchmarks/genotypes/dst-digits.json (2 to 5 inputs per node) for dst; the warm-up
#             epochs are projected at the initial state; fp32 with channels_last only;
#   churn     the same without --frozen-arch: the derived architecture changes while timing (random
#             data: the arch gradient is noise), so each new structure runs eagerly or is recorded
#             anew, except with masked Transit-cells (one structure whatever the mask);
#   tests     tests/test_compiled.py on the GPU (TEST_RUNS: "capture:seconds" or "backend/mode:seconds");
#   search    a 3-epoch search through the CLI with recorded CUDA graphs (SEARCH_COMPILE);
#   inductor  inductor's code generation with CUDA graphs (slow to build: session 3's 380 s did not finish
#             one configuration, so it is left out of the default STAGES).
# Results go under $OUT (at most 8 files come back): bench.json, arch.json, churn.json (inductor.json)
# (written after each configuration), one log with their tables, the test logs, the search (one archive), the
# environment with each stage's start time. Ray is not needed; the device's image has pytest and
# tqdm (seen on the H200 machines, 2026-11-28).
# DEVICE, SIZE, SEARCH_SIZE, BACKEND, CONFIGS, INDUCTOR_CONFIGS and the limits exist for a dry run
# on the CPU (it checks the script, not the figures; capture, and bf16 with channels_last, are
# refused there):
#   DEVICE=cpu SIZE="--layers 3 --channels 4 --batch-size 8 --image-size 8" BACKEND=aot_eager \
#   SEARCH_SIZE="--set layers=3 --set init_channels=4" SEARCH_COMPILE=off PY=.venv/bin/python \
#   OUT=/tmp/dry CONFIGS="darts entrannas dst+cl entrannas+cudagraphs" INDUCTOR_CONFIGS="dst+graphs" \
#   CHURN_CONFIGS="entrannas entrannas+masked" ARCH_CONFIGS="darts dst entrannas+cudagraphs" \
#   STAGES="bench arch churn tests search inductor" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:---layers 8 --channels 16 --batch-size 256 --image-size 32}
SEARCH_SIZE=${SEARCH_SIZE:-}
BACKEND=${BACKEND:-inductor}
STAGES=${STAGES:-bench arch churn tests search}
CONFIGS=${CONFIGS:-darts entrannas dst entrannas+capture+bf16+cl dst+capture+bf16+cl \
entrannas+capture+bf16+cl+streams dst+capture+bf16+cl+streams \
entrannas+masked+capture+bf16+cl entrannas+capture dst+capture entrannas+cl dst+cl entrannas+capture+cl \
dst+capture+cl}
BENCH_LIMIT=${BENCH_LIMIT:-190}
ARCH=${ARCH:-DARTS_V2 dst=benchmarks/genotypes/dst-digits.json}
ARCH_CONFIGS=${ARCH_CONFIGS:-darts entrannas+capture+bf16+cl dst+capture+bf16+cl dst+capture+bf16+cl+streams \
entrannas+capture+cl dst+capture+cl dst}
ARCH_LIMIT=${ARCH_LIMIT:-120}
CHURN_CONFIGS=${CHURN_CONFIGS:-entrannas+bf16+cl entrannas+capture+bf16+cl entrannas+masked+capture+bf16+cl}
CHURN_LIMIT=${CHURN_LIMIT:-50}
INDUCTOR_CONFIGS=${INDUCTOR_CONFIGS:-entrannas+graphs+bf16+cl dst+graphs+bf16+cl}
INDUCTOR_LIMIT=${INDUCTOR_LIMIT:-90}
PROFILE=${PROFILE:-2}
TEST_RUNS=${TEST_RUNS:-capture:100}
TESTS=${TESTS:-tests/test_compiled.py}
SEARCH_COMPILE=${SEARCH_COMPILE:-capture}
mkdir -p "$OUT"
PY=${PY:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/entrannas-inductor}
{ date -u; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1

stage() { echo "stage $* at $(date -u +%T)" >> "$OUT/environment.txt"; }
wanted() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

bench() {   # bench NAME LIMIT "BENCH FLAGS" CONFIGS...
    local name=$1 limit=$2 flags=$3
    shift 3
    stage "$name"
    # perf_hints says why inductor skipped CUDA graphs, if it did (left out where this torch lacks it).
    local logs=perf_hints
    TORCH_LOGS=$logs "$PY" -c "import torch" 2>/dev/null || logs=
    echo "=== stage $name" >> "$OUT/bench.log"   # one log for every bench stage (few files come back)
    TORCH_LOGS=$logs timeout "$limit" "$PY" -m entrannas.bench --configs "$@" $SIZE $flags \
        --compile-backend "$BACKEND" --device "$DEVICE" --out "$OUT/$name.json" > /dev/null 2>> "$OUT/bench.log"
    echo "$name exit status $?" >> "$OUT/bench.log"
}
SETTLED="--steps 5 --repeats 3 --warmup 4 --frozen-arch --check --profile $PROFILE"
# The settled search first: its figures decide the targets, so a later stage cut short cannot cost them.
wanted arch && bench arch "$ARCH_LIMIT" "$SETTLED --arch $ARCH" $ARCH_CONFIGS
wanted bench && bench bench "$BENCH_LIMIT" "$SETTLED" $CONFIGS
wanted churn && bench churn "$CHURN_LIMIT" "--steps 10 --repeats 3 --warmup 4" $CHURN_CONFIGS

# 2. The compiled super-net equals the eager one on the GPU, per setting in TEST_RUNS.
if wanted tests; then
    for run in $TEST_RUNS; do
        stage "tests $run"
        compile=${run%:*}
        [ "$DEVICE" = cpu ] && compile=aot_eager/default   # the dry run: no CUDA graphs on the CPU
        log=${run%:*}
        log="$OUT/tests-$DEVICE-${log//\//-}.txt"
        ENTRANNAS_TEST_DEVICE=$DEVICE ENTRANNAS_TEST_COMPILE=$compile timeout "${run##*:}" \
            "$PY" -m pytest -q -p no:cacheprovider $TESTS > "$log" 2>&1
        echo "pytest exit status $?" >> "$log"
    done
fi

# 3. A short search through the CLI with CUDA graphs: the epoch loop, the evaluation pass, a smaller
#    last batch, the records (history.jsonl counts graphed and eager passes per epoch).
if wanted search; then
    stage search
    rm -rf /tmp/entrannas-search /tmp/search.log
    timeout 60 "$PY" -m entrannas search --set dataset=synthetic --set subset_fraction=0.2 --set epochs=3 \
        --set arch_warmup_epochs=1 \
        --set compile="$SEARCH_COMPILE" --set compile_after=2 \
        $SEARCH_SIZE --set device="$DEVICE" --out /tmp/entrannas-search > /tmp/search.log 2>&1
    echo "search exit status $?" >> /tmp/search.log
    # the run and its log in one file; the checkpoint is not needed back
    tar -czf "$OUT/search.tar.gz" --exclude='*.pt' -C /tmp entrannas-search search.log
fi
wanted inductor && bench inductor "$INDUCTOR_LIMIT" "$SETTLED" $INDUCTOR_CONFIGS
stage done
grep -h -A16 -e "^=== stage" -e "^config " "$OUT"/bench.log 2>/dev/null
tail -n 4 "$OUT"/tests-*.txt /tmp/search.log 2>/dev/null
