#!/usr/bin/env bash
# Third H200 run, after RoPE became real-valued (fusable by torch.compile): fast-path check, then compiled decode.
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 60 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/check.txt"
for spec in "DeepSeek-R1-Distill-Qwen-1.5B --compare hf" "DeepSeek-R1-Distill-Qwen-7B"; do
  set -- $spec; name=$1; shift
  timeout 100 python3 -m r1cli bench --config "benchmarks/configs/$name" --device cuda --dtype bfloat16 \
    --prompt-lengths 128 --new-tokens 128 --decode-mode compile --json "$@" > "$out/$name-run3.json" 2> "$out/$name-run3.err"
  python3 -c "import json,sys; from r1cli.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))" "$out/$name-run3.json" || tail -3 "$out/$name-run3.err"
done
