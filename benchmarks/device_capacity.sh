#!/usr/bin/env bash
# The capacity runs on a lent GPU machine, one call per stage; results under $OUT (default /tmp/out).
# Run from the repo root with the wheels folder carried (.whl_gpu: pyzmq, structlog):
#   bash benchmarks/device_capacity.sh prep      # CUDA engine tests + the grown pair's cost table
#   bash benchmarks/device_capacity.sh ctx512    # bench capacity at context 512 (uses the table when present)
#   bash benchmarks/device_capacity.sh ctx2048   # bench capacity at context 2048
#   bash benchmarks/device_capacity.sh ctxall    # both contexts in one call (the table must exist already)
#   bash benchmarks/device_capacity.sh tick      # bench tick: a serving tick's parts at batch 1..256, contexts 512/2048
#                                                 # (with .whl_gpu/speculation_before.py: also the code before a change)
#   bash benchmarks/device_capacity.sh mixed     # bench tick with prefill chunks beside decode rows (context 2048):
#                                                 # measured forward vs the table's price of each mixed tick
#   bash benchmarks/device_capacity.sh profile2  # the table's missing points: batch 1-96 and context 8192 (merge here
#                                                 # with 'specmq profile --merge')
# Extra arguments go to 'specmq bench capacity'. Budget: each stage ends within 10 minutes.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGE=${1:-prep}; shift || true
if ls .whl_gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device-$STAGE.txt"
python3 -c 'import torch, transformers, os; print("torch", torch.__version__, "transformers", transformers.__version__, "cpus", os.cpu_count())' | tee -a "$OUT/device-$STAGE.txt"
TABLE=configs/profiles/h200-grown-8b-1b.yaml
case "$STAGE" in
  prep)
    timeout 170 python3 -m pytest tests/test_cuda_engine.py tests/test_cuda_attention.py tests/test_gpu_gemm_bench.py -q \
      -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
    timeout 300 python3 -m specmq.cli profile --model models/tiny-target --grow llama-3.1-8b \
      --draft-model models/tiny-draft --draft-grow llama-3.2-1b --device cuda --out "$OUT/h200-grown-8b-1b.yaml" \
      --batches 1,8,32,128,256 --tokens 1,3,5 --contexts 512,2048 --reps 5 >"$OUT/profile.log" 2>&1
    echo "profile rc=$?"; tail -3 "$OUT/profile.log"
    ;;
  ctx512|ctx2048|ctxall)
    ctx=${STAGE#ctx}; [ "$ctx" = all ] && ctx=512,2048
    start=$(date +%s)
    if [ ! -f "$TABLE" ] && [ "${PROFILE:-1}" = 1 ]; then  # the controller's cost table, measured here first
      timeout 150 python3 -m specmq.cli profile --model models/tiny-target --grow llama-3.1-8b \
        --draft-model models/tiny-draft --draft-grow llama-3.2-1b --device cuda --out "$TABLE" \
        --batches 8,32,128,256 --tokens 1,3,5 --contexts 512,2048 --reps 3 >"$OUT/profile.log" 2>&1
      echo "profile rc=$?"; tail -2 "$OUT/profile.log"; [ -f "$TABLE" ] && cp "$TABLE" "$OUT/"
    fi
    table=(); [ -f "$TABLE" ] && table=(--cost-table "$TABLE" --fused-cost-table "$TABLE")
    left=$(( 570 - ($(date +%s) - start) ))
    timeout "$left" python3 -m specmq.cli bench capacity --json --contexts "$ctx" --draft-procs 8 \
      --out "$OUT/capacity_ctx${ctx/,/_}.jsonl" --logdir /tmp/caplogs "${table[@]}" "$@" >"$OUT/capacity_ctx${ctx/,/_}.stdout" \
      2>"$OUT/capacity_ctx${ctx/,/_}.stderr"
    echo "capacity rc=$?"; tail -5 "$OUT/capacity_ctx${ctx/,/_}.stderr"
    (cd /tmp/caplogs 2>/dev/null && tail -n 30 $(find . -name '*.log') > "$OUT/capacity_ctx${ctx/,/_}_logs.txt" 2>&1)
    ;;
  mixed)
    for p in 1 4 8; do
      timeout 170 python3 -m specmq.cli bench tick --json --device cuda --dtype bfloat16 --grow llama-3.1-8b \
        --batches 8,32,64 --gammas 0 --context 2048 --ticks 5 --prefill-rows $p --cost-table "$TABLE" \
        >"$OUT/mixed_p$p.jsonl" 2>"$OUT/mixed_p$p.log"; echo "mixed prefill-rows $p rc=$?"
    done
    ;;
  tick)
    for ctx in 512 2048; do
      timeout 200 python3 -m specmq.cli bench tick --json --device cuda --dtype bfloat16 --grow llama-3.1-8b \
        --batches 1,8,32,64,128,256 --gammas 0,4 --context $ctx --ticks 10 --cost-table "$TABLE" \
        >"$OUT/tick_ctx$ctx.jsonl" 2>"$OUT/tick_ctx$ctx.log"; echo "tick ctx$ctx rc=$?"
    done
    timeout 150 python3 -m specmq.cli bench tick --json --device cuda --dtype bfloat16 --grow llama-3.1-8b \
      --batches 8,64,256 --gammas 2,4 --temperature 0.8 --context 512 --ticks 10 --cost-table "$TABLE" \
      >"$OUT/tick_t08_ctx512.jsonl" 2>"$OUT/tick_t08_ctx512.log"; echo "tick sampled rc=$?"
    if [ -f .whl_gpu/speculation_before.py ]; then  # the same ticks on the code before a change, for comparison
      cp workers/speculation.py /tmp/speculation_now.py && cp .whl_gpu/speculation_before.py workers/speculation.py
      timeout 150 python3 -m specmq.cli bench tick --json --device cuda --dtype bfloat16 --grow llama-3.1-8b \
        --batches 8,64,128,256 --gammas 0,4 --context 512 --ticks 10 --cost-table "$TABLE" \
        >"$OUT/tick_ctx512_before.jsonl" 2>"$OUT/tick_ctx512_before.log"; echo "tick before rc=$?"
      cp /tmp/speculation_now.py workers/speculation.py
    fi
    ;;
  profile2)
    timeout 330 python3 -m specmq.cli profile --model models/tiny-target --grow llama-3.1-8b \
      --draft-model models/tiny-draft --draft-grow llama-3.2-1b --device cuda --out "$OUT/h200-mid.yaml" \
      --batches 1,16,48,64,96 --tokens 1,3,5,9 --contexts 512,2048 --reps 3 >"$OUT/profile_mid.log" 2>&1
    echo "profile mid rc=$?"; tail -2 "$OUT/profile_mid.log"
    timeout 220 python3 -m specmq.cli profile --model models/tiny-target --grow llama-3.1-8b \
      --draft-model models/tiny-draft --draft-grow llama-3.2-1b --device cuda --out "$OUT/h200-8192.yaml" \
      --batches 1,8,32,64 --tokens 1,5,9 --contexts 8192 --reps 3 >"$OUT/profile_8192.log" 2>&1
    echo "profile 8192 rc=$?"; tail -2 "$OUT/profile_8192.log"
    ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
