"""`r1 serve` with the official `openai` package as the client, and `r1 chat --url` against it.

The servers run as subprocesses on the steered tiny checkpoints of tests/steered.py, on 127.0.0.1 with a free port
(--port 0, read back from the start line). `--log-requests` shows, server side, the prompt each request rendered.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pexpect
import pytest
from openai import OpenAI

import steered
from helpers import r1_env, strip_ansi

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "sk-test-key"


class ServeProcess:
    def __init__(self, folder: Path, log: Path, *args: str):
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        env.pop("R1_API_KEY", None)
        self.log, self.lines = log, []
        self.proc = subprocess.Popen([sys.executable, "-m", "r1cli", "serve", str(folder), "--port", "0",
                                      "--log-requests", str(log), *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 120
        while not (started := [m for line in self.lines if (m := re.search(r" on (http://\S+/v1)", line))]):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.1)
        self.url = started[0].group(1)
        self.root = self.url.removesuffix("/v1")
        assert httpx.get(self.root + "/health", timeout=30).json()["status"] == "ok"

    def records(self, event: str) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [r for r in map(json.loads, lines) if r["event"] == event]

    def done_record(self, request_id: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records("done") if r["id"] == request_id]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no end recorded for {request_id}")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(steered_dir, tmp_path_factory):
    s = ServeProcess(steered_dir, tmp_path_factory.mktemp("serve") / "requests.jsonl", "--max-context", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def looping_server(looping_dir, tmp_path_factory):
    s = ServeProcess(looping_dir, tmp_path_factory.mktemp("serve") / "requests.jsonl", "--max-queue", "1",
                     "--api-key", KEY, "--max-context", "4096", "--no-repeat-guard", "--parallel", "2")
    yield s
    s.stop()


# --- DeepSeek's documented examples, with base_url changed and nothing else -----------------------------------------


@pytest.mark.slow
def test_deepseek_two_round_example(server, steered_dir):
    client = OpenAI(api_key="<DeepSeek API Key>", base_url=server.url)

    # Round 1
    messages = [{"role": "user", "content": "9.11 and 9.8, which is greater?"}]
    response = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=messages
    )

    reasoning_content = response.choices[0].message.reasoning_content
    content = response.choices[0].message.content
    round1 = response

    # Round 2
    messages.append({'role': 'assistant', 'content': content})
    messages.append({'role': 'user', 'content': "How many Rs are there in the word 'strawberry'?"})
    response = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=messages
    )

    assert reasoning_content == steered.REASONING and content == steered.ANSWER
    assert response.choices[0].message.reasoning_content == steered.REASONING
    assert response.choices[0].message.content == steered.ANSWER
    assert response.choices[0].finish_reason == "stop" and response.object == "chat.completion"
    usage = round1.usage
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (17, 8)

    # Server side: round two's prompt holds round one's answer and no reasoning, rendered as r1 itself would.
    from r1cli.chat_format import build_prompt
    from r1cli.tokenizer import Tokenizer

    prompts = [r for r in server.records("prompt")][-2:]
    expected = build_prompt(Tokenizer.from_folder(steered_dir), messages)
    assert prompts[1]["prompt"] == expected.text and response.usage.prompt_tokens == len(expected.ids)
    assert steered.ANSWER in prompts[1]["prompt"] and steered.REASONING not in prompts[1]["prompt"]
    assert "strawberry" in prompts[1]["prompt"] and round1.usage.prompt_tokens == prompts[0]["prompt_tokens"]

    # reasoning_content sent back (the whole message object) is ignored: the same prompt.
    messages[1] = round1.choices[0].message.model_dump()
    assert messages[1]["reasoning_content"] == steered.REASONING
    client.chat.completions.create(model="deepseek-reasoner", messages=messages)
    assert server.records("prompt")[-1]["prompt"] == expected.text


@pytest.mark.slow
def test_deepseek_streaming_example(server):
    client = OpenAI(api_key="<DeepSeek API Key>", base_url=server.url)
    kinds = []

    # Round 1
    messages = [{"role": "user", "content": "9.11 and 9.8, which is greater?"}]
    response = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=messages,
        stream=True
    )

    reasoning_content = ""
    content = ""

    for chunk in response:
        kinds.append("r" if chunk.choices[0].delta.reasoning_content else "c" if chunk.choices[0].delta.content else "")
        if chunk.choices[0].delta.reasoning_content:
            reasoning_content += chunk.choices[0].delta.reasoning_content
        else:
            content += chunk.choices[0].delta.content

    # Round 2
    messages.append({"role": "assistant", "content": content})
    messages.append({'role': 'user', 'content': "How many Rs are there in the word 'strawberry'?"})
    response = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=messages,
        stream=True
    )
    reasoning2 = content2 = ""
    for chunk in response:
        if chunk.choices[0].delta.reasoning_content:
            reasoning2 += chunk.choices[0].delta.reasoning_content
        else:
            content2 += chunk.choices[0].delta.content

    assert (reasoning_content, content) == (reasoning2, content2) == (steered.REASONING, steered.ANSWER)
    # Separate, in order, token by token: all reasoning chunks, then all content chunks.
    pieces = "".join(k for k in kinds if k)
    assert re.fullmatch(r"r{5,}c{5,}", pieces), pieces
    assert steered.REASONING not in server.records("prompt")[-1]["prompt"]


@pytest.mark.slow
def test_stream_wire_format_and_usage(server):
    body = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    assert chunks[-1]["usage"]["completion_tokens"] == 17


@pytest.mark.slow
def test_models_health_and_names(server, steered_dir):
    client = OpenAI(api_key="unused", base_url=server.url)
    ids = [m.id for m in client.models.list()]
    assert ids == [str(steered_dir), steered_dir.name, "deepseek-reasoner"]
    for name in ids:
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert reply.model == name and reply.choices[0].message.content == steered.ANSWER
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    health = httpx.get(server.root + "/health").json()
    assert health["status"] == "ok" and health["model"] == steered_dir.name  # no path: /health needs no key


@pytest.mark.slow
def test_sampling_fields_and_stop(server):
    client = OpenAI(api_key="unused", base_url=server.url)
    ask = lambda **kw: client.chat.completions.create(  # noqa: E731
        model="deepseek-reasoner", messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "hi"}]}], **kw)
    r = ask(temperature=0.7, top_p=0.9, seed=3, max_tokens=4)  # the model's bigram chain wins at any temperature
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 4 and r.choices[0].message.reasoning_content == "Let me count the"
    r = ask(stop=["*"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("There are ", "stop")
    assert r.usage.completion_tokens < 17
    text = "".join(c.choices[0].delta.content or "" for c in ask(stop="three", stream=True))
    assert text == "There are *"
    assert "Be brief." in server.records("prompt")[-1]["prompt"]


def test_stop_strings_one_request_at_a_time(steered_dir, tmp_path):
    """--parallel 1 (the batch-1 worker): a stop string stops the stream (EventStream.stop) and ends the choice
    with finish_reason 'stop', nothing of the stop string or after it sent; the log has the turn's numbers."""
    from starlette.testclient import TestClient

    from r1cli.engine import open_model
    from r1cli.options import ModelOptions
    from r1cli.serve import Server

    m = open_model(ModelOptions(str(steered_dir), "cpu", max_context=512))
    log = tmp_path / "requests.jsonl"
    server = Server(m, log_path=log, parallel=1)
    ask = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(server.app) as http:
        client = OpenAI(api_key="none", base_url="http://testserver/v1", http_client=http)
        full = client.chat.completions.create(**ask)
        r = client.chat.completions.create(**ask, stop=["*"])
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("There are ", "stop")
        assert r.choices[0].message.reasoning_content == full.choices[0].message.reasoning_content
        assert r.usage.completion_tokens < full.usage.completion_tokens
        chunks = list(client.chat.completions.create(**ask, stop="three", stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "There are *"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    server.finish()
    done = [json.loads(line) for line in log.read_text().splitlines() if '"done"' in line]
    assert [d["finish_reason"] for d in done] == ["stop"] * 3
    assert done[1]["completion_tokens"] == r.usage.completion_tokens and done[1]["prompt_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"model": "deepseek-reasoner"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "deepseek-reasoner", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop"),
    ({"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
    ({"model": "deepseek-reasoner", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ([1, 2], None),
])
def test_malformed_requests_are_400_in_openai_format(server, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.slow
def test_prompt_over_the_context_is_400_with_the_numbers(server):
    client = OpenAI(api_key="unused", base_url=server.url)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-reasoner",
                                       messages=[{"role": "user", "content": "apple " * 600}])
    assert e.value.code == "context_length_exceeded"
    assert re.search(r"maximum context length is 512 tokens\. However, your messages resulted in 6\d\d tokens",
                     e.value.message)
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.slow
def test_parallel_clients_get_what_a_single_client_gets(server):
    """Different prompts (lengths) and budgets: queued one at a time, each stream stays its own."""
    client = OpenAI(api_key="unused", base_url=server.url)

    def ask(i: int) -> tuple:
        stream = client.chat.completions.create(
            model="deepseek-reasoner", messages=[{"role": "user", "content": "count " * (1 + 5 * i)}],
            max_tokens=3 + 5 * i, stream=True, stream_options={"include_usage": True})
        reasoning = content = ""
        finish = usage = None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices:
                reasoning += chunk.choices[0].delta.reasoning_content or ""
                content += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return (reasoning, content, finish, usage.prompt_tokens, usage.completion_tokens,
                usage.completion_tokens_details.reasoning_tokens)

    alone = [ask(i) for i in range(4)]
    assert len({a[3] for a in alone}) == 4 and alone[3][:3] == (steered.REASONING, steered.ANSWER, "stop")
    assert alone[0][2] == "length" and alone[0][0] == "Let me count"
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, range(4)))
        assert together == alone


@pytest.mark.slow
def test_client_disconnect_stops_generation(looping_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3000}
    with httpx.stream("POST", looping_server.url + "/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        chunks = [json.loads(line[6:]) for _, line in zip(range(4), (x for x in lines if x.startswith("data: ")))]
    assert chunks[-1]["choices"][0]["delta"]["reasoning_content"] in (" think", " more", " and")
    done = looping_server.done_record(chunks[0]["id"])
    assert done["finish_reason"] == "interrupted" and 3 <= done["completion_tokens"] < 3000

    # A non-streaming request whose client gives up stops too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(looping_server.url + "/chat/completions", json={**body, "stream": False}, headers=headers,
                   timeout=httpx.Timeout(30, read=1.5))
    request_id = looping_server.records("prompt")[-1]["id"]
    done = looping_server.done_record(request_id)
    assert done["finish_reason"] == "interrupted" and done["completion_tokens"] < 3000

    # The worker is free again.
    client = OpenAI(api_key=KEY, base_url=looping_server.url)
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, timeout=30)
    assert reply.choices[0].message.reasoning_content == "think more and think more"


@pytest.mark.slow
def test_queue_limit_is_429(looping_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3000}
    url = looping_server.url + "/chat/completions"
    with httpx.Client(timeout=60, headers=headers) as running, httpx.Client(timeout=60, headers=headers) as running2, \
            httpx.Client(timeout=60, headers=headers) as waiting:
        # a2 only once a is generating: sent at once, it could find a still waiting for the worker (a full queue).
        with running.stream("POST", url, json=body) as a:
            lines = a.iter_lines()  # kept: a dropped line iterator would close the connection
            next(x for x in lines if '"reasoning_content": "' in x)  # a is generating
            with running2.stream("POST", url, json=body) as a2:
                lines2 = a2.iter_lines()
                next(x for x in lines2 if '"reasoning_content": "' in x)  # and a2 beside it (--parallel 2)
                with waiting.stream("POST", url, json=body) as b:  # queued behind them: its headers come at once
                    assert b.status_code == 200
                    client = OpenAI(api_key=KEY, base_url=looping_server.url, max_retries=0)
                    with pytest.raises(openai.RateLimitError) as e:
                        client.chat.completions.create(model="deepseek-reasoner",
                                                       messages=[{"role": "user", "content": "hi"}])
                    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
                    assert int(e.value.response.headers["Retry-After"]) >= 1
                    # Admitted to the queue (or not) before rendering: a prompt over the context still gets 429.
                    with pytest.raises(openai.RateLimitError):
                        client.chat.completions.create(model="deepseek-reasoner",
                                                       messages=[{"role": "user", "content": "apple " * 5000}])
    # Both gone: the queue drains (b may wait a moment until the worker drops it) and a new request is served.
    client = OpenAI(api_key=KEY, base_url=looping_server.url, max_retries=0)
    deadline = time.monotonic() + 20
    while True:
        try:
            reply = client.chat.completions.create(model="deepseek-reasoner", max_tokens=2, timeout=30,
                                                   messages=[{"role": "user", "content": "hi"}])
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert reply.choices[0].message.reasoning_content == "think more"


@pytest.mark.slow
def test_api_key(looping_server):
    client = OpenAI(api_key="wrong", base_url=looping_server.url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(looping_server.url + "/chat/completions", json={"model": "deepseek-reasoner", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(looping_server.url + "/models").status_code == 401
    assert httpx.get(looping_server.root + "/health").status_code == 200
    models = httpx.get(looping_server.url + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "deepseek-reasoner" in [m["id"] for m in models["data"]]


def test_exposure_warning_and_stop_scanner():
    from r1cli.serve import StopScanner, exposure_warning

    assert "without --api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None
    assert all(exposure_warning(h, None) is None for h in ("127.0.0.1", "::1", "localhost"))
    s = StopScanner(["END", "##"])
    assert s.feed("abc E") == ("abc ", False) and s.feed("N") == ("", False)
    assert s.feed("x #") == ("ENx ", False) and s.feed("#tail") == ("", True)
    s = StopScanner(["END"])
    assert s.feed("ab EN") == ("ab ", False) and s.flush() == "EN"


# --- the client: r1 chat --url ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_url_against_r1_serve(server, tmp_path):
    env = r1_env(tmp_path, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(sys.executable, ["-m", "r1cli", "chat", "--url", server.url, "--no-history"], env=env,
                          dimensions=(40, 120), encoding="utf-8", timeout=90, cwd=str(tmp_path))
    child.expect(re.escape(server.url))
    child.expect(">>>")
    child.send("How many pears?\r")
    child.expect(r"Thought for \d+\.\d s")  # the panel collapsed to one line when the answer started
    child.expect(r"17 tokens \(8 thinking\)")
    shown = strip_ansi(child.before)
    assert "three" in shown and "pears!" in shown and steered.REASONING not in shown
    child.expect(">>>")
    child.send("/think\r")
    child.expect(re.escape(steered.REASONING))
    child.send("And now?\r")
    child.expect(r"17 tokens \(8 thinking\)")
    child.expect(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    last = server.records("prompt")[-1]["prompt"]  # the client sent answers only
    assert "How many pears?" in last and steered.ANSWER in last and steered.REASONING not in last


class _FakeServer(BaseHTTPRequestHandler):
    """Streams one canned reply; `chunks` is a list of delta dicts."""
    chunks: list[dict] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for delta in self.chunks:
            self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("chunks", [
    [{"role": "assistant", "content": ""}, {"content": "<thi"}, {"content": "nk>\nHmm, two"}, {"content": ".</th"},
     {"content": "ink>\n\nTwo"}, {"content": " pears."}],
    [{"reasoning": "Hmm, "}, {"reasoning": "two."}, {"content": "Two"}, {"content": " pears."}],
    [{"thinking": "Hmm, two."}, {"content": "Two pears."}],
    [{"reasoning_content": "Hmm, two.", "content": None}, {"reasoning_content": None, "content": "Two pears."}],
])
def test_remote_reads_reasoning_fields_or_think_tags(chunks):
    from r1cli.events import AnswerDelta, Done, ReasoningDelta
    from r1cli.remote import RemoteModel

    handler = type("Handler", (_FakeServer,), {"chunks": chunks})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        model = RemoteModel(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "any")
        events = list(model.chat([{"role": "user", "content": "pears?"}], None, {}))
    finally:
        httpd.shutdown()
        httpd.server_close()
    kinds = [type(e) for e in events]
    assert kinds.index(AnswerDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)
    stats = events[-1].stats
    assert isinstance(events[-1], Done) and (stats.reasoning, stats.content) == ("Hmm, two.", "Two pears.")
    assert stats.finish_reason == "stop" and stats.reasoning_tokens >= 1


class _FakeServerWithModels(_FakeServer):
    chunks = ({"reasoning_content": "Hmm, two."}, {"content": "Two pears."})

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.slow
def test_remote_chat_imports_no_torch(tmp_path):
    """`r1 chat --url` is a pure HTTP client: a whole turn against a server, from the command line on, loads no
    torch (events.py, remote.py, the REPL and the command line's checks stay torch-free)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServerWithModels)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    script = ("import sys\nfrom r1cli.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nprint('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    try:
        p = subprocess.run([sys.executable, "-c", script, "chat", "--url", url, "--no-history"], input="pears?\n",
                           capture_output=True, text=True, timeout=60, env=r1_env(tmp_path), check=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert p.returncode == 0, p.stderr
    assert "Two pears." in p.stdout and "Thought for" in p.stdout  # the turn ran through the REPL
    assert p.stdout.strip().endswith("no torch"), p.stdout[-300:]


@pytest.mark.slow
def test_n_choices_decode_together(steered_dir, tmp_path):
    """--parallel 3: n=3 gives three choices (the steered answer each), usage counts the prompt once and every
    completion; streamed, each delta names its choice. --parallel 1 refuses n > 1."""
    s = ServeProcess(steered_dir, tmp_path / "requests.jsonl", "--max-context", "512", "--parallel", "3")
    try:
        client = OpenAI(api_key="unused", base_url=s.url)
        messages = [{"role": "user", "content": "How many pears?"}]
        one = client.chat.completions.create(model="deepseek-reasoner", messages=messages)
        many = client.chat.completions.create(model="deepseek-reasoner", messages=messages, n=3, seed=7)
        assert [c.index for c in many.choices] == [0, 1, 2]
        assert all((c.message.content, c.message.reasoning_content, c.finish_reason)
                   == (steered.ANSWER, steered.REASONING, "stop") for c in many.choices)
        assert many.usage.prompt_tokens == one.usage.prompt_tokens
        assert many.usage.completion_tokens == 3 * one.usage.completion_tokens
        stream = client.chat.completions.create(model="deepseek-reasoner", messages=messages, n=2, stream=True,
                                                stream_options={"include_usage": True})
        content, finish, usage = ["", ""], [None, None], None
        for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                content[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
        assert content == [steered.ANSWER] * 2 and finish == ["stop"] * 2
        assert usage.completion_tokens == 2 * one.usage.completion_tokens
    finally:
        s.stop()
    s = ServeProcess(steered_dir, tmp_path / "requests1.jsonl", "--max-context", "512", "--parallel", "1")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            OpenAI(api_key="unused", base_url=s.url).chat.completions.create(
                model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}], n=2)
        assert e.value.body["param"] == "n" and "--parallel" in e.value.body["message"]
    finally:
        s.stop()
