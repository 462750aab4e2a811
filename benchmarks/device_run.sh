#!/usr/bin/env bash
# Everything one device call needs: CUDA engine tests, the gpu_engine benchmark, the H100 cost tables,
# the end-to-end run (gpu_e2e).
# Run from the repo root on the device with the wheels folder carried:  bash benchmarks/device_run.sh [STAGES]
# STAGES: comma list of step,test,bench,profile8b,profile1b,grow,e2e (default: all).
# Results under $OUT (default /tmp/out).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${1:-step,test,bench,profile8b,profile1b,grow,e2e}; shift || true
if ls .whl_gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gpu/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/device.txt"
python3 -c "import torch; from workers.engine.cuda_engine import fused_path_check as c; from workers.engine.cuda_shapes import SHAPES; print('flash layout, why portable:', c(SHAPES['llama-3.1-8b'], torch.bfloat16, torch.device('cuda')))" 2>&1 | tail -3 | tee -a "$OUT/device.txt"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
if has step; then  # per-shape step times and per-kernel profile of one step (benchmarks/gpu_profile_step.py)
  timeout 240 python3 benchmarks/gpu_profile_step.py --out "$OUT" >"$OUT/step.log" 2>&1
  echo "step rc=$?"; grep -E "step |logits|kernels/step|done" "$OUT/step.log" | tail -60
fi
if has test; then
  timeout 240 python3 -m pytest tests/test_cuda_engine.py tests/test_cuda_attention.py tests/test_gpu_gemm_bench.py -q --noconftest -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.log"
fi
if has bench; then
  timeout 420 python3 -m specmq.cli bench gpu_engine --json --hf-reps 3 "$@" >"$OUT/gpu_engine_h100.jsonl" 2>"$OUT/bench.log"
  echo "bench rc=$?"; tail -5 "$OUT/bench.log"
fi
if has profile8b; then
  timeout 300 python3 -m specmq.cli profile --shape llama-3.1-8b --device cuda --out "$OUT/${GPU_TAG:-gpu}-llama-3.1-8b-bf16.yaml" \
    --batches 1,4,16,32,64 --tokens 1,5,9 --contexts 128,512,2048 --reps 7 2>>"$OUT/bench.log"
  echo "profile8b rc=$?"; tail -2 "$OUT/bench.log"
fi
if has profile1b; then
  timeout 240 python3 -m specmq.cli profile --shape llama-3.2-1b --device cuda --out "$OUT/${GPU_TAG:-gpu}-llama-3.2-1b-bf16.yaml" \
    --batches 1,4,16,32,64 --tokens 1,5,9 --contexts 128,512,2048 --reps 7 2>>"$OUT/bench.log"
  echo "profile1b rc=$?"; tail -2 "$OUT/bench.log"
fi
if has grow; then  # the shipped target grown to 8B (same outputs) vs random weights of that shape (grow_cost.py)
  timeout 240 python3 -m specmq.cli bench grow_cost --json >"$OUT/grow_cost.jsonl" 2>"$OUT/grow_cost.log"
  echo "grow rc=$?"; grep -v '"event"' "$OUT/grow_cost.log" | tail -10
fi
if has e2e; then  # broker + CUDA target worker + 64 draft sessions (4 CPU draft processes) vs target-only (gpu_e2e.py)
  timeout 400 python3 -m specmq.cli bench gpu_e2e --json --gammas 2,4 --fused --logdir /tmp/gpu_e2e_logs \
    >"$OUT/gpu_e2e.jsonl" 2>"$OUT/gpu_e2e.log"
  rc=$?; echo "e2e rc=$rc"; tail -8 "$OUT/gpu_e2e.log"; tail -1 "$OUT/gpu_e2e.jsonl"
  # the services' logs come back only on failure ($OUT returns at most 8 files)
  [ $rc -eq 0 ] || tar czf "$OUT/gpu_e2e_logs.tgz" -C /tmp gpu_e2e_logs
fi
