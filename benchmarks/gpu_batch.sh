#!/usr/bin/env bash
# Prepared for a session lent a GPU (unmeasured so far): aggregate decode tokens/s of the batched engine (batch.py)
# at 1..64 concurrent streams against transformers' batched generate, on the same random weights, ~6 min in all.
#   bash benchmarks/gpu_batch.sh        # writes $OUT (default bench-out)/batch-*.txt
# Note: the batched engine decodes eagerly (no CUDA graph yet), so small models are launch-bound at low batch.
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 200 python3 benchmarks/batch_decode.py --config src/r1cli/hub_configs/DeepSeek-R1-Distill-Qwen-1.5B \
  --device cuda --dtype bfloat16 --streams 1,8,16,32,64 --prompt 128 --new-tokens 64 2>&1 | tee "$out/batch-qwen1.5b.txt"
timeout 200 python3 benchmarks/batch_decode.py --config src/r1cli/hub_configs/DeepSeek-R1-Distill-Qwen-7B \
  --device cuda --dtype bfloat16 --streams 1,8,16,32,64 --prompt 128 --new-tokens 64 2>&1 | tee "$out/batch-qwen7b.txt"
