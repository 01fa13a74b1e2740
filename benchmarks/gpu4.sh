#!/usr/bin/env bash
# Prepared for the next session lent the H200, in two calls of under 10 minutes each (the device's per-command limit):
#   bash benchmarks/gpu4.sh checks   # ~4 min: graph/static decode vs eager; the int8/int4 CUDA kernels against the
#                                    # float reference (tinygemm's layout has never run); a profile of the Qwen-1.5B
#                                    # decode step; V2-Lite's expert paths (grouped GEMMs vs the per-expert loop for
#                                    # prefill, grouped vs gathered for decode)
#   bash benchmarks/gpu4.sh bench    # ~6 min: Qwen-1.5B compiled vs transformers; Qwen-7B bf16/int8/int4 (graph mode,
#                                    # issue #7's GPU ratios); V2-Lite compiled
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
phase=${1:-checks}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
if [ "$phase" = checks ]; then
  timeout 60 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/check.txt"
  timeout 60 python3 benchmarks/quant_check.py --device cuda 2>&1 | tee "$out/quant-check.txt"
  timeout 60 python3 benchmarks/step_profile.py --config benchmarks/configs/DeepSeek-R1-Distill-Qwen-1.5B --device cuda \
    > "$out/profile-qwen1.5b.txt" 2>&1; head -40 "$out/profile-qwen1.5b.txt"
  timeout 150 python3 benchmarks/moe_paths.py --config benchmarks/configs/DeepSeek-V2-Lite --device cuda --dtype bfloat16 \
    2>&1 | tee "$out/moe-paths-v2lite.txt"
  exit 0
fi
bench() {  # name, tag, timeout, extra args
  local name=$1 tag=$2 limit=$3; shift 3
  timeout "$limit" python3 -m r1cli bench --config "benchmarks/configs/$name" --device cuda --dtype bfloat16 \
    --prompt-lengths 128 --new-tokens 128 --json "$@" > "$out/$name-$tag.json" 2> "$out/$name-$tag.err"
  python3 -c "import json,sys; from r1cli.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))" \
    "$out/$name-$tag.json" || tail -3 "$out/$name-$tag.err"
}
bench DeepSeek-R1-Distill-Qwen-1.5B compile-s4 100 --decode-mode compile --compare hf
bench DeepSeek-R1-Distill-Qwen-7B graph-s4 60 --decode-mode graph
bench DeepSeek-R1-Distill-Qwen-7B int8-graph-s4 60 --decode-mode graph --quant int8
bench DeepSeek-R1-Distill-Qwen-7B int4-graph-s4 60 --decode-mode graph --quant int4 --group-size 128
bench DeepSeek-V2-Lite compile-s4 120 --decode-mode compile
