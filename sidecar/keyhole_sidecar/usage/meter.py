"""Reading the model and token usage of one answer of a model API, as its bytes pass.

Three APIs, stated in the injection's ``spec.llm.api``:

- ``openai``: Chat Completions (``usage.prompt_tokens`` …; streamed, the last chunk carries
  ``usage`` when the client asked with ``stream_options.include_usage``), the Responses API
  (``usage.input_tokens`` …; streamed in ``response.completed``), embeddings.
- ``anthropic``: Messages (``usage.input_tokens`` plus the cache's; streamed, ``message_start``
  has the input and ``message_delta`` the output so far).
- ``gemini``: ``generateContent`` and ``streamGenerateContent`` (``usageMetadata``; streamed,
  each event carries the counts so far).

The figures are normalised (:class:`Usage`): ``input`` is every input token (cached ones too),
``output`` every output token (reasoning too); ``cached_input`` and ``reasoning`` say how many
of those were. When an answer reports no usage — a stream whose client did not ask for it, a
connection cut mid-answer — the figures are estimated from the text that passed (four
characters a token) and the request's size, and ``estimated`` says so wherever they appear.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from keyhole_sidecar.usage.sse import HEAD, TAIL, EventSplitter, Oversized

APIS = ("openai", "anthropic", "gemini")
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and code; docs/budgets.md
# A JSON answer up to this size is parsed whole (exact); beyond it, as an SSE event too large
# to hold, only its HEAD (the model) and TAIL (the usage) are kept (sse.HEAD, sse.TAIL).
WHOLE_JSON = 1 << 20


@dataclass(frozen=True, slots=True)
class Usage:
    """What one answer used. ``model`` may be None when nothing named it."""

    api: str
    model: str | None
    input: int
    output: int
    cached_input: int = 0
    reasoning: int = 0
    cache_write: int = 0  # of the input: written to the provider's prompt cache (Anthropic)
    estimated: bool = False

    def as_record(self) -> dict:
        """The audit line's ``llm`` field (the proxy adds the cost)."""
        return {"api": self.api, "model": self.model, "input_tokens": self.input,
                "output_tokens": self.output, "cached_input_tokens": self.cached_input,
                "cache_write_tokens": self.cache_write, "reasoning_tokens": self.reasoning,
                "estimated": self.estimated}


def _int(value) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _text_of(value) -> int:
    return len(value) if isinstance(value, str) else 0


class _Counts:
    """What an API's messages said so far: reported figures, or text to estimate from."""

    def __init__(self) -> None:
        self.model: str | None = None
        self.input: int | None = None
        self.output: int | None = None
        self.cached_input = 0
        self.reasoning = 0
        self.cache_write = 0
        self.chars = 0  # generated text and tool arguments seen (for an estimate)
        self.done = False  # the API's own end-of-answer marker was seen

    def openai_usage(self, usage: dict) -> None:
        if "prompt_tokens" in usage:  # Chat Completions, embeddings
            self.input = _int(usage.get("prompt_tokens"))
            self.output = _int(usage.get("completion_tokens"))
            self.cached_input = _int((usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens"))
            self.reasoning = _int((usage.get("completion_tokens_details") or {}).get(
                "reasoning_tokens"))
        else:  # the Responses API
            self.input = _int(usage.get("input_tokens"))
            self.output = _int(usage.get("output_tokens"))
            self.cached_input = _int((usage.get("input_tokens_details") or {}).get(
                "cached_tokens"))
            self.reasoning = _int((usage.get("output_tokens_details") or {}).get(
                "reasoning_tokens"))

    def anthropic_usage(self, usage: dict) -> None:
        cache_read = _int(usage.get("cache_read_input_tokens"))
        cache_write = _int(usage.get("cache_creation_input_tokens"))
        if "input_tokens" in usage:
            self.input = _int(usage.get("input_tokens")) + cache_read + cache_write
            self.cached_input, self.cache_write = cache_read, cache_write
        if "output_tokens" in usage:
            self.output = _int(usage.get("output_tokens"))  # cumulative in message_delta

    def gemini_usage(self, usage: dict) -> None:
        self.input = _int(usage.get("promptTokenCount"))
        self.reasoning = _int(usage.get("thoughtsTokenCount"))
        self.output = _int(usage.get("candidatesTokenCount")) + self.reasoning
        self.cached_input = _int(usage.get("cachedContentTokenCount"))


def _openai(counts: _Counts, message: dict) -> None:
    """One chunk or event of an OpenAI answer, or the whole answer."""
    kind = message.get("type")
    if isinstance(kind, str) and kind.startswith("response."):  # the Responses API, streamed
        if kind.endswith(("output_text.delta", "arguments.delta", "reasoning_text.delta",
                          "refusal.delta")):
            counts.chars += _text_of(message.get("delta"))
        response = message.get("response")
        if isinstance(response, dict):
            counts.model = response.get("model") or counts.model
            if isinstance(response.get("usage"), dict):
                counts.openai_usage(response["usage"])
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                counts.done = True
        return
    counts.model = message.get("model") or counts.model
    if isinstance(message.get("usage"), dict):  # a whole answer, or the last chunk
        counts.openai_usage(message["usage"])
        counts.done = True
    for choice in message.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        counts.chars += _text_of(choice.get("text"))  # the legacy Completions API
        delta = choice.get("delta")
        if isinstance(delta, dict):
            counts.chars += _text_of(delta.get("content")) + _text_of(delta.get("refusal"))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    counts.chars += _text_of((call.get("function") or {}).get("arguments"))


def _anthropic(counts: _Counts, message: dict) -> None:
    kind = message.get("type")
    if kind == "message_start":
        message = message.get("message") or {}
        kind = "message"
    if kind == "message":  # message_start's message, or a whole answer
        counts.model = message.get("model") or counts.model
        if isinstance(message.get("usage"), dict):
            counts.anthropic_usage(message["usage"])
        if message.get("stop_reason"):
            counts.done = True
    elif kind == "content_block_delta":
        delta = message.get("delta") or {}
        counts.chars += (_text_of(delta.get("text")) + _text_of(delta.get("partial_json"))
                         + _text_of(delta.get("thinking")))
    elif kind == "message_delta" and isinstance(message.get("usage"), dict):
        counts.anthropic_usage(message["usage"])
    elif kind == "message_stop":
        counts.done = True


def _gemini(counts: _Counts, message: dict) -> None:
    counts.model = message.get("modelVersion") or counts.model
    if isinstance(message.get("usageMetadata"), dict):
        counts.gemini_usage(message["usageMetadata"])
    for candidate in message.get("candidates") or ():
        if not isinstance(candidate, dict):
            continue
        for part in (candidate.get("content") or {}).get("parts") or ():
            if isinstance(part, dict):
                counts.chars += _text_of(part.get("text"))
                if isinstance(part.get("functionCall"), dict):
                    counts.chars += len(json.dumps(part["functionCall"].get("args") or {}))
        if candidate.get("finishReason"):
            counts.done = True


_READERS = {"openai": _openai, "anthropic": _anthropic, "gemini": _gemini}


class Meter:
    """Feed it the answer's body as it passes (already redacted); ask :meth:`finish` once.

    ``request_model`` and ``request_bytes`` come from the request: what an estimate falls back
    on when the answer names no model or reports no usage."""

    def __init__(self, api: str, content_type: str, *, request_model: str | None = None,
                 request_bytes: int = 0):
        self.api = api
        self._read = _READERS[api]
        self._counts = _Counts()
        self._request_model = request_model
        self.request_bytes = request_bytes  # the proxy updates it once the request is sent
        media = content_type.split(";", 1)[0].strip().lower()
        self._events = EventSplitter() if media == "text/event-stream" else None
        self._json = media.endswith("json")
        self._body: list[bytes] = []
        self._size = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        if self._events is not None:
            for _event, text in self._events.feed(data):
                if isinstance(text, Oversized):  # too large to hold: read at its ends
                    self._read(self._counts, _from_ends(self.api, text.head, text.tail))
                    continue
                if text == "[DONE]":
                    self._counts.done = True
                    continue
                try:
                    message = json.loads(text)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    self._read(self._counts, message)
            return
        if not self._json:
            return
        if self._size <= WHOLE_JSON:
            self._body.append(data)
        self._size += len(data)
        if self._size > WHOLE_JSON:
            if len(self._body) > 1:  # past the size parsed whole: keep the head only
                self._body = [b"".join(self._body)[:HEAD]]
            self._tail = (self._tail + data)[-TAIL:]

    def finish(self) -> Usage:
        """The usage the answer reported, or an estimate marked as such."""
        if self._events is None and self._json:
            self._read_json()
        counts = self._counts
        model = counts.model or self._request_model
        complete = counts.done or self._events is None  # a stream must reach its end marker
        if counts.input is not None and counts.output is not None and complete:
            return Usage(self.api, model, counts.input, counts.output, counts.cached_input,
                         counts.reasoning, counts.cache_write)
        estimated_input = counts.input if counts.input is not None else math.ceil(
            self.request_bytes / CHARS_PER_TOKEN)
        estimated_output = max(counts.output or 0, math.ceil(counts.chars / CHARS_PER_TOKEN))
        return Usage(self.api, model, estimated_input, estimated_output, counts.cached_input,
                     counts.reasoning, counts.cache_write, estimated=True)

    def _read_json(self) -> None:
        body = b"".join(self._body)
        if self._size <= WHOLE_JSON:
            try:
                whole = json.loads(body)
            except ValueError:
                return
            for message in whole if isinstance(whole, list) else [whole]:
                if isinstance(message, dict):  # a streamed Gemini answer is a JSON array
                    self._read(self._counts, message)
            return
        # Too large to hold: the model is near the head, the usage at the end.
        message: dict = {"type": "message"} if self.api == "anthropic" else {}
        for part, key in ((body[:HEAD], "model"), (self._tail, "modelVersion"),
                          (self._tail, "usage"), (self._tail, "usageMetadata")):
            found = _last_value(part, f'"{key}"'.encode())
            if found is not None:
                message[key] = found
        self._read(self._counts, message)


def _from_ends(api: str, head: str, tail: str) -> dict:
    """What an event too large to hold says that counting needs: its type and model near its
    start, its usage at its end (an image's bytes sit between)."""
    start, end = head.encode(), tail.encode()
    kind = _first_value(start, b'"type"')
    model = _first_value(start, b'"model"')
    if api == "gemini":
        return {"modelVersion": _first_value(start, b'"modelVersion"'),
                "usageMetadata": _last_value(end, b'"usageMetadata"')}
    usage = _last_value(end, b'"usage"')
    if api == "anthropic":
        if kind == "message_start":
            return {"type": kind, "message": {"model": model, "usage": usage}}
        return {"type": kind, "usage": usage}
    if isinstance(kind, str) and kind.startswith("response."):
        return {"type": kind, "response": {"model": model, "usage": usage}}
    return {"model": model, "usage": usage}


def _first_value(text: bytes, key: bytes):
    """The JSON value after the first ``"key":`` in ``text`` that parses, or None."""
    at = -1
    decoder = json.JSONDecoder()
    while (at := text.find(key, at + 1)) >= 0:
        rest = text[at + len(key):].lstrip()
        if rest.startswith(b":") and (at == 0 or text[at - 1:at] != b"\\"):
            try:
                return decoder.raw_decode(rest[1:].lstrip().decode("utf-8", "replace"))[0]
            except ValueError:
                pass
    return None


def _last_value(text: bytes, key: bytes):
    """The JSON value after the last ``"key":`` in ``text`` (inside a JSON string a quote is
    escaped, so an unescaped ``"key"`` followed by a colon is a key), or None."""
    at = len(text)
    decoder = json.JSONDecoder()
    while True:
        at = text.rfind(key, 0, at)
        if at < 0:
            return None
        rest = text[at + len(key):].lstrip()
        if rest.startswith(b":") and (at == 0 or text[at - 1:at] != b"\\"):
            try:
                value, _ = decoder.raw_decode(rest[1:].lstrip().decode("utf-8", "replace"))
                return value
            except ValueError:
                pass


_METERED = {  # the endpoints that bill tokens; listing models or uploading files does not
    "openai": ("/chat/completions", "/responses", "/embeddings", "/completions"),
    "anthropic": ("/messages",),
    "gemini": (":generateContent", ":streamGenerateContent", ":embedContent",
               ":batchEmbedContents"),
}


def is_metered(api: str, path: str) -> bool:
    """Does a request to ``path`` of ``api`` spend tokens (and so meet the budgets)?"""
    return path.split("?", 1)[0].rstrip("/").endswith(_METERED[api])


_CEILINGS = {"openai": ("max_completion_tokens", "max_tokens", "max_output_tokens"),
             "anthropic": ("max_tokens",)}


def read_request(api: str, path: str, body: bytes | None) -> tuple[str | None, int | None]:
    """The model a request asks for — in its JSON body (OpenAI, Anthropic) or its path
    (Gemini: ``/v1beta/models/<model>:generateContent``) — and the output ceiling it states
    (``max_tokens`` and its kin; Gemini's ``generationConfig.maxOutputTokens``)."""
    model = None
    if api == "gemini":
        _, found, rest = path.partition("/models/")
        model = (rest.split(":", 1)[0].split("?", 1)[0] or None) if found else None
    if not body or len(body) > WHOLE_JSON:
        return model, None
    try:
        data = json.loads(body)
    except ValueError:
        return model, None
    if not isinstance(data, dict):
        return model, None
    if api != "gemini":
        model = data.get("model") if isinstance(data.get("model"), str) else None
        fields = [data.get(name) for name in _CEILINGS[api]]
    else:
        fields = [(data.get("generationConfig") or {}).get("maxOutputTokens")]
    ceiling = next((f for f in fields if isinstance(f, int) and not isinstance(f, bool)
                    and f > 0), None)
    return model, ceiling
