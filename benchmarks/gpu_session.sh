#!/usr/bin/env bash
# Every GPU measurement in one call (about 7 minutes on an H100 or H200); results under $OUT.
#   1. tests: the CUDA-graph tests on the GPU (tests/test_cuda_graphs.py with ENTRANNAS_TEST_DEVICE=cuda).
#   2. arch: the bench at the paper's size (8 cells, C=16, batch 256, 32x32), settled at DARTS_V2 (DST at
#      benchmarks/genotypes/dst-digits.json), eager and with the fast settings, each checked against
#      fp32 eager (--check): a wrong kernel voids the timings, so the check comes with them.
#   3. search: a short CLI search with the fast settings (records, validation, checkpoints).
# Run where a device is lent, e.g. through the device tool:  bash benchmarks/gpu_session.sh
# A dry run on the CPU checks the script, not the figures (CUDA graphs and op streams need CUDA):
#   DEVICE=cpu FAST=+cl SIZE="--layers 3 --channels 4 --batch-size 8 --image-size 8" \
#   SEARCH_SIZE="--set layers=3 --set init_channels=4" PY=.venv/bin/python OUT=/tmp/dry bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-$(command -v python || command -v python3)}
SIZE=${SIZE:---layers 8 --channels 16 --batch-size 256 --image-size 32}
FAST=${FAST-+graphs+bf16+cl+streams}   # the fast settings, as bench variants
ARCH=${ARCH:-DARTS_V2 dst=benchmarks/genotypes/dst-digits.json}
SEARCH_SIZE=${SEARCH_SIZE:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1
stage() { echo "stage $1 at $(date -u +%T)" >> "$OUT/environment.txt"; }

stage tests
ENTRANNAS_TEST_DEVICE=$DEVICE timeout 120 "$PY" -m pytest -v -p no:cacheprovider tests/test_cuda_graphs.py \
    > "$OUT/tests.txt" 2>&1
echo "pytest exit status $?" >> "$OUT/tests.txt"

stage arch
timeout 300 "$PY" benchmarks/bench.py --configs darts entrannas "entrannas$FAST" dst "dst$FAST" $SIZE \
    --steps 5 --repeats 3 --warmup 4 --frozen-arch --check --arch $ARCH --device "$DEVICE" \
    --out "$OUT/arch.json" > /dev/null 2> "$OUT/arch.log"
echo "bench exit status $?" >> "$OUT/arch.log"

stage search
FLAGS="--set channels_last=true"
[ "$DEVICE" = cuda ] && FLAGS="$FLAGS --set cuda_graphs=true --set op_streams=4 --set precision=bf16"
rm -rf "$OUT/search"
timeout 90 "$PY" -m entrannas search --set dataset=synthetic --set subset_fraction=0.2 --set epochs=3 \
    --set arch_warmup_epochs=1 $FLAGS $SEARCH_SIZE --set device="$DEVICE" --out "$OUT/search" > "$OUT/search.log" 2>&1
echo "search exit status $?" >> "$OUT/search.log"
rm -f "$OUT/search/checkpoint.pt"
stage done
tail -n 12 "$OUT/arch.log"; tail -n 3 "$OUT/tests.txt" "$OUT/search.log"
