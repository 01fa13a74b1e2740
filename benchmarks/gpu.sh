#!/usr/bin/env bash
# The GPU benchmark run (one call on the H200): fast-path check, then each shape raced against transformers on
# the same random weights. Writes JSON reports to ${OUT:-bench-out}/.
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 120 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/check.txt"
run() {  # name, extra args
  local name=$1; shift
  timeout 240 python3 -m r1cli bench --config "benchmarks/configs/$name" --device cuda --dtype bfloat16 \
    --prompt-lengths 128,1024,4096 --new-tokens 128 --json "$@" > "$out/$name$SUFFIX.json" 2> "$out/$name$SUFFIX.err"
  python3 -c "import json,sys; from r1cli.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))" "$out/$name$SUFFIX.json" || tail -5 "$out/$name$SUFFIX.err"
}
SUFFIX="" run DeepSeek-R1-Distill-Qwen-1.5B --compare hf
SUFFIX="" run DeepSeek-R1-Distill-Qwen-7B --compare hf
SUFFIX="" run DeepSeek-R1-Distill-Llama-8B --compare hf
SUFFIX="" run DeepSeek-V2-Lite --compare hf
# Four full-size layers of V3 (1 dense, 3 MoE with 256 experts): 68 GB in bf16, too big to hold twice.
SUFFIX="-4layers" run DeepSeek-R1 --layers 4 --dense-layers 1
