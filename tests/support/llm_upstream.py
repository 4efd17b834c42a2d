"""A stand-in for the OpenAI, Anthropic and Gemini APIs over HTTPS on 127.0.0.3:443: answers
as the real APIs do — JSON, and server-sent events the way each streams — with the usage each
reports. Built to the APIs' documented wire formats (no recordings: nothing here may reach the
real APIs).

A model name chooses how an answer goes wrong: ``…-cut`` closes the connection halfway through
a stream; ``…-overloaded`` (Anthropic) sends an ``error`` event mid-stream, as the API does.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field

import trustme
from aiohttp import web

from tests.support.serving import ThreadedApp

ADDRESS = "127.0.0.3"
HOSTS = ("api.openai.test", "api.anthropic.test", "gemini.googleapis.test")
TEXT = ("Paris is the capital of France. It sits on the Seine, and it has been the seat of the "
        "French state for most of the last thousand years.")
# What each API reports for TEXT (as it would count it): the figures the proxy must read.
OPENAI_USAGE = {"prompt_tokens": 24, "completion_tokens": 29, "total_tokens": 53,
                "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}
RESPONSES_USAGE = {"input_tokens": 31, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens": 93, "output_tokens_details": {"reasoning_tokens": 64},
                   "total_tokens": 124}
EMBEDDINGS_USAGE = {"prompt_tokens": 9, "total_tokens": 9}
ANTHROPIC_USAGE = {"input_tokens": 19, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 1024, "output_tokens": 30}
GEMINI_USAGE = {"promptTokenCount": 11, "candidatesTokenCount": 28, "totalTokenCount": 53,
                "thoughtsTokenCount": 14}


def words(text: str) -> list[str]:
    """The text cut as the APIs stream it: a word (with its space) at a time."""
    parts, start = [], 0
    for index, char in enumerate(text):
        if char == " " and index > start:
            parts.append(text[start:index])
            start = index
    return [*parts, text[start:]]


def sse(data: dict | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {body}\n\n".encode()


# -- OpenAI ---------------------------------------------------------------------------------

def openai_chat(model: str, stream: bool, include_usage: bool) -> list[bytes] | dict:
    base = {"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "created": 1741569952,
            "model": model, "system_fingerprint": "fp_06737a9306", "service_tier": "default"}
    if not stream:
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": TEXT, "refusal": None,
                                    "annotations": []},
            "logprobs": None, "finish_reason": "stop"}], "usage": OPENAI_USAGE}
    chunk = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    events = [sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                "content": "", "refusal": None},
                                         "logprobs": None, "finish_reason": None}], **extra})]
    events += [sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                          "logprobs": None, "finish_reason": None}], **extra})
               for piece in words(TEXT)]
    events.append(sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                             "finish_reason": "stop"}], **extra}))
    if include_usage:
        events.append(sse({**chunk, "choices": [], "usage": OPENAI_USAGE}))
    events.append(sse("[DONE]"))
    return events


def openai_responses(model: str, stream: bool) -> list[bytes] | dict:
    response = {"id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
                "object": "response", "created_at": 1741476542, "model": model,
                "output": [], "usage": None, "status": "in_progress"}
    message = {"id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6", "type": "message",
               "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": TEXT, "annotations": []}]}
    done = {**response, "status": "completed", "output": [message], "usage": RESPONSES_USAGE}
    if not stream:
        return done
    item = {**message, "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    steps = [("response.created", {"response": response}),
             ("response.in_progress", {"response": response}),
             ("response.output_item.added", {"output_index": 0, "item": item}),
             ("response.content_part.added", {**where, "part": part})]
    steps += [("response.output_text.delta", {**where, "delta": piece})
              for piece in words(TEXT)]
    steps += [("response.output_text.done", {**where, "text": TEXT}),
              ("response.content_part.done", {**where, "part": message["content"][0]}),
              ("response.output_item.done", {"output_index": 0, "item": message}),
              ("response.completed", {"response": done})]
    return [sse({"type": kind, "sequence_number": number, **fields}, kind)
            for number, (kind, fields) in enumerate(steps)]


def openai_embeddings(model: str) -> dict:
    return {"object": "list", "data": [{"object": "embedding", "index": 0,
                                        "embedding": [0.0023064255, -0.009327292, 0.0028842222]}],
            "model": model, "usage": EMBEDDINGS_USAGE}


# -- Anthropic --------------------------------------------------------------------------------

def anthropic_messages(model: str, stream: bool) -> list[bytes] | dict:
    message = {"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": None, "stop_sequence": None}
    if not stream:
        return {**message, "content": [{"type": "text", "text": TEXT}],
                "stop_reason": "end_turn", "usage": ANTHROPIC_USAGE}
    start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1}
    events = [sse({"type": "message_start", "message": {**message, "usage": start_usage}},
                  "message_start"),
              sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, "content_block_start"),
              sse({"type": "ping"}, "ping")]
    pieces = words(TEXT)
    for number, piece in enumerate(pieces):
        if model.endswith("-overloaded") and number == len(pieces) // 2:
            events.append(sse({"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "Overloaded"}}, "error"))
            return events
        events.append(sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": piece}},
                          "content_block_delta"))
    events += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                       "stop_sequence": None},
                    "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}},
                   "message_delta"),
               sse({"type": "message_stop"}, "message_stop")]
    return events


# -- Gemini -----------------------------------------------------------------------------------

def gemini(model: str, stream: bool) -> list[dict] | dict:
    def answer(text: str, usage: dict, finished: bool) -> dict:
        candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if finished:
            candidate["finishReason"] = "STOP"
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                "responseId": "4r5uaL2vG5-Hz7IP7tGpqQ0"}

    if not stream:
        return answer(TEXT, GEMINI_USAGE, True)
    pieces = [TEXT[:40], TEXT[40:90], TEXT[90:]]
    partial = {"promptTokenCount": GEMINI_USAGE["promptTokenCount"],
               "totalTokenCount": GEMINI_USAGE["promptTokenCount"]}
    return [answer(pieces[0], partial, False), answer(pieces[1], partial, False),
            answer(pieces[2], GEMINI_USAGE, True)]


# -- the server -------------------------------------------------------------------------------

@dataclass
class Seen:
    path: str
    authorization: list[str]
    api_key: list[str]  # x-api-key (Anthropic), api-key (Azure OpenAI), x-goog-api-key (Gemini)
    body: dict


@dataclass
class LlmUpstream:
    ca_file: str
    seen: list[Seen] = field(default_factory=list)


async def _send_stream(request: web.Request, events: list[bytes], cut: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for number, event in enumerate(events):
        if cut and number == len(events) // 2:
            request.transport.abort()  # the connection breaks mid-answer
            return response
        await response.write(event)
        await asyncio.sleep(0)
    await response.write_eof()
    return response


async def _send_cut_json(request: web.Request, answer: dict) -> web.StreamResponse:
    """A JSON answer whose Content-Length says all of it, cut after 60%: billed upstream,
    never whole at the client."""
    body = json.dumps(answer).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[:len(body) * 6 // 10])
    request.transport.abort()
    return response


def build_app(state: LlmUpstream) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        state.seen.append(Seen(request.path_qs, request.headers.getall("Authorization", []),
                               request.headers.getall("x-api-key", []) +
                               request.headers.getall("api-key", []) +
                               request.headers.getall("x-goog-api-key", []), body))
        path = request.path
        model = body.get("model", "")
        stream = bool(body.get("stream"))
        cut = model.endswith("-cut")
        if path == "/v1/chat/completions":
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            answer = openai_chat(model, stream, include)
        elif path == "/v1/responses":
            answer = openai_responses(model, stream)
        elif path == "/v1/embeddings":
            answer = openai_embeddings(model)
        elif path == "/v1/messages":
            answer = anthropic_messages(model, stream)
        elif path.startswith("/v1beta/models/"):
            model, _, method = path.removeprefix("/v1beta/models/").partition(":")
            streamed = method == "streamGenerateContent"
            answer = gemini(model, streamed)
            cut = model.endswith("-cut")
            if streamed and request.query.get("alt") == "sse":
                return await _send_stream(request, [sse(a) for a in answer], cut)
            return web.json_response(answer)  # without alt=sse: one JSON array
        else:
            return web.json_response({"error": {"message": f"no route {path}"}}, status=404)
        if isinstance(answer, list):
            return await _send_stream(request, answer, cut)
        if cut:
            return await _send_cut_json(request, answer)
        return web.json_response(answer)

    app = web.Application(client_max_size=8 << 20)
    app.router.add_route("POST", "/{tail:.*}", handle)
    return app


class LlmServer:
    def __init__(self, ca: trustme.CA, ca_file: str):
        self.state = LlmUpstream(ca_file)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ADDRESS, 443))
        self._server = ThreadedApp(lambda: build_app(self.state), ca.issue_cert(*HOSTS), 443,
                                   sock)

    def start(self) -> LlmUpstream:
        self._server.start()
        return self.state

    def stop(self) -> None:
        self._server.stop()

    @staticmethod
    def resolve() -> list[str]:
        return [f"{host}:443:{ADDRESS}" for host in HOSTS]
