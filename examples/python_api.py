"""Stream a reply from Python: load a model, render the prompt, and print reasoning and answer as they arrive.

    python examples/python_api.py deepseek-r1:1.5b "Why is the sky blue?"
    python examples/python_api.py ./my-model-folder "Hello"
    R1_QUANT=int4 python examples/python_api.py ./model-Q4_K_M.gguf "Hello"   # a GGUF file, int4 weights
"""

import os
import sys

from r1cli.chat_format import build_prompt, family_for
from r1cli.engine import default_sampling, stream_events
from r1cli.events import AnswerDelta, Done, ReasoningDelta
from r1cli.generate import Decoder
from r1cli.loader import load
from r1cli.registry import resolve_name

name = sys.argv[1] if len(sys.argv) > 1 else "deepseek-r1:1.5b"
question = " ".join(sys.argv[2:]) or "What is 17 * 23?"

# a folder, an alias, a repo id already in the HF cache, or a .gguf file; quant: none, int8 or int4
model, tokenizer = load(name, device="auto", quant=os.environ.get("R1_QUANT", "none"))
decoder = Decoder(model, max_len=8192)  # one KV cache; keep it for later turns to reuse their common prefix
alias = resolve_name(name).alias  # deepseek-r1:7b and the like are R1 models whatever their files say
family = family_for(tokenizer, alias)  # "r1": DeepSeek's prompt rules; "plain": the template as is
prompt = build_prompt(tokenizer, [{"role": "user", "content": question}], family=family)
# What `r1 run` uses (`r1 show` prints it): R1's settings or the model's own, a bounded max_tokens (capped by the
# context), and the repetition guard, which ends a reply stuck in a loop with finish_reason "repetition".
params = default_sampling(tokenizer, alias)

for event in stream_events(decoder, tokenizer, prompt, params):  # Start, deltas, Done: events.py
    if isinstance(event, ReasoningDelta):
        print(f"\x1b[2m{event.text}\x1b[22m", end="", flush=True, file=sys.stderr)
    elif isinstance(event, AnswerDelta):
        print(event.text, end="", flush=True)
    elif isinstance(event, Done):
        s = event.stats
        print(f"\n[{s.finish_reason}: {s.completion_tokens} tokens, {s.reasoning_tokens} thinking, "
              f"{s.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
