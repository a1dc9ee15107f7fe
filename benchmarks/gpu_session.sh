#!/usr/bin/env bash
# Every GPU measurement in one call, under 9 minutes on an H100 or H200; results under $OUT.
#   tests: the CUDA-graph tests on the GPU (tests/test_cuda_graphs.py with ENTRANNAS_TEST_DEVICE=cuda).
#   e2e:   whole searches end to end (benchmarks/e2e.py): CIFAR-sized learnable data (50,000 images,
#          32x32), batch 256, 8 cells, C=16, 50 epochs; EnTranNAS and DST with examples/fast-gpu.yaml,
#          the DARTS configuration for 2 epochs, projected. A configuration still running after its
#          time limit is stopped and projected from its epochs (said so in the JSON).
#   arch:  (STAGES="... arch") the step bench settled at DARTS_V2, fast paths checked against fp32 eager.
#   dp:    (STAGES="... dp", 2 GPUs) a DST search on synthetic data on 1 and on 2 Ray Train workers (NCCL):
#          seconds per epoch in $OUT/dp-1/history.jsonl and $OUT/dp-2/history.jsonl.
# Run where a device is lent, e.g. through the device tool:  bash benchmarks/gpu_session.sh
# A dry run on the CPU checks the script, not the figures (CUDA graphs and op streams need CUDA):
#   DEVICE=cpu RECIPE= IMAGES=400 EPOCHS=3 E2E_SIZE="--set layers=3 --set init_channels=4 --set batch_size=32 \
#   --set arch_warmup_epochs=1" PY=.venv/bin/python OUT=/tmp/dry bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-$(command -v python || command -v python3)}
STAGES=${STAGES:-tests e2e}
RECIPE=${RECIPE-examples/fast-gpu.yaml}
IMAGES=${IMAGES:-50000}
EPOCHS=${EPOCHS:-50}
E2E_SIZE=${E2E_SIZE:-}
E2E_LIMIT=${E2E_LIMIT:-150}     # seconds per fast configuration
DARTS_LIMIT=${DARTS_LIMIT:-130}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)"; } \
    > "$OUT/environment.txt" 2>&1
stage() { echo "stage $1 at $(date -u +%T)" >> "$OUT/environment.txt"; }

if [[ " $STAGES " == *" tests "* ]]; then
    stage tests
    ENTRANNAS_TEST_DEVICE=$DEVICE timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
        > "$OUT/tests.txt" 2>&1
    echo "pytest exit status $?" >> "$OUT/tests.txt"
fi

if [[ " $STAGES " == *" e2e "* ]]; then
    stage e2e
    DATA="$OUT/.data"
    "$PY" benchmarks/e2e.py --configs darts --darts-epochs 2 --epochs "$EPOCHS" --train-images "$IMAGES" \
        --time-limit "$DARTS_LIMIT" --device "$DEVICE" $E2E_SIZE --data "$DATA" --out "$OUT/e2e-darts.json" \
        > /dev/null 2> "$OUT/e2e.log"
    echo "e2e darts exit status $?" >> "$OUT/e2e.log"
    "$PY" benchmarks/e2e.py --configs entrannas dst --epochs "$EPOCHS" --train-images "$IMAGES" \
        --time-limit "$E2E_LIMIT" --device "$DEVICE" ${RECIPE:+--config "$RECIPE"} $E2E_SIZE --data "$DATA" \
        --baseline "$OUT/e2e-darts.json" --out "$OUT/e2e-fast.json" > /dev/null 2>> "$OUT/e2e.log"
    echo "e2e fast exit status $?" >> "$OUT/e2e.log"
    rm -rf "$DATA"
fi

if [[ " $STAGES " == *" arch "* ]]; then
    stage arch
    timeout 300 "$PY" benchmarks/bench.py --configs darts entrannas+graphs+bf16+cl+streams \
        dst+graphs+bf16+cl+streams --layers 8 --channels 16 --batch-size 256 --image-size 32 --steps 5 \
        --repeats 3 --warmup 4 --frozen-arch --check --arch DARTS_V2 dst=benchmarks/genotypes/dst-digits.json \
        --device "$DEVICE" --out "$OUT/arch.json" > /dev/null 2> "$OUT/arch.log"
    echo "bench exit status $?" >> "$OUT/arch.log"
fi
if [[ " $STAGES " == *" dp "* ]]; then
    stage dp
    for N in 1 2; do
        timeout 240 "$PY" -m entrannas search --workers "$N" --set dataset=synthetic --set mode=dst --set epochs=3 \
            --set device="$DEVICE" --out "$OUT/dp-$N" > "$OUT/dp-$N.log" 2>&1
        echo "search --workers $N exit status $?" >> "$OUT/dp-$N.log"
    done
fi
stage done
tail -n 12 "$OUT"/*.log "$OUT/tests.txt" 2>/dev/null
