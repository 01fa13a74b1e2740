"""DeepSeek's own reasoning-model example (api-docs.deepseek.com, "Reasoning Model"), run against `r1 serve`.

Only `base_url` differs from DeepSeek's code. Start a server first, then run this:

    r1 serve deepseek-r1:1.5b            # http://127.0.0.1:8000/v1
    pip install openai
    python examples/openai_client.py     # R1_URL=http://host:port/v1 for another address

The api_key is not checked unless the server was started with --api-key (then pass that key here).
"""

import os

from openai import OpenAI

client = OpenAI(api_key=os.environ.get("R1_API_KEY", "<DeepSeek API Key>"),
                base_url=os.environ.get("R1_URL", "http://127.0.0.1:8000/v1"))

# --- Non-streaming ---------------------------------------------------------------------------------------------------

# Round 1
messages = [{"role": "user", "content": "9.11 and 9.8, which is greater?"}]
response = client.chat.completions.create(
    model="deepseek-reasoner",
    messages=messages
)

reasoning_content = response.choices[0].message.reasoning_content
content = response.choices[0].message.content
print(f"[reasoning]\n{reasoning_content}\n\n[answer]\n{content}\n")

# Round 2: send back the answer only (the server would ignore reasoning_content anyway)
messages.append({'role': 'assistant', 'content': content})
messages.append({'role': 'user', 'content': "How many Rs are there in the word 'strawberry'?"})
response = client.chat.completions.create(
    model="deepseek-reasoner",
    messages=messages
)
print(f"[reasoning]\n{response.choices[0].message.reasoning_content}\n\n[answer]\n{response.choices[0].message.content}\n")

# --- Streaming -------------------------------------------------------------------------------------------------------

messages = [{"role": "user", "content": "9.11 and 9.8, which is greater?"}]
response = client.chat.completions.create(
    model="deepseek-reasoner",
    messages=messages,
    stream=True
)

reasoning_content = ""
content = ""

print("[reasoning]")
for chunk in response:
    if chunk.choices[0].delta.reasoning_content:
        reasoning_content += chunk.choices[0].delta.reasoning_content
        print(chunk.choices[0].delta.reasoning_content, end="", flush=True)
    else:
        if chunk.choices[0].delta.content and not content:
            print("\n\n[answer]")
        content += chunk.choices[0].delta.content
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
