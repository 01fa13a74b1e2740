"""`r1 serve` as an attack surface (issue #14): what a request must be to get in, and what it can learn.

Real servers (subprocesses on the steered tiny checkpoints, as in tests/test_serve.py), reached through real
clients: the `openai` package, httpx, and raw sockets where the bytes on the wire are the point (a body that never
ends, headers that never finish, a Host header a browser would send after DNS rebinding).
"""

import json
import signal
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

import steered
from helpers import one_line_error, r1_env, run_r1
from test_serve import ServeProcess

KEY_A, KEY_B = "sk-alice", "sk-bob"
LIMIT = 100_000  # --max-request-bytes of the guarded server
CONTEXT = 512
TIMEOUT = 1.0  # --request-timeout of the guarded server


@pytest.fixture(scope="module")
def guarded(steered_dir, tmp_path_factory):
    s = ServeProcess(steered_dir, tmp_path_factory.mktemp("guard") / "requests.jsonl", "--max-context", str(CONTEXT),
                     "--api-key", KEY_A, "--api-key", KEY_B, "--max-request-bytes", str(LIMIT),
                     "--request-timeout", str(TIMEOUT), "--allow-host", "r1.internal", "--parallel", "2")
    yield s
    s.stop()


def chat_body(content: str = "hi", **extra) -> dict:
    return {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": content}], **extra}


def raw_http(server: ServeProcess, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send bytes as they are; read until the server closes. Returns (status, headers, body)."""
    host, port = server.root.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything: its answer is still there to read
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post_head(server: ServeProcess, extra: str) -> bytes:
    host = server.root.removeprefix("http://")
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY_A}\r\n"
            f"Content-Type: application/json\r\nConnection: close\r\n{extra}\r\n").encode()


def assert_openai_error(status: int, body: bytes, expected_status: int, code: str) -> dict:
    error = json.loads(body)["error"]
    assert status == expected_status and error["code"] == code and error["message"] and "type" in error, error
    return error


# --- the request's size --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_body_over_the_limit_is_413_from_content_length_before_any_byte(guarded):
    started = time.monotonic()
    status, headers, body = raw_http(guarded, post_head(guarded, "Content-Length: 5000000\r\n"))
    error = assert_openai_error(status, body, 413, "request_too_large")
    assert "5000000 bytes" in error["message"] and str(LIMIT) in error["message"]
    assert headers["content-type"] == "application/json"
    assert time.monotonic() - started < TIMEOUT  # answered at once, without waiting for the body


@pytest.mark.slow
def test_body_over_the_limit_is_413_while_reading_a_chunked_body(guarded):
    payload = json.dumps(chat_body("x" * 50)).encode() + b" " * LIMIT  # valid JSON, one byte per space
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 8192]), payload[i:i + 8192])
                      for i in range(0, len(payload), 8192)) + b"0\r\n\r\n"
    status, _, body = raw_http(guarded, post_head(guarded, "Transfer-Encoding: chunked\r\n") + chunks)
    error = assert_openai_error(status, body, 413, "request_too_large")
    assert f"more than {LIMIT} bytes" in error["message"]


@pytest.mark.slow
def test_body_just_under_the_limit_is_served(guarded):
    body = json.dumps(chat_body("How many pears?")).encode()
    body += b" " * (LIMIT - len(body))
    r = httpx.post(guarded.url + "/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == steered.ANSWER


@pytest.mark.slow
def test_a_prompt_too_long_for_any_tokenisation_is_refused_before_tokenising(guarded):
    """Over context x (the longest token's characters) characters: no tokenisation can fit it (the message counts
    characters, not tokens: it was never tokenised)."""
    client = OpenAI(api_key=KEY_A, base_url=guarded.url, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-reasoner",
                                       messages=[{"role": "user", "content": "a" * (CONTEXT * 128 + 1)}])
    assert e.value.code == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in e.value.message
    assert f"have {CONTEXT * 128 + 1} characters" in e.value.message


@pytest.mark.slow
def test_nested_json_is_a_400_json_error(guarded):
    deep = b"[" * 50_000 + b"]" * 50_000
    r = httpx.post(guarded.url + "/chat/completions", content=deep, timeout=30,
                   headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "invalid_request_error" and "nests too deeply" in r.json()["error"]["message"]


# --- what a web page can send: Content-Type and Host ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_browser_simple_request_is_415(guarded, content_type):
    """A page may POST these to localhost without a CORS preflight: the body is valid JSON, but not sent as JSON."""
    headers = {"Authorization": f"Bearer {KEY_A}"} | ({"Content-Type": content_type} if content_type else {})
    r = httpx.post(guarded.url + "/chat/completions", content=json.dumps(chat_body()).encode(), headers=headers,
                   timeout=30)
    assert_openai_error(r.status_code, r.content, 415, "unsupported_media_type")
    ok = httpx.post(guarded.url + "/chat/completions", content=json.dumps(chat_body()).encode(), timeout=60,
                    headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("LOCALHOST:8000", True), ("127.0.0.1", True), ("127.0.0.1:9", True), ("[::1]:8000", True),
    ("[::1]", True), ("r1.internal", True), ("R1.Internal:443", True),
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False), ("10.0.0.1", False),
    ("", False), ("r1.internal.evil.example", False),
])
def test_host_header_on_a_loopback_bind(guarded, host, allowed):
    """DNS rebinding: a page at evil.example re-points its name to 127.0.0.1; its requests carry Host: evil.example."""
    r = httpx.get(guarded.root + "/health", headers={"Host": host}, timeout=30)
    if allowed:
        assert r.status_code == 200 and r.json()["status"] == "ok"
    else:
        assert_openai_error(r.status_code, r.content, 403, "host_not_allowed")
        r = httpx.post(guarded.url + "/chat/completions", json=chat_body(), timeout=30,
                       headers={"Host": host, "Authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 403


def test_host_policy_off_loopback():
    from r1cli.serve import allowed_hosts, host_allowed

    assert allowed_hosts("0.0.0.0", []) is None  # bound beyond this machine: the API key is what guards it
    policy = allowed_hosts("0.0.0.0", ["llm.lan"])
    assert all(host_allowed(h, policy) for h in ("llm.lan:8000", "192.168.1.5:8000", "[fe80::1]", "localhost"))
    assert not any(host_allowed(h, policy) for h in ("evil.example", "llm.lan.evil.example", "llm.lan:http"))
    policy = allowed_hosts("::1", [])
    assert host_allowed("[::1]:80", policy) and not host_allowed("192.168.1.5", policy)


# --- API keys: who may ask, and what a request can learn of another's ---------------------------------------------


@pytest.mark.slow
def test_prefix_reuse_never_crosses_api_keys(guarded):
    """cached_tokens tells a client how many leading tokens of its prompt the cache held: with another key's
    request in the cache, that would reveal how that prompt began (a PIN, digit by digit)."""
    alice = OpenAI(api_key=KEY_A, base_url=guarded.url, max_retries=0)
    bob = OpenAI(api_key=KEY_B, base_url=guarded.url, max_retries=0)
    secret = [{"role": "user", "content": "My PIN is 4417. How many pears?"}]

    def cached(client) -> int:
        reply = client.chat.completions.create(model="deepseek-reasoner", messages=secret)
        assert reply.choices[0].message.content == steered.ANSWER
        return reply.usage.prompt_tokens_details.cached_tokens

    cached(alice)
    own = cached(alice)
    assert own > 5  # the same key reuses its own prefix
    assert cached(bob) == 0  # another key does not, even for the very same prompt
    # Back to alice: her own row (--parallel 2) kept her tokens; never bob's: batch.py gives a request only rows its
    # own key filled. (With --parallel 1, bob's request takes the one cache and alice starts from 0 again.)
    assert cached(alice) == own and cached(bob) == own  # each key reuses its own prefix only


@pytest.mark.slow
def test_every_key_is_accepted_and_others_are_not(guarded):
    for key in (KEY_A, KEY_B):
        models = httpx.get(guarded.url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert models.status_code == 200
    for header in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY_A}x"},
                   {"Authorization": f"Basic {KEY_A}"}):
        r = httpx.get(guarded.url + "/models", headers=header, timeout=30)
        assert_openai_error(r.status_code, r.content, 401, "invalid_api_key")


@pytest.mark.slow
def test_health_names_the_model_without_its_path(guarded, steered_dir):
    r = httpx.get(guarded.root + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["model"] == steered_dir.name
    assert str(steered_dir.parent) not in r.text


@pytest.mark.slow
@pytest.mark.parametrize("args, env, message", [
    (["--api-key", ""], {}, "is empty"),
    ([], {"R1_API_KEY": ""}, "is empty"),
    (["--api-key", "sk-key\n"], {}, "whitespace"),
    ([], {"R1_API_KEY": "sk-key\n"}, "whitespace"),
    (["--api-key", "sk-good", "--api-key", " sk-key"], {}, "whitespace"),
    (["--api-key", "sk key"], {}, "visible ASCII"),
])
def test_unusable_api_keys_are_usage_errors(steered_dir, tmp_path, args, env, message):
    p = run_r1("serve", steered_dir, "--port", "0", *args, env=r1_env(tmp_path, **env), timeout=60)
    assert message in one_line_error(p, 2)


# --- the request log -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_request_log_is_private(guarded):
    r = httpx.post(guarded.url + "/chat/completions", json=chat_body("a secret"), timeout=60,
                   headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200
    assert "a secret" in guarded.records("prompt")[-1]["prompt"]  # it holds what users sent
    assert stat.S_IMODE(guarded.log.stat().st_mode) == 0o600


def test_request_log_open_tightens_an_existing_file(tmp_path):
    from r1cli.errors import R1Error
    from r1cli.serve import open_log

    old = tmp_path / "old.jsonl"
    old.write_text("{}\n")
    old.chmod(0o644)
    open_log(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 and old.read_text() == "{}\n"
    with pytest.raises(R1Error, match="cannot write the request log"):
        open_log(tmp_path / "missing" / "log.jsonl")


# --- slow clients ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"])
def test_headers_that_never_finish_are_cut_off(guarded, sent):
    host, port = guarded.root.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT + 5) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server (a timeout here raises instead)
    assert time.monotonic() - started < TIMEOUT + 2


@pytest.mark.slow
def test_headers_after_a_kept_alive_response_are_bounded_too(guarded):
    host, port = guarded.root.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT + 5) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        reply = b""
        while not reply.endswith(b"}"):  # the whole response: the connection stays open for the next request
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's first line, then nothing
        started = time.monotonic()
        assert sock.recv(1024) == b""
    assert time.monotonic() - started < TIMEOUT + 2


@pytest.mark.slow
def test_a_body_that_never_finishes_is_408(guarded):
    status, _, body = raw_http(guarded, post_head(guarded, "Content-Length: 100\r\n") + b'{"model": ',
                               timeout=TIMEOUT + 5)
    assert_openai_error(status, body, 408, "request_timeout")


# --- stopping --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_ends_open_streams_with_an_error_and_done(looping_dir, tmp_path):
    s = ServeProcess(looping_dir, tmp_path / "requests.jsonl", "--max-context", "4096", "--no-repeat-guard")
    try:
        body = chat_body(stream=True, max_tokens=3000)
        with httpx.stream("POST", s.url + "/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = json.loads(next(x for x in lines if x.startswith("data: "))[6:])
            next(x for x in lines if '"reasoning_content": "' in x)  # generating
            with ThreadPoolExecutor(1) as pool:  # a whole reply, waiting behind the stream
                waiting = pool.submit(httpx.post, s.url + "/chat/completions", json={**body, "stream": False},
                                      timeout=30)
                while len(s.records("prompt")) < 2:
                    time.sleep(0.05)
                s.proc.send_signal(signal.SIGTERM)
                rest = [x[6:] for x in lines if x.startswith("data: ")]
                refused = waiting.result()
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert_openai_error(refused.status_code, refused.content, 503, "server_shutting_down")
        assert s.proc.wait(30) == -signal.SIGTERM
        ids = [first["id"], s.records("prompt")[1]["id"]]
        done = {r["id"]: r for r in s.records("done")}
        assert sorted(done) == sorted(ids) and all(r["finish_reason"] == "interrupted" for r in done.values())
        assert done[first["id"]]["completion_tokens"] >= 1
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
