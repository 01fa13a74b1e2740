"""`r1 chat --url`: the chat REPL against any OpenAI-compatible server (r1 serve, DeepSeek's API, vLLM, ollama...).

A RemoteModel is an events.ChatModel, as engine.OpenModel is: `chat()` streams one reply as the same events
(Start, ReasoningDelta / AnswerDelta, Done(TurnStats)) in an EventStream, with the same Ctrl-C contract (an
interrupt, or `stop()`, ends the stream with Done, finish_reason 'interrupted'). The server says its usage only at
the end: Start carries no token counts, Done carries the server's. The reasoning is read from the delta's
`reasoning_content`, `reasoning` or `thinking` field; from a server that sends none, out of <think> tags in the
content. Only the standard library speaks HTTP here; nothing imports torch.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from types import SimpleNamespace
from typing import Iterator

from .errors import R1Error
from .events import (
    AnswerDelta,
    Done,
    Event,
    EventStream,
    ReasoningDelta,
    Start,
    TurnStats,
)
from .reasoning import Delta, ReasoningSplitter
from .sampling import SAMPLING_RULES

REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
SAMPLING_KEYS = tuple(SAMPLING_RULES)  # the SamplingParams fields sent with a request (OpenAI's names, and vLLM's)
TIMEOUT_S = 600  # a big model on a slow machine may think a long time before its first token


def base_url(url: str) -> str:
    """http://host:port/v1 as given; a bare http://host:port gets /v1."""
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise R1Error(f"--url {url}: give an http(s) address such as http://127.0.0.1:8000/v1")
    return url if parts.path else url + "/v1"


class RemoteModel:
    family = "remote"

    def __init__(self, base: str, name: str, api_key: str | None = None):
        self.base, self.name, self.api_key = base, name, api_key

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, name: str | None = None) -> RemoteModel:
        """Check the server answers; without a name, take the first model it lists."""
        base = base_url(url)
        try:
            with _open(urllib.request.Request(base + "/models", headers=_headers(api_key)), base) as resp:
                listed = [m.get("id") for m in json.load(resp).get("data") or [] if isinstance(m, dict)]
        except R1Error as e:
            if name is None or "HTTP 404" not in str(e):  # a server without /models still works with --model
                raise
            listed = []
        except (ValueError, AttributeError):
            listed = []
        name = name or next((m for m in listed if isinstance(m, str)), None)
        if not name:
            raise R1Error(f"{base}/models lists no model: name one with --model")
        return cls(base, name, api_key)

    def sampling(self, overrides: dict) -> SimpleNamespace:
        """For /set: what this client sends; the rest is the server's default."""
        return SimpleNamespace(**{k: overrides[k] if overrides.get(k) is not None else "server default"
                                  for k in SAMPLING_KEYS})

    def chat(self, messages: list[dict], system: str | None, overrides: dict) -> EventStream:
        """Stream one reply to `messages` (answers only: reasoning is never sent back)."""
        return EventStream(lambda stream: self._events(stream, messages, system, overrides))

    def _events(self, stream: EventStream, messages: list[dict], system: str | None, overrides: dict) -> Iterator[Event]:
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        body = {"model": self.name, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **{k: v for k, v in overrides.items() if k in SAMPLING_KEYS and v is not None}}
        request = urllib.request.Request(self.base + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={**_headers(self.api_key), "Content-Type": "application/json"})
        yield Start()  # what the server knows of the prompt comes with its usage, at the end
        received = 0  # chunks that carried text: the token count as the reply streams
        splitter = ReasoningSplitter(start_in_thinking=False)  # for <think> tags in the content
        fields_seen = False
        reasoning, answer = [], []
        reasoning_pieces = 0
        usage, finish, stopped = {}, None, None
        t0 = time.perf_counter()
        first_at = answer_at = None
        try:
            with _open(request, self.base) as resp:
                for obj in _sse(resp, self.base):
                    if stream.stop_reason is not None:
                        stopped = stream.stop_reason  # leaving the with block closes the connection: the server stops
                        break
                    usage = obj.get("usage") or usage
                    for choice in obj.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        delta = choice.get("delta") or {}
                        pieces: list[Delta] = []
                        thought = next((delta[k] for k in REASONING_FIELDS if isinstance(delta.get(k), str)
                                        and delta[k]), None)
                        if thought:
                            fields_seen = True
                            pieces.append(Delta("reasoning", thought))
                        text = delta.get("content")
                        if isinstance(text, str) and text:
                            pieces += [Delta("answer", text)] if fields_seen else splitter.feed(text)
                        if thought or text:
                            received += 1
                            first_at = first_at or time.perf_counter()
                        for piece in pieces:
                            if piece.kind == "reasoning":
                                reasoning.append(piece.text)
                                reasoning_pieces += 1
                                yield ReasoningDelta(piece.text, received)
                            else:
                                answer_at = answer_at or time.perf_counter()
                                answer.append(piece.text)
                                yield AnswerDelta(piece.text, received)
            for piece in splitter.finish():
                (reasoning if piece.kind == "reasoning" else answer).append(piece.text)
                yield (ReasoningDelta if piece.kind == "reasoning" else AnswerDelta)(piece.text, received)
        except KeyboardInterrupt:
            stopped = "interrupted"
        end = time.perf_counter()
        details = usage.get("completion_tokens_details") or {}
        completion = usage.get("completion_tokens") or received
        decode_s = end - (first_at or end)
        yield Done(TurnStats(
            reasoning="".join(reasoning), content="".join(answer),
            finish_reason=stopped or (finish if finish in ("length", "repetition") else "stop"),
            truncated_in_thinking=finish == "length" and bool(reasoning) and not answer,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            reasoning_tokens=details.get("reasoning_tokens") or reasoning_pieces,
            completion_tokens=completion,
            ttft_ms=1000 * ((first_at or end) - t0),
            thinking_ms=1000 * ((answer_at or end) - t0) if reasoning else 0.0,
            total_ms=1000 * (end - t0),
            decode_tokens_per_s=(completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0,
        ))


def _headers(api_key: str | None) -> dict:
    return {"Accept": "application/json, text/event-stream",
            **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def _open(request: urllib.request.Request, base: str):
    """urlopen with the server's own error message (OpenAI's {"error": {"message"}}) in a one-line R1Error."""
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read().decode("utf-8", "replace")).get("error")
            message = error.get("message") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError, OSError):
            message = e.reason
        raise R1Error(f"{base}: HTTP {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise R1Error(f"cannot reach {base}: {e.reason}") from None
    except OSError as e:
        raise R1Error(f"cannot reach {base}: {e}") from None


def _sse(resp, base: str) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    try:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                obj = json.loads(data)
            except ValueError:
                raise R1Error(f"{base} sent something that is not JSON: {data[:80]!r}") from None
            if isinstance(obj, dict) and obj.get("error"):
                error = obj["error"]
                raise R1Error(f"{base}: {error.get('message') if isinstance(error, dict) else error}")
            if isinstance(obj, dict):
                yield obj
    except OSError as e:  # a timeout or a dropped connection
        raise R1Error(f"the connection to {base} failed: {e}") from None
