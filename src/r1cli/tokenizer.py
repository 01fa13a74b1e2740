"""The model's tokenizer: `tokenizers` plus what r1 needs from tokenizer_config.json and generation_config.json."""

from __future__ import annotations

from pathlib import Path

import tokenizers

from .errors import CheckpointError
from .files import MAX_TOKENIZER_BYTES, read_json, read_text

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None

# The named special tokens transformers passes to chat templates as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    return read_json(path) or {}  # regular files of bounded size only (files.py)


def _token_text(value) -> str | None:
    # tokenizer_config stores a token as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> str | None:
    # transformers 5 saves the template as chat_template.jinja; older repos keep it in tokenizer_config.json,
    # either as a string or as a list of named templates.
    text = read_text(folder / "chat_template.jinja")
    if text is not None:
        return text
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Encode, decode and stream-decode text for one model, with its special token ids and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None, generation_config: dict | None = None):
        config, generation_config = config or {}, generation_config or {}
        self.backend = backend
        self.generation_config = generation_config  # sampling defaults come from it (sampling.generation_defaults)
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            if (text := _token_text(config.get(name))) is not None:
                self.special_tokens[name] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_id = self.token_to_id(self.bos_token)
        # eos: the tokenizer's own plus generation_config's (an int or a list). Never config.json's: the Qwen
        # distills carry a stale bos/eos there.
        self.eos_ids: set[int] = set()
        if (eos_id := self.token_to_id(self.eos_token)) is not None:
            self.eos_ids.add(eos_id)
        gen_eos = generation_config.get("eos_token_id")
        self.eos_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else [])
        self.pad_id = self.token_to_id(self.special_tokens.get("pad_token"))
        if self.pad_id is None and isinstance(generation_config.get("pad_token_id"), int):
            self.pad_id = generation_config["pad_token_id"]
        self.chat_template: str | None = None
        self.think_start_id = self._single_token_id("<think>")
        self.think_end_id = self._single_token_id("</think>")

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        text = read_text(tokenizer_file, MAX_TOKENIZER_BYTES)
        if text is None:
            raise CheckpointError(f"{tokenizer_file} is missing: r1 needs the model's tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise CheckpointError(f"cannot read {tokenizer_file}: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        tokenizer = cls(backend, config, _read_json(folder / "generation_config.json"))
        tokenizer.chat_template = _chat_template(folder, config)
        return tokenizer

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _single_token_id(self, text: str) -> int | None:
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns token ids into text as they arrive, never emitting half a UTF-8 character.

    Byte-level BPE can split one character over several tokens; their text is held back until it is complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, use_decode_stream: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if use_decode_stream and DecodeStream else None
        self._ids: list[int] = []  # fallback: ids from the last emitted boundary (context for the decoder)
        self._prefix_len = 0  # fallback: how many of _ids are already emitted
        self._held: list[int] = []  # DecodeStream: ids whose text is not out yet, for flush()

    def add(self, token_id: int) -> str:
        if self._stream is not None:
            piece = self._stream.step(self._tokenizer.backend, token_id)
            if piece is None:
                self._held.append(token_id)
                return ""
            self._held.clear()
            return piece
        # Prefix diff: decode from the last boundary, emit what is new once it does not end in a partial character.
        self._ids.append(token_id)
        done = self._decode(self._ids[: self._prefix_len])
        text = self._decode(self._ids)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._ids, self._prefix_len = self._ids[self._prefix_len :], len(self._ids) - self._prefix_len
        return text[len(done) :]

    def flush(self) -> str:
        """The text still held back at the end of the stream, cut at the last whole character: a stream stopped
        inside a character (max tokens in the middle of an emoji) ends before it, not with U+FFFD."""
        if self._stream is not None:
            held, self._held = self._held, []
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._decode(held).rstrip("\ufffd") if held else ""
        rest = self._decode(self._ids)[len(self._decode(self._ids[: self._prefix_len])) :]
        self._ids, self._prefix_len = [], 0
        return rest.rstrip("\ufffd")

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)
