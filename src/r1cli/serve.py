"""`r1 serve`: an OpenAI-compatible HTTP API with DeepSeek's `reasoning_content`, on Starlette and uvicorn.

One worker thread owns the model's Decoder (one KV cache, not thread-safe) and runs the requests one at a time,
in arrival order; each request's events come back to its ASGI handler through its own asyncio queue, so streams
never mix. At most `max_queue` requests wait behind the running one; past that the answer is 429. A client that
disconnects (or whose request is cancelled) stops its generation at the next token.

Every request first passes `Server.__call__`, the edge: Host (DNS rebinding), API key, Content-Type and the body's
size and arrival time are checked there, before routing. A chat request is then admitted to the queue (a cheap
length check, then a queue slot) before its prompt is rendered and tokenised, one rendering at a time. The KV
cache's prefix is reused only between requests of the same API key. SIGTERM/SIGINT end open requests with an error
(streams: an error event, then `[DONE]`) and wait for the worker to record their end.

    POST /v1/chat/completions   GET /v1/models   GET /health
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .chat_format import answer_only, build_prompt
from .errors import R1Error, UsageError
from .options import ModelOptions
from .engine import OpenModel
from .events import AnswerDelta, Done, ReasoningDelta, Start, TurnStats
from .reasoning import _partial_tag_len

DEFAULT_MAX_QUEUE = 8
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_REQUEST_TIMEOUT_S = 10.0
RETRY_AFTER_S = 1  # told to a client answered 429
SHUTDOWN_WAIT_S = 10  # at exit, how long the worker may take to stop generating and record the requests' ends
LOOPBACK_NAMES = {"localhost"}
ANY_IP = "<any IP address>"  # in an allowed-hosts set: every IP address passes
_SHUTDOWN = object()  # put into an open request's event queue when the server is stopping
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# "repetition": the repetition guard stopped a reply stuck in a loop (docs/serve.md).
FINISH = {"stop": "stop", "length": "length", "interrupted": "stop", "repetition": "repetition"}
MAX_CHOICES = 16  # 'n' at most


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self, close: bool = False) -> JSONResponse:
        """close: the request's body was not read, so the connection cannot carry another request."""
        return JSONResponse(self.body(), status_code=self.status,
                            headers={**self.headers, **({"Connection": "close"} if close else {})})


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_request")


# --- the request ---------------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    sampling: dict  # SamplingParams fields the client set
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices: more than one needs r1 serve --parallel > 1 (they share the prompt's prefill)


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(f"'{name}' must be {kind} from {lo:g} to {hi:g}, not {json.dumps(value)}", name)
    return value


def _text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{i}].content must be a string or a list of text parts (this model reads text only)",
              f"messages[{i}].content")


def parse_request(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a string such as 'deepseek-reasoner'", "model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] must be an object with a role of {', '.join(ROLES)}", f"messages[{i}].role")
        role, content = ROLES[m["role"]], _text(m.get("content"), i)
        # Only role and content go on: reasoning_content (and any <think> part) of earlier replies is never fed back.
        messages.append({"role": role, "content": answer_only(content) if role == "assistant" else content})
    if not any(m["role"] == "user" for m in messages):
        raise bad("'messages' must hold at least one user message", "messages")
    n = _number(body, "n", 1, MAX_CHOICES, integer=True) or 1
    if body.get("tools"):
        raise bad("r1 serve does not support tools", "tools")
    sampling = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "top_k": _number(body, "top_k", 0, 1 << 30, integer=True),
        "min_p": _number(body, "min_p", 0, 1),
        "max_tokens": _number(body, "max_tokens", 1, 1 << 30, integer=True)
        or _number(body, "max_completion_tokens", 1, 1 << 30, integer=True),
        "seed": _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True),
        "repetition_penalty": _number(body, "repetition_penalty", 0.01, 10),  # vLLM's extra parameter
    }
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return ChatRequest(model, messages, {k: v for k, v in sampling.items() if v is not None},
                       [s for s in stop if s], bool(stream), options.get("include_usage", False), n)


class StopScanner:
    """Cuts the answer at the first stop string; holds back a tail that may begin one until it is resolved."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf, self.held = self.held + text, ""
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            return buf[: min(hits)], True
        keep = max((_partial_tag_len(buf, s) for s in self.stops), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# --- the worker ----------------------------------------------------------------------------------------------------


class Job:
    """One request: its prompt and parameters, the asyncio queue its events go to, and a cancel flag."""

    def __init__(self, prompt, params, stop: list[str], tenant: int | None = None, n: int = 1):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.prompt, self.params, self.stop, self.n = prompt, params, stop, n
        self.tenant = tenant  # which API key sent it (None: no keys): the KV cache's prefix is reused only within one
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item) -> None:
        """From the worker thread: an event (a `Choice` when n > 1), an Exception, or None (cancelled: nothing
        more comes)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone
            self.cancelled.set()


@dataclass(frozen=True)
class Choice:
    """An event of choice `index` of a request with n > 1 (the batched worker)."""

    index: int
    event: object


def _choice(item) -> tuple[int, object]:
    return (item.index, item.event) if isinstance(item, Choice) else (0, item)


class Server:
    """The ASGI app (`Server` itself: the edge, then Starlette's routes) and the worker thread behind it.

    api_keys: the accepted bearer tokens (none: no auth); each key is its own trust domain for prefix reuse.
    allowed_hosts: the Host names accepted (besides loopback addresses), or None: Host is not checked."""

    def __init__(self, model: OpenModel, api_keys: list[str] | str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 log_path: str | Path | None = None, allowed_hosts: set[str] | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, parallel: int = 1):
        self.model = model
        self.parallel = parallel  # sequences decoded together (batch.py); 1: the Decoder, one at a time
        self.api_keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
        self.allowed_hosts = allowed_hosts
        self.max_request_bytes, self.request_timeout = max_request_bytes, request_timeout
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # bounded by admission (_admit), not here
        self._waiting = 0  # admitted requests the worker has not taken yet (rendering or queued)
        self._waiting_lock = threading.Lock()
        self._render_lock = asyncio.Lock()  # one prompt rendered and tokenised at a time: bounds their memory
        # A prompt has at least (characters / the longest token's characters) tokens: a bound known before tokenising.
        vocab = model.tokenizer.backend.get_vocab(with_added_tokens=True)
        self.max_token_chars = max(map(len, vocab), default=1) or 1
        self._cache_tenant: int | None = None  # whose request filled the KV cache
        self.active: weakref.WeakSet[Job] = weakref.WeakSet()  # requests whose client still waits
        self.closing = False
        self.lost_rank: Exception | None = None  # tensor parallel: the failed collective that stopped the server
        self.log_path = open_log(log_path) if log_path else None
        self._log_lock = threading.Lock()
        folder_name = model.folder.name if model.ref.path is not None else None
        # /health is open to anyone who can reach the server: a model's name, never the path of its folder.
        self.public_name = folder_name or model.name
        names = [model.name, model.ref.repo, model.ref.alias.name if model.ref.alias else None, folder_name,
                 "deepseek-reasoner"]
        self.names = list(dict.fromkeys(n for n in names if n))
        self.worker = threading.Thread(target=self._work if parallel == 1 else self._work_batched,
                                       name="r1-serve-worker", daemon=True)
        self.worker.start()
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"])],
            exception_handlers={ApiError: self._api_error, HTTPException: self._http_error},
        )

    def log(self, record: dict) -> None:
        """--log-requests FILE: one JSON line per rendered prompt and per finished request (for debugging)."""
        if self.log_path:
            # 0600 if it has to be created again: the file holds what users sent.
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with self._log_lock, open(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:  # finish(): the server stops
                return
            self._release()
            try:
                if job.cancelled.is_set():
                    self.log({"id": job.id, "event": "done", "finish_reason": "interrupted", "completion_tokens": 0})
                    job.put(None)
                    continue
                if job.tenant != self._cache_tenant:
                    # Another key's request filled the cache: reusing its prefix would tell this client (through
                    # cached_tokens, or the time to the first token) how that request's prompt began.
                    self.model.forget()
                    self._cache_tenant = job.tenant
                self._generate(job)
            except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                job.put(e)
                self._check_ranks(e)

    def _check_ranks(self, e: Exception) -> None:
        """Tensor parallel: a failed collective means a rank is gone. The server stops as on SIGTERM, and serve()
        then exits with the distributed exit code (docs/distributed.md)."""
        if not self.model.sharded or self.lost_rank is not None:
            return
        from .parallel import is_collective_failure

        if is_collective_failure(e):
            import signal

            self.lost_rank = e
            os.kill(os.getpid(), signal.SIGTERM)

    def _work_batched(self) -> None:
        """--parallel N > 1: up to N sequences decode together in a BatchEngine (the same KV row prefixes reused,
        and a request's n choices sharing its prefill, only within one API key), each read as its own EventStream.
        Jobs are taken from the queue only while a row is free, so --max-queue still counts the requests waiting
        beyond the running ones."""
        engine = self.model.batch(self.parallel)
        live: dict = {}  # batch.SequenceStream -> _Relay
        while True:
            while engine.active < self.parallel:
                try:
                    job = self.jobs.get(block=engine.idle)
                except queue.Empty:
                    break
                if job is None:  # finish(): the server stops
                    for stream in live:
                        stream.stop("interrupted")
                    for stream, event in engine.events():
                        self._relay(live, stream, event)
                    return
                self._release()
                if job.cancelled.is_set():
                    self.log({"id": job.id, "event": "done", "finish_reason": "interrupted", "completion_tokens": 0})
                    job.put(None)
                    continue
                try:
                    for i in range(job.n):
                        params = job.params if job.params.seed is None or i == 0 else replace(job.params, seed=job.params.seed + i)
                        live[engine.stream(job.prompt, params, share=job.tenant)] = _Relay(job, i)
                except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                    job.put(e)
            try:
                events = engine.events()
            except Exception as e:  # noqa: BLE001 - every running request gets the error; the server goes on
                for stream in list(live):
                    stream.close()
                    live.pop(stream).job.put(e)
                self._check_ranks(e)
                continue
            for stream, event in events:
                self._relay(live, stream, event)
            for stream in [s for s, relay in live.items() if relay.job.cancelled.is_set()]:
                stream.close()  # the client went away: no Done
                self._end(live.pop(stream))

    def _relay(self, live: dict, stream, event) -> None:
        """One event of a batched stream to its request; a stop string stops that stream (its Done comes next)."""
        relay = live.get(stream)
        if relay is None:
            return
        if relay.handle(event):
            stream.stop("stop")  # ends the sequence now: the text it still held (not sent) and Done are ready
            for rest in stream.take():
                relay.handle(rest)
        if relay.stats is not None:
            self._end(live.pop(stream))

    def _end(self, relay: "_Relay") -> None:
        """Log a reply's end and send its Done (None when it was abandoned)."""
        stats = relay.stats
        record = {"id": relay.job.id, "event": "done", "finish_reason": stats.finish_reason if stats else "interrupted",
                  "completion_tokens": stats.completion_tokens if stats else relay.tokens,
                  "reasoning_tokens": stats.reasoning_tokens if stats else None,
                  "prompt_tokens": stats.prompt_tokens if stats else relay.start.prompt_tokens,
                  "cached_tokens": stats.cached_tokens if stats else relay.start.cached_tokens}
        if self.parallel > 1:
            record["index"] = relay.index
        self.log(record)
        relay.put(Done(stats) if stats else None)

    def begin_shutdown(self) -> None:
        """On the event loop, when SIGTERM or SIGINT came: refuse new requests, end the open ones now."""
        self.closing = True
        for job in list(self.active):
            job.events.put_nowait(_SHUTDOWN)

    def finish(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """After the last response: stop every job and let the worker record their ends before the process exits."""
        self.closing = True
        for job in list(self.active):
            job.cancelled.set()
        self.jobs.put(None)
        self.worker.join(timeout)

    def _generate(self, job: Job) -> None:
        stream = self.model.stream(job.prompt, job.params)
        relay = _Relay(job)
        try:
            for event in stream:
                if job.cancelled.is_set():
                    break
                if relay.handle(event):  # a stop string: stop generating (EventStream.stop); its Done comes next
                    stream.stop("stop")
                if relay.stats is not None:
                    break
        finally:
            stream.close()  # a client that went away: stop generating now
            self._end(relay)

    # --- HTTP ------------------------------------------------------------------------------------------------------

    async def _api_error(self, request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    # --- the edge: every request, before routing ---------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            receive = await self._edge(scope, receive)
        except ApiError as e:
            return await e.response(close=True)(scope, receive, send)
        except _ClientGone:
            return
        await self.app(scope, receive, send)

    async def _edge(self, scope, receive):
        """Refuse what must not reach the routes; return a `receive` that replays the (bounded) body read here."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.closing:
            raise ApiError(503, "the server is shutting down; retry later", code="server_shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.allowed_hosts is not None and not host_allowed(headers.get("host", ""), self.allowed_hosts):
            # A web page whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name here.
            raise ApiError(403, f"Host '{headers.get('host', '')}' is not allowed: this server answers to "
                           f"localhost and loopback addresses (start it with --allow-host NAME to add a name)",
                           code="host_not_allowed")
        scope["r1_tenant"] = None
        if self.api_keys and scope["path"] != "/health":
            scope["r1_tenant"] = self._key_index(headers.get("authorization", ""))
        if scope["method"] != "POST":
            return receive
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            # A web page may POST text/plain (or a form) to localhost without asking first: JSON only.
            raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json', not "
                           f"'{media_type or 'none'}'", code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            raise bad(f"Content-Length is not a number: {length!r}")
        if length is not None and int(length) > self.max_request_bytes:
            raise self._too_large(int(length))
        body = await self._read_body(receive)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _too_large(self, size: int | None) -> ApiError:
        """size: the body's declared size, or None (a body without Content-Length that grew past the limit)."""
        has = f"{size} bytes" if size is not None else f"more than {self.max_request_bytes} bytes"
        return ApiError(413, f"the request body has {has}; this server takes at most {self.max_request_bytes} "
                        f"(r1 serve --max-request-bytes)", code="request_too_large")

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                size += len(message.get("body", b""))
                if size > self.max_request_bytes:
                    raise self._too_large(None)
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    return

        try:
            await asyncio.wait_for(read(), self.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.request_timeout:g} s "
                           f"(r1 serve --request-timeout)", code="request_timeout") from None
        return b"".join(chunks)

    def _key_index(self, authorization: str) -> int:
        """Which of the API keys the request sent (compared in constant time, with every key)."""
        scheme, _, given = authorization.partition(" ")
        given_bytes = given.strip().encode("latin-1")
        found = None
        for i, key in enumerate(self.api_keys):
            if hmac.compare_digest(given_bytes, key.encode()) and found is None:
                found = i
        if scheme.lower() != "bearer" or found is None:
            raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <the --api-key of r1 serve>'",
                           code="invalid_api_key")
        return found

    # --- the routes ------------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.public_name, "queued": self.jobs.qsize()})

    async def models(self, request: Request) -> JSONResponse:
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "r1cli"} for n in self.names]
        return JSONResponse({"object": "list", "data": data})

    def _admit(self, req: ChatRequest) -> None:
        """Before rendering: refuse a prompt that cannot fit however it tokenises, then take a queue slot (429)."""
        context = self.model.context
        chars = sum(len(m["content"]) for m in req.messages)
        if chars > context * self.max_token_chars:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your messages "
                           f"have {chars} characters: more than {context} tokens of at most {self.max_token_chars} "
                           f"characters each.", "messages", "context_length_exceeded")
        with self._waiting_lock:
            if self._waiting >= self.max_queue:
                raise ApiError(429, f"The server is busy: {self.max_queue} requests are already waiting; retry later",
                               code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._waiting += 1

    def _release(self) -> None:
        with self._waiting_lock:
            self._waiting -= 1

    async def chat_completions(self, request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise bad("the request body is not valid JSON: it nests too deeply") from None
        req = parse_request(body)
        if req.model not in self.names:
            raise ApiError(404, f"The model '{req.model}' does not exist: this server runs {', '.join(self.names)}",
                           "model", "model_not_found")
        if req.n > 1 and self.parallel == 1:
            raise bad(f"'n' is {req.n}: more than one choice needs r1 serve --parallel 2 or more", "n")
        self._admit(req)
        queued = False
        try:
            m = self.model
            try:
                async with self._render_lock:
                    prompt = await run_in_threadpool(build_prompt, m.tokenizer, req.messages, None, m.family)
                params = m.sampling(req.sampling)
            except R1Error as e:
                raise bad(str(e), "messages") from None
            context = m.context
            if len(prompt.ids) >= context:
                raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your "
                               f"messages resulted in {len(prompt.ids)} tokens (at least one more is needed for "
                               f"the reply).", "messages", "context_length_exceeded")
            job = Job(prompt, params, req.stop, request.scope.get("r1_tenant"), req.n)
            self.active.add(job)
            self.jobs.put(job)
            queued = True
        finally:
            if not queued:
                self._release()
        self.log({"id": job.id, "event": "prompt", "prompt": prompt.text, "prompt_tokens": len(prompt.ids)})
        if req.stream:
            return _CancelOnExit(self._sse(job, req), job, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self._complete(job, req, request))

    async def _complete(self, job: Job, req: ChatRequest, request: Request) -> dict:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        reasoning, content = [[] for _ in range(job.n)], [[] for _ in range(job.n)]
        done: dict[int, TurnStats] = {}
        try:
            while True:
                i, item = _choice(await job.events.get())
                if isinstance(item, ReasoningDelta):
                    reasoning[i].append(item.text)
                elif isinstance(item, AnswerDelta):
                    content[i].append(item.text)
                elif isinstance(item, Done):
                    done[i] = item.stats
                    if len(done) == job.n:
                        break
                elif item is _SHUTDOWN:
                    raise ApiError(503, "the server is shutting down; retry later", code="server_shutting_down",
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
                else:  # an Exception, or None: cancelled (the client is gone)
                    raise _server_error(item)
        finally:
            watcher.cancel()
            job.cancelled.set()
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(content[i]),
                                             "reasoning_content": "".join(reasoning[i]) or None},
                    "logprobs": None, "finish_reason": FINISH[done[i].finish_reason]} for i in range(job.n)]
        return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": None, "choices": choices, "usage": usage(*done.values())}

    async def _sse(self, job: Job, req: ChatRequest):
        head = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
                "system_fingerprint": None}

        def chunk(delta: dict | None, finish: str | None = None, index: int = 0, **extra) -> str:
            choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
            body = {**head, "choices": choices, **({"usage": None} if req.include_usage else {}), **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # Every delta names both fields, so `delta.reasoning_content` and `delta.content` can always be read.
        for i in range(job.n):
            yield chunk({"role": "assistant", "content": "", "reasoning_content": None}, index=i)
        done: dict[int, TurnStats] = {}
        while True:
            i, item = _choice(await job.events.get())
            if isinstance(item, ReasoningDelta):
                yield chunk({"content": None, "reasoning_content": item.text}, index=i)
            elif isinstance(item, AnswerDelta):
                yield chunk({"content": item.text, "reasoning_content": None}, index=i)
            elif isinstance(item, Done):
                yield chunk({"content": "", "reasoning_content": None}, FINISH[item.stats.finish_reason], index=i)
                done[i] = item.stats
                if len(done) < job.n:
                    continue
                if req.include_usage:
                    yield chunk(None, usage=usage(*done.values()))
                yield "data: [DONE]\n\n"
                return
            elif item is _SHUTDOWN:
                error = ApiError(503, "the server is shutting down: this reply was cut short",
                                 code="server_shutting_down")
                yield f"data: {json.dumps(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                if item is not None:
                    yield f"data: {json.dumps(_server_error(item).body())}\n\n"
                return


class _Relay:
    """One reply's events on their way to its request (choice `index` of it): the answer is cut at the first stop
    string (nothing of it or after it sent); it keeps what the request log records of the reply's end."""

    def __init__(self, job: Job, index: int = 0):
        self.job, self.index = job, index
        self.scanner = StopScanner(job.stop)
        self.start, self.tokens = Start(), 0  # what the stream said of the prompt, and of the tokens so far
        self.stopped = False  # a stop string was met
        self.stats: TurnStats | None = None  # from Done

    def put(self, item) -> None:
        self.job.put(item if self.job.n == 1 or item is None else Choice(self.index, item))

    def handle(self, event) -> bool:
        """Pass one event on (Done is kept for `Server._end`); True when it met a stop string: the caller stops the
        stream, whose Done then comes."""
        if isinstance(event, Start):
            self.start = event
        elif isinstance(event, Done):
            if self.scanner.held:
                self.put(AnswerDelta(self.scanner.flush(), self.tokens))
            self.stats = event.stats
            if self.stopped:
                self.stats.finish_reason = "stop"
        elif self.stopped:
            pass  # the text after a stop string is not sent
        elif isinstance(event, AnswerDelta) and self.job.stop:
            self.tokens = event.tokens
            text, self.stopped = self.scanner.feed(event.text)
            if text:
                self.put(AnswerDelta(text, self.tokens))
            return self.stopped
        else:
            self.tokens = event.tokens
            self.put(event)
        return False


class _CancelOnExit(StreamingResponse):
    """A streaming response that cancels its job however it ends: finished, failed, or the client disconnected."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()


class _ClientGone(Exception):
    """The client disconnected before its request's body arrived: nothing to answer."""


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _server_error(item) -> ApiError:
    if item is None:
        return ApiError(500, "the request was cancelled")
    if isinstance(item, R1Error):
        return ApiError(400, str(item))
    return ApiError(500, f"generation failed: {type(item).__name__}: {item}")


def usage(stats: TurnStats, *more: TurnStats) -> dict:
    """One request's usage; with n choices (`more`), the prompt once and the completions summed, as OpenAI counts."""
    completion = stats.completion_tokens + sum(s.completion_tokens for s in more)
    reasoning = stats.reasoning_tokens + sum(s.reasoning_tokens for s in more)
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion,
            "total_tokens": stats.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
            # DeepSeek's names for the same numbers
            "prompt_cache_hit_tokens": stats.cached_tokens,
            "prompt_cache_miss_tokens": stats.prompt_tokens - stats.cached_tokens}


# --- r1 serve ------------------------------------------------------------------------------------------------------


def check_api_keys(keys: list[str]) -> list[str]:
    """The --api-key values, refused unless a client can send them as they are (RFC 6750's bearer token: visible
    ASCII, no spaces); a key read from a file with its newline would otherwise reject every request."""
    for key in keys:
        if not key:
            raise UsageError("--api-key (or R1_API_KEY) is empty: give a key, or leave both out to serve without "
                             "one")
        if key != key.strip():
            raise UsageError("--api-key (or R1_API_KEY) begins or ends with whitespace (a newline read from a "
                             "file?): no client can send that; strip it")
        if not all("!" <= c <= "~" for c in key):
            raise UsageError("--api-key (or R1_API_KEY) may hold only visible ASCII characters, no spaces: a "
                             "bearer token in an HTTP header cannot carry others")
    return list(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, allow: list[str]) -> set[str] | None:
    """The Host names accepted besides loopback addresses, or None: not checked. Bound to a loopback address, only
    localhost, loopback addresses and the --allow-host names; bound elsewhere, Host is checked only with --allow-host
    (then those names, localhost and any IP address: a DNS-rebinding page always sends a name)."""
    names = {name.lower().rstrip(".") for name in allow}
    if is_loopback(bind_host):
        return names | LOOPBACK_NAMES
    return names | LOOPBACK_NAMES | {ANY_IP} if names else None


def host_allowed(header: str, allowed: set[str]) -> bool:
    """The Host header's name (without the port; an IPv6 address in brackets) is localhost, a loopback address, an
    allowed name, or (with ANY_IP allowed) any IP address."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else header
    else:
        name, _, port = header.rpartition(":") if ":" in header else (header, "", "")
        if port and not port.isdigit():
            return False
    name = name.rstrip(".")
    if not name:
        return False
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return name in allowed
    return ip.is_loopback or ANY_IP in allowed


def open_log(path: str | Path) -> Path:
    """--log-requests FILE, created 0600 (it holds what users sent); an existing file readable by others is made
    0600 too. A file that cannot be written fails now, not at the first request."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise R1Error(f"cannot write the request log {path}: {e.strerror or e}") from None
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine without an API key."""
    if api_key or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (f"r1 serve: warning: listening on {host} without --api-key: anyone who can reach this address can "
            f"use the model")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise R1Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def _http_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived `header_timeout`
    seconds after it opened or after its previous response ended (uvicorn bounds only an idle keep-alive wait, and
    not once a byte of the next request came)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _headers_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._headers_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None

        def _headers_late(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11


def _uvicorn_server(config, server: Server):
    """uvicorn's Server, telling ours when a stop signal comes (to end open streams with an error and [DONE]) and
    waiting after the last response for the worker to record how the requests ended."""
    import uvicorn

    class R1Uvicorn(uvicorn.Server):
        loop = None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.loop is not None and not self.should_exit:
                self.loop.call_soon_threadsafe(server.begin_shutdown)  # safe from a signal handler
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            await asyncio.to_thread(server.finish)

    return R1Uvicorn(config)


def serve(model: ModelOptions, host: str = "127.0.0.1", port: int = 8000, api_key: list[str] | str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, log_requests: str | None = None,
          allow_host: list[str] | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, repeat_guard: bool = True,
          parallel: int | None = None, shard=None, torch_device=None) -> int:
    """`model`: what to open and how (options.ModelOptions, built once by the command line). Tensor parallel
    (`shard`, `torch_device` from parallel.run_ranks): rank 0 serves HTTP and drives the model; the other ranks
    load their part and follow its steps (`follow_server`)."""
    import uvicorn

    from .engine import open_model

    if shard is not None and not shard.leader:
        return follow_server(open_model(model, shard=shard, torch_device=torch_device), shard)

    def note(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    keys = check_api_keys([api_key] if isinstance(api_key, str) else list(api_key or []))
    hosts = allowed_hosts(host, list(allow_host or []))
    if log_requests:
        open_log(log_requests)
    warning = exposure_warning(host, keys)
    if warning:
        note(warning)
    if model.speculative and parallel not in (None, 1):
        raise UsageError("--draft and --mtp decode one request at a time: drop --parallel or use --parallel 1")
    sock = bind(host, port)  # before loading: a taken port fails at once
    m = open_model(model, interactive=sys.stdin.isatty() and sys.stderr.isatty() and shard is None, announce=note,
                   shard=shard, torch_device=torch_device)
    m.defaults["repeat_guard"] = repeat_guard  # --no-repeat-guard
    if model.speculative:
        parallel = 1  # the speculative generator is batch-1 (refused with --parallel N above)
    if parallel is None:
        parallel = m.default_parallel()
    if parallel > 1:
        note(f"r1 serve: {parallel} requests decode together (--parallel), {max_queue} more may wait (--max-queue)")
    if shard is not None:
        shard.command(("serve", parallel))  # which engine the other ranks follow
    server = Server(m, keys, max_queue, log_requests, hosts, max_request_bytes, request_timeout, parallel)
    shown = f"[{host}]" if ":" in host else host
    note(f"r1 serve: {m.name} on http://{shown}:{sock.getsockname()[1]}/v1 (model names: {', '.join(server.names)})")
    config = uvicorn.Config(server, log_level="warning", timeout_graceful_shutdown=2, lifespan="off",
                            http=_http_protocol(request_timeout))
    if shard is None:
        _uvicorn_server(config, server).run(sockets=[sock])
        return 0
    # Tensor parallel: uvicorn raises the stop signal again after its shutdown; caught here, so that run_ranks then
    # tells the other ranks to exit (killed by it, rank 0 would leave them to notice a lost peer).
    import signal

    def stopped(signum, frame):
        raise _Stopped(128 + signum)

    previous = signal.signal(signal.SIGTERM, stopped)
    code = 0
    try:
        _uvicorn_server(config, server).run(sockets=[sock])
    except KeyboardInterrupt:
        code = 130
    except _Stopped as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, previous)
    if server.lost_rank is not None:
        from .parallel import DistributedError, _short

        raise DistributedError(f"rank 0: lost contact with the other ranks ({_short(server.lost_rank)}); every rank stops")
    return code


class _Stopped(Exception):
    def __init__(self, code: int):
        self.code = code


def follow_server(m: OpenModel, shard) -> int:
    """Ranks other than 0 of a tensor-parallel server: run rank 0's engine's steps (the Decoder's turns, or the
    batched engine's operations) until it says exit; return its code. Stop signals are rank 0's to handle (Ctrl-C
    reaches every rank of a terminal): it finishes the open requests, then tells the others to exit."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    command = shard.next_command()
    if command[0] == "exit":  # rank 0 failed before serving
        return command[1]
    _, parallel = command
    return m.follow() if parallel == 1 else m.batch(parallel).follow()
