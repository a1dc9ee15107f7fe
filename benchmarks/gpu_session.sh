#!/usr/bin/env bash
# Everything issue 6 measures on a lent GPU, in one call (about 9 minutes at most):
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".device"], timeout_s=560)
#
# Results go under $OUT: the bench JSON (written after each configuration, so a stage cut short
# keeps what it measured), its table, the compiled-path tests run on the GPU, and the environment.
# Ray is not needed. pytest is taken from .device/site when the device has none
# (benchmarks/device_site.sh fills it from the local virtual environment).
# DEVICE, SIZE and BACKEND exist for a dry run on the CPU:
#   DEVICE=cpu SIZE="--layers 3 --channels 4 --batch-size 8 --image-size 8" BACKEND=aot_eager \
#   PY=.venv/bin/python OUT=/tmp/dry bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:---layers 8 --channels 16 --batch-size 256 --image-size 32}
BACKEND=${BACKEND:-inductor}
mkdir -p "$OUT"
PY=${PY:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pytest" 2>/dev/null && [ -d .device/site ]; then
    export PYTHONPATH="$PYTHONPATH:$PWD/.device/site"
fi
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/entrannas-inductor}
{ date -u; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1

# 1. Seconds per step, memory and projections: the DARTS configuration first (the ratio's base),
#    then the defaults eager, then the compiled fast paths, then the eager fast paths.
TORCH_LOGS=perf_hints timeout 380 "$PY" -m entrannas.bench \
    --configs darts entrannas dst entrannas+cudagraphs+bf16+cl dst+cudagraphs+bf16+cl \
              entrannas+graphs+bf16+cl dst+graphs+bf16+cl entrannas+bf16+cl dst+bf16+cl \
    $SIZE --steps 5 --repeats 3 --warmup 4 --compile-backend "$BACKEND" \
    --frozen-arch --check --device "$DEVICE" --out "$OUT/bench.json" > "$OUT/bench.stdout" 2> "$OUT/bench.log"
echo "bench exit status $?" >> "$OUT/bench.log"

# 2. The compiled super-net equals the eager one on the GPU: CUDA graphs of the traced graphs, then
#    inductor with CUDA graphs.
for compile in cudagraphs/default "$BACKEND/reduce-overhead"; do
    log="$OUT/tests-compiled-$DEVICE-${compile//\//-}.txt"
    [ "$DEVICE" = cpu ] && compile=aot_eager/default   # the dry run: no CUDA graphs on the CPU
    ENTRANNAS_TEST_DEVICE=$DEVICE ENTRANNAS_TEST_COMPILE=$compile timeout 80 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_compiled.py > "$log" 2>&1
    echo "pytest exit status $?" >> "$log"
done
tail -n 12 "$OUT"/bench.log "$OUT"/tests-compiled-*.txt
