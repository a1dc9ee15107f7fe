#!/usr/bin/env bash
# Everything issue 6 measures on a lent GPU, in one call (about 9 minutes at most):
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".device"], timeout_s=560)
#
# Results go under $OUT: the bench JSON (written after each configuration, so a stage cut short
# keeps what it measured), its table, the compiled-path tests run on the GPU, and the environment.
# Ray is not needed. pytest and tqdm come from .device/site, which benchmarks/device_site.sh fills
# from the local virtual environment (the device has torch, pandas, seaborn, pyyaml, torchvision).
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
entrannas+graphs+bf16+cl dst+graphs+bf16+cl entrannas+bf16+cl dst+bf16+cl}
BACKEND=${BACKEND:-inductor}
mkdir -p "$OUT"
PY=${PY:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .device/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.device/site"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/entrannas-inductor}
{ date -u; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1

# 1. Seconds per step, memory and projections: the DARTS configuration first (the ratio's base),
#    then the defaults eager, then the compiled fast paths, then the eager fast paths.
# perf_hints says why inductor skipped CUDA graphs, if it did (left out where this torch lacks it).
LOGS=perf_hints
TORCH_LOGS=$LOGS "$PY" -c "import torch" 2>/dev/null || LOGS=
TORCH_LOGS=$LOGS timeout 300 "$PY" -m entrannas.bench \
    --configs $CONFIGS $SIZE --steps 5 --repeats 3 --warmup 4 --compile-backend "$BACKEND" \
    --frozen-arch --check --device "$DEVICE" --out "$OUT/bench.json" > "$OUT/bench.stdout" 2> "$OUT/bench.log"
echo "bench exit status $?" >> "$OUT/bench.log"

# 2. The compiled super-net equals the eager one on the GPU: CUDA graphs of the traced graphs, then
#    inductor with CUDA graphs.
for run in cudagraphs/default:60 "$BACKEND/reduce-overhead:100"; do
    compile=${run%:*}
    log="$OUT/tests-compiled-$DEVICE-${compile//\//-}.txt"
    [ "$DEVICE" = cpu ] && compile=aot_eager/default   # the dry run: no CUDA graphs on the CPU
    ENTRANNAS_TEST_DEVICE=$DEVICE ENTRANNAS_TEST_COMPILE=$compile timeout "${run##*:}" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_compiled.py > "$log" 2>&1
    echo "pytest exit status $?" >> "$log"
done
# 3. A short search through the CLI with CUDA graphs: the epoch loop, the evaluation pass, a smaller
#    last batch, the records (history.jsonl counts compiled and eager passes per epoch).
SEARCH_COMPILE=reduce-overhead
[ "$BACKEND" = inductor ] || SEARCH_COMPILE=default
timeout 45 "$PY" -m entrannas search --set dataset=synthetic --set epochs=3 --set arch_warmup_epochs=1 \
    --set compile="$SEARCH_COMPILE" --set compile_backend="$BACKEND" --set compile_after=2 $SEARCH_SIZE \
    --set device="$DEVICE" --out "$OUT/search" > "$OUT/search.log" 2>&1
echo "search exit status $?" >> "$OUT/search.log"
rm -f "$OUT"/search/*.pt   # the checkpoint is not needed back
tail -n 12 "$OUT"/bench.log "$OUT"/tests-compiled-*.txt "$OUT/search.log"
