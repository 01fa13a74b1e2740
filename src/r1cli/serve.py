"""`r1 serve`: an OpenAI-compatible HTTP API with DeepSeek's `reasoning_content`, on Starlette and uvicorn.

One worker thread owns the model's Generator (one KV cache, not thread-safe) and runs the requests one at a time,
in arrival order; each request's events come back to its ASGI handler through its own asyncio queue, so streams
never mix. At most `max_queue` requests wait behind the running one; past that the answer is 429. A client that
disconnects (or whose request is cancelled) stops its generation at the next token.

    POST /v1/chat/completions   GET /v1/models   GET /health
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .chat_format import answer_only, build_prompt
from .errors import R1Error
from .events import AnswerDelta, Done, ReasoningDelta, TurnStats, stream_events
from .reasoning import _partial_tag_len
from .runner import OpenModel

DEFAULT_MAX_QUEUE = 8
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {"stop": "stop", "length": "length", "interrupted": "stop"}


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


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
    if body.get("n") not in (None, 1):
        raise bad("'n' must be 1: one choice per request", "n")
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
                       [s for s in stop if s], bool(stream), options.get("include_usage", False))


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

    def __init__(self, prompt, params, stop: list[str]):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.prompt, self.params, self.stop = prompt, params, stop
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item) -> None:
        """From the worker thread: an event, an Exception, or None (cancelled: nothing more comes)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone
            self.cancelled.set()


class Server:
    def __init__(self, model: OpenModel, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 log_path: str | Path | None = None):
        self.model, self.api_key = model, api_key
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.log_path = Path(log_path) if log_path else None
        self._log_lock = threading.Lock()
        folder_name = model.folder.name if model.ref.path is not None else None
        names = [model.name, model.ref.repo, model.ref.alias.name if model.ref.alias else None, folder_name,
                 "deepseek-reasoner"]
        self.names = list(dict.fromkeys(n for n in names if n))
        threading.Thread(target=self._work, name="r1-serve-worker", daemon=True).start()
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"])],
            exception_handlers={ApiError: self._api_error, HTTPException: self._http_error},
        )

    def log(self, record: dict) -> None:
        """--log-requests FILE: one JSON line per rendered prompt and per finished request (for debugging)."""
        if self.log_path:
            with self._log_lock, self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job.cancelled.is_set():
                    self.log({"id": job.id, "event": "done", "finish_reason": "interrupted", "completion_tokens": 0})
                    job.put(None)
                    continue
                self._generate(job)
            except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                job.put(e)

    def _generate(self, job: Job) -> None:
        m = self.model
        stream = stream_events(m.generator, m.tokenizer, job.prompt, job.params)
        stop = StopScanner(job.stop)
        stats = None
        try:
            for event in stream:
                if job.cancelled.is_set():
                    break
                if isinstance(event, Done):
                    if stop.held:
                        job.put(AnswerDelta(stop.flush()))
                    stats = event.stats
                elif isinstance(event, AnswerDelta) and job.stop:
                    text, hit = stop.feed(event.text)
                    if text:
                        job.put(AnswerDelta(text))
                    if hit:
                        stats = self._end_early(stream)
                        break
                else:
                    job.put(event)
        finally:
            stream.close()  # a client that went away: stop generating now
            g = m.generator.stats
            finish = stats.finish_reason if stats else "interrupted"
            self.log({"id": job.id, "event": "done", "finish_reason": finish,
                      "completion_tokens": stats.completion_tokens if stats else g.generated_tokens,
                      "reasoning_tokens": stats.reasoning_tokens if stats else None,
                      "prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens})
        job.put(Done(stats) if stats else None)

    def _end_early(self, stream) -> TurnStats:
        """A stop string was met: stop generating and take the turn's numbers (events.stream_events' contract)."""
        try:
            event = stream.throw(KeyboardInterrupt)
            while not isinstance(event, Done):
                event = next(stream)
            stats = event.stats
        except (KeyboardInterrupt, StopIteration):
            # Met in the text released after the last token: generation had ended; count what the generator saw.
            g = self.model.generator.stats
            stats = TurnStats(prompt_tokens=g.prompt_tokens, cached_tokens=g.cached_tokens,
                              completion_tokens=g.generated_tokens)
        stats.finish_reason = "stop"
        return stats

    # --- HTTP ------------------------------------------------------------------------------------------------------

    async def _api_error(self, request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <the --api-key of r1 serve>'",
                           code="invalid_api_key")

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model.name, "queued": self.jobs.qsize()})

    async def models(self, request: Request) -> JSONResponse:
        self._check_key(request)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "r1cli"} for n in self.names]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request):
        self._check_key(request)
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        req = parse_request(body)
        if req.model not in self.names:
            raise ApiError(404, f"The model '{req.model}' does not exist: this server runs {', '.join(self.names)}",
                           "model", "model_not_found")
        m = self.model
        try:
            prompt = await run_in_threadpool(build_prompt, m.tokenizer, req.messages, None, m.family)
            params = m.sampling(req.sampling)
        except R1Error as e:
            raise bad(str(e), "messages") from None
        context = m.generator.max_len
        if len(prompt.ids) >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your messages "
                           f"resulted in {len(prompt.ids)} tokens (at least one more is needed for the reply).",
                           "messages", "context_length_exceeded")
        job = Job(prompt, params, req.stop)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"The server is busy: {self.jobs.maxsize} requests are already waiting; retry later",
                           code="rate_limit_exceeded") from None
        self.log({"id": job.id, "event": "prompt", "prompt": prompt.text, "prompt_tokens": len(prompt.ids)})
        if req.stream:
            return _CancelOnExit(self._sse(job, req), job, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self._complete(job, req, request))

    async def _complete(self, job: Job, req: ChatRequest, request: Request) -> dict:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        reasoning, content = [], []
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, ReasoningDelta):
                    reasoning.append(item.text)
                elif isinstance(item, AnswerDelta):
                    content.append(item.text)
                elif isinstance(item, Done):
                    break
                else:  # an Exception, or None: cancelled (the client is gone)
                    raise _server_error(item)
        finally:
            watcher.cancel()
            job.cancelled.set()
        message = {"role": "assistant", "content": "".join(content), "reasoning_content": "".join(reasoning) or None}
        return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": FINISH[item.stats.finish_reason]}],
                "usage": usage(item.stats)}

    async def _sse(self, job: Job, req: ChatRequest):
        head = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
                "system_fingerprint": None}

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            body = {**head, "choices": choices, **({"usage": None} if req.include_usage else {}), **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # Every delta names both fields, so `delta.reasoning_content` and `delta.content` can always be read.
        yield chunk({"role": "assistant", "content": "", "reasoning_content": None})
        while True:
            item = await job.events.get()
            if isinstance(item, ReasoningDelta):
                yield chunk({"content": None, "reasoning_content": item.text})
            elif isinstance(item, AnswerDelta):
                yield chunk({"content": item.text, "reasoning_content": None})
            elif isinstance(item, Done):
                yield chunk({"content": "", "reasoning_content": None}, FINISH[item.stats.finish_reason])
                if req.include_usage:
                    yield chunk(None, usage=usage(item.stats))
                yield "data: [DONE]\n\n"
                return
            else:
                if item is not None:
                    yield f"data: {json.dumps(_server_error(item).body())}\n\n"
                return


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


def usage(stats: TurnStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
            # DeepSeek's names for the same numbers
            "prompt_cache_hit_tokens": stats.cached_tokens,
            "prompt_cache_miss_tokens": stats.prompt_tokens - stats.cached_tokens}


# --- r1 serve ------------------------------------------------------------------------------------------------------


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


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", dtype: str = "auto", max_context: int | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, log_requests: str | None = None, quant: str = "none",
          group_size: int = 32, decode_mode: str = "auto", quant_head: bool = False,
          speculative: dict | None = None) -> None:
    import uvicorn

    from .runner import open_model

    def note(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    warning = exposure_warning(host, api_key)
    if warning:
        note(warning)
    sock = bind(host, port)  # before loading: a taken port fails at once
    m = open_model(model, device, dtype, max_context, interactive=sys.stdin.isatty() and sys.stderr.isatty(),
                   announce=note, quant=quant, group_size=group_size, decode_mode=decode_mode,
                   quant_head=quant_head, **(speculative or {}))
    server = Server(m, api_key, max_queue, log_requests)
    shown = f"[{host}]" if ":" in host else host
    note(f"r1 serve: {m.name} on http://{shown}:{sock.getsockname()[1]}/v1 (model names: {', '.join(server.names)})")
    config = uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
