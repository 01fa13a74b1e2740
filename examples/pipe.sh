#!/usr/bin/env sh
# Piping and scripting with `r1 run`. The answer goes to stdout, the reasoning stays out of pipes.
# MODEL may be an alias (deepseek-r1:7b), a repo id, or a local folder.
set -u
MODEL=${MODEL:-deepseek-r1:1.5b}

# 1. Piped text comes first, then a blank line, then the arguments.
git diff HEAD~1 | r1 run "$MODEL" "Write a one-line commit message for this diff." > message.txt

# 2. `-` reads stdin explicitly (also works from a terminal: end with Ctrl-D).
printf 'Translate to French:\nGood morning\n' | r1 run "$MODEL" -

# 3. Reproducible and scriptable: greedy decoding, exit code 4 when the model ran out of tokens while thinking.
if ! answer=$(r1 run "$MODEL" --temperature 0 --max-tokens 4096 "Is 221 prime? Answer yes or no."); then
  echo "r1 failed with exit code $?" >&2
fi
echo "answer: $answer"

# 4. One JSON object with answer, reasoning, usage and timings (jq picks fields).
r1 run "$MODEL" --json "Name three prime numbers." | jq -r '.content, "\(.usage.completion_tokens) tokens, \(.timings.decode_tokens_per_s) tokens/s"'

# 5. Events while it runs, one JSON object per line: show only the answer as it streams.
r1 run "$MODEL" --jsonl "Count to five." | jq --unbuffered -rj 'select(.event == "answer") | .text'; echo

# 6. Keep the reasoning: inline in <think> tags on stdout, or in a file of its own.
r1 run "$MODEL" --think stdout "Why is the sky blue?" > with-thinking.txt
r1 run "$MODEL" --think stderr "Why is the sky blue?" 2> reasoning.txt > answer.txt

# 7. Batch: one answer per line of questions.
printf 'What is 2+2?\nWhat is the capital of Peru?\n' | while IFS= read -r q; do
  printf '%s\t%s\n' "$q" "$(r1 run "$MODEL" --temperature 0 "$q" < /dev/null | tr '\n' ' ')"
done
