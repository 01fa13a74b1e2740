#!/usr/bin/env bash
# Second H200 run: torch.compile'd decode steps captured as CUDA graphs ("compile"), raced against transformers.
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
run() {  # name, label, extra args
  local name=$1 label=$2; shift 2
  timeout 120 python3 -m r1cli bench --config "benchmarks/configs/$name" --device cuda --dtype bfloat16 \
    --prompt-lengths 128,1024,4096 --new-tokens 128 --json "$@" > "$out/$label.json" 2> "$out/$label.err"
  python3 -c "import json,sys; from r1cli.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))" "$out/$label.json" || tail -3 "$out/$label.err"
}
run DeepSeek-R1-Distill-Qwen-1.5B qwen1.5b-compile --decode-mode compile --compare hf
run DeepSeek-V2-Lite v2lite-compile --decode-mode compile
run DeepSeek-R1 v3-4layers-compile --layers 4 --dense-layers 1 --decode-mode compile
run DeepSeek-R1-Distill-Qwen-7B qwen7b-compile --decode-mode compile --compare hf
