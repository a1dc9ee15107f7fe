#!/usr/bin/env bash
# Everything issue 6 measures on a lent GPU, in one call (about 9 minutes at most):
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#
# Stages (STAGES, each with its own time limit; a stage cut short keeps what it measured). The
# default ones, in the order they run, are what session 9 left to the GPU: to confirm the avg-pool kernel
# bug and its way around, then to time the settled search again with it.
#   ops       every candidate op in channels_last against NCHW, each against float64, at the
#             super-net's widths after the bottleneck (benchmarks/op_check.py), and whether this
#             device's channels_last avg-pool backward kernel is wrong (channels_last_pool_grad_wrong:
#             expected true with torch 2.11, pytorch/pytorch#188344);
#   diagnose  the settled DST search in fp32 with TF32 off, checked against fp32 eager per layout
#             and per way of running (eager or recorded, NCHW or channels_last), with the parameters
#             and the blocks that hold most of each difference: session 8 measured a weight-gradient
#             cosine of 0.77 for dst+capture+cl (fp32 and bf16 alike); session 9 reproduced 0.773 on
#             the CPU by imitating that kernel (benchmarks/pool_grad_bug.py), and ops.AvgPool now pools
#             around it, so every row should be near 1;
#   arch      the targets, timed with that: the search settled at DARTS_V2 (EnTranNAS) and at
#             benchmarks/genotypes/dst-digits.json (DST), beside the DARTS configuration, and (new in
#             session 17) the validation pass that ends each epoch: the projection with it ("+ valid";
#             on the CPU it adds 25-32%, on session 34's H200 17-20%);
#   tests     tests/test_compiled.py on the GPU (TEST_RUNS: "capture:seconds" or "backend/mode:seconds"),
#             with session 8's fix for the one sync test that failed there (a new derived structure's
#             index tensors copied from pageable memory) and session 9's gradient comparisons (a loss
#             with another gradient per sample; the recorded pass in channels_last against NCHW eager);
#   search    a 3-epoch search through the CLI with recorded CUDA graphs (SEARCH_COMPILE) in
#             channels_last (the pools' way around the kernel, in a whole run);
#   churn     without --frozen-arch: the derived architecture changes while timing (random data: the
#             arch gradient is noise), so each new structure runs eagerly until it is recorded, except
#             with transit auto, where the masked structure's recording runs meanwhile (session 8: masked
#             and recorded 0.104 s a step, sparse and eager under churn 0.202 s), with a search's
#             compile_after (CHURN_AFTER); last, as the least needed.
# Not in the default STAGES: bench (the initial state, in fp32 with CUDA graphs recorded from the
# eager kernels, channels_last and op streams: session 8 did not reach it) and inductor (inductor's
# code generation with CUDA graphs; session 3's 380 s did not finish one configuration).
# PROFILE=2 adds a kernel profile per configuration (slow to collect for DARTS' 21,000 kernels).
# Results go under $OUT (at most 8 files come back): ops.json, diagnose.json, bench.json, churn.json
# (arch.json, inductor.json) (written after each configuration), one log with their tables, the test
# logs, the search (one archive), the environment with each stage's start time. Ray is not needed; the
# device's image has pytest and tqdm (seen on the H200 machines, 2026-11-28).
# DEVICE, SIZE, SEARCH_SIZE, BACKEND, the *_CONFIGS and the limits exist for a dry run on the CPU (it
# checks the script, not the figures; capture, and bf16 with channels_last, are refused there):
#   DEVICE=cpu SIZE="--layers 3 --channels 4 --batch-size 8 --image-size 8" BACKEND=aot_eager \
#   SEARCH_SIZE="--set layers=3 --set init_channels=4" SEARCH_COMPILE=off PY=.venv/bin/python \
#   OUT=/tmp/dry CONFIGS="darts entrannas dst+cl entrannas+cudagraphs" INDUCTOR_CONFIGS="dst+graphs" \
#   CHURN_CONFIGS="entrannas entrannas+auto" ARCH_CONFIGS="darts dst entrannas+cudagraphs" \
#   DIAGNOSE_CONFIGS="dst dst+cl" OPS_BATCH=8 \
#   STAGES="ops diagnose bench arch churn tests search inductor" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:---layers 8 --channels 16 --batch-size 256 --image-size 32}
SEARCH_SIZE=${SEARCH_SIZE:-}
BACKEND=${BACKEND:-inductor}
STAGES=${STAGES:-ops diagnose arch tests search churn}
OPS_BATCH=${OPS_BATCH:-256}
OPS_LIMIT=${OPS_LIMIT:-60}
DIAGNOSE_CONFIGS=${DIAGNOSE_CONFIGS:-dst dst+cl dst+capture dst+capture+cl entrannas+capture+cl}
DIAGNOSE_LIMIT=${DIAGNOSE_LIMIT:-100}
CONFIGS=${CONFIGS:-darts entrannas+capture+cl dst+capture+cl entrannas+capture+cl+streams \
dst+capture+cl+streams entrannas+capture dst+capture entrannas+cl dst+cl}
BENCH_LIMIT=${BENCH_LIMIT:-150}
ARCH=${ARCH:-DARTS_V2 dst=benchmarks/genotypes/dst-digits.json}
ARCH_CONFIGS=${ARCH_CONFIGS:-darts entrannas+capture+bf16+cl+streams dst+capture+bf16+cl+streams \
dst+capture+cl+streams}
ARCH_LIMIT=${ARCH_LIMIT:-180}
CHURN_CONFIGS=${CHURN_CONFIGS:-entrannas+auto+capture+bf16+cl entrannas+capture+bf16+cl}   # auto first: the new one
CHURN_LIMIT=${CHURN_LIMIT:-40}
CHURN_AFTER=${CHURN_AFTER:-3}   # a search's compile_after for capture (the bench's own is 1: build at once)
INDUCTOR_CONFIGS=${INDUCTOR_CONFIGS:-entrannas+graphs+bf16+cl dst+graphs+bf16+cl}
INDUCTOR_LIMIT=${INDUCTOR_LIMIT:-90}
PROFILE=${PROFILE:-0}
TEST_RUNS=${TEST_RUNS:-capture:120}   # session 8 ran 23 tests within 70 s; 31 now (session 19)
TESTS=${TESTS:-tests/test_compiled.py}
SEARCH_COMPILE=${SEARCH_COMPILE:-capture}
SEARCH_LIMIT=${SEARCH_LIMIT:-60}
mkdir -p "$OUT"
PY=${PY:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/entrannas-inductor}
{ date -u; uname -a; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1

stage() { echo "stage $* at $(date -u +%T)" >> "$OUT/environment.txt"; }
wanted() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

logged() {   # logged NAME LIMIT COMMAND...: one stage; its JSON goes to $OUT/NAME.json (the command's
    # --out), its table (stderr) to the one log of every stage (few files come back)
    local name=$1 limit=$2
    shift 2
    stage "$name"
    echo "=== stage $name" >> "$OUT/bench.log"
    timeout "$limit" "$@" > /dev/null 2>> "$OUT/bench.log"
    echo "$name exit status $?" >> "$OUT/bench.log"
}
bench() {   # bench NAME LIMIT "BENCH FLAGS" CONFIGS...
    local name=$1 limit=$2 flags=$3
    shift 3
    # perf_hints says why inductor skipped CUDA graphs, if it did (left out where this torch lacks it).
    local logs=perf_hints
    TORCH_LOGS=$logs "$PY" -c "import torch" 2>/dev/null || logs=
    logged "$name" "$limit" env TORCH_LOGS=$logs "$PY" -m entrannas.bench --configs "$@" $SIZE $flags \
        --compile-backend "$BACKEND" --device "$DEVICE" --out "$OUT/$name.json"
}
SETTLED="--steps 5 --repeats 3 --warmup 4 --frozen-arch --check --profile $PROFILE"
# 1. Whether the fast paths compute what the eager one does, first: a wrong kernel voids the timings.
wanted ops && logged ops "$OPS_LIMIT" "$PY" benchmarks/op_check.py --device "$DEVICE" --batch-size "$OPS_BATCH" \
    --out "$OUT/ops.json"
wanted diagnose && bench diagnose "$DIAGNOSE_LIMIT" \
    "--steps 3 --repeats 1 --warmup 3 --frozen-arch --check --no-tf32 --arch $ARCH" $DIAGNOSE_CONFIGS
wanted arch && bench arch "$ARCH_LIMIT" "$SETTLED --arch $ARCH" $ARCH_CONFIGS
wanted bench && bench bench "$BENCH_LIMIT" "$SETTLED" $CONFIGS

# 2. The compiled super-net equals the eager one on the GPU, per setting in TEST_RUNS (a line per test, so a
#    run cut at its limit still names the ones that passed).
if wanted tests; then
    for run in $TEST_RUNS; do
        stage "tests $run"
        compile=${run%:*}
        [ "$DEVICE" = cpu ] && compile=aot_eager/default   # the dry run: no CUDA graphs on the CPU
        log=${run%:*}
        log="$OUT/tests-$DEVICE-${log//\//-}.txt"
        ENTRANNAS_TEST_DEVICE=$DEVICE ENTRANNAS_TEST_COMPILE=$compile timeout "${run##*:}" \
            "$PY" -m pytest -v -p no:cacheprovider $TESTS > "$log" 2>&1
        printf "\npytest exit status %s\n" $? >> "$log"   # on a line of its own after a cut test
    done
fi

# 3. A short search through the CLI with CUDA graphs: the epoch loop, the evaluation pass, a smaller
#    last batch, the records (history.jsonl counts graphed and eager passes per epoch).
if wanted search; then
    stage search
    rm -rf /tmp/entrannas-search /tmp/search.log
    timeout "$SEARCH_LIMIT" "$PY" -m entrannas search --set dataset=synthetic --set subset_fraction=0.2 --set epochs=3 \
        --set arch_warmup_epochs=1 \
        --set compile="$SEARCH_COMPILE" --set compile_after=2 --set channels_last=true \
        $SEARCH_SIZE --set device="$DEVICE" --out /tmp/entrannas-search > /tmp/search.log 2>&1
    echo "search exit status $?" >> /tmp/search.log
    # the run and its log in one file; the checkpoint is not needed back
    tar -czf "$OUT/search.tar.gz" --exclude='*.pt' -C /tmp entrannas-search search.log
fi
# 4. Less needed: a changing structure's cost, and inductor's code generation.
wanted churn && bench churn "$CHURN_LIMIT" "--steps 10 --repeats 3 --warmup 4 --set compile_after=$CHURN_AFTER" \
    $CHURN_CONFIGS
wanted inductor && bench inductor "$INDUCTOR_LIMIT" "$SETTLED" $INDUCTOR_CONFIGS
stage done
grep -h -A16 -e "^=== stage" -e "^config " -e "op shapes" "$OUT"/bench.log 2>/dev/null
tail -n 4 "$OUT"/tests-*.txt /tmp/search.log 2>/dev/null
