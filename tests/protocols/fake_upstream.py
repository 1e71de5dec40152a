"""A fake OpenAI-compatible server on loopback: a real HTTP server in a thread.

What it does is chosen by the request's "model":

    ok          streams the whole scripted run
    gated       streams the first GATE_AT events, waits for `release()`, then the rest
    fails       streams the first GATE_AT events, then drops the connection mid-body
    silent      streams the first GATE_AT events, then says nothing (until stopped)
    error       streams the first GATE_AT events, then an `error` event
    refuse      answers 400 with an OpenAI-style error body
    redirect    answers 307 to `redirect_to`

The Responses run is realistic: reasoning deltas, a function call with
argument deltas, then a text message, each event with its sequence_number.
Chat completions stream chunks and `data: [DONE]`.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GATE_AT = 12
WAIT_LIMIT_SECONDS = 60

REASONING = ["The user ", "asks for ", "the weather; ", "call the tool."]
ARGUMENTS = ['{"city"', ': "Par', 'is"}']
ANSWER = ["It is ", "sunny ", "in Paris, ", "22 °C ", "— enjoy!"]


def response_object(response_id: str, status: str, output: list[Any]) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": 1767225600,
        "status": status,
        "model": "fake-model",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "temperature": 1.0,
        "top_p": 1.0,
        "usage": None,
    }


def responses_run(response_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a whole Responses API run, sequence numbers from 0."""
    reasoning = {"id": "rs_1", "type": "reasoning", "summary": [], "status": "in_progress"}
    call = {
        "id": "fc_1",
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": "",
        "status": "in_progress",
    }
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [],
        "status": "in_progress",
    }
    text = "".join(ANSWER)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    done_items = [
        {
            **reasoning,
            "status": "completed",
            "content": [{"type": "reasoning_text", "text": "".join(REASONING)}],
        },
        {**call, "arguments": "".join(ARGUMENTS), "status": "completed"},
        {**message, "status": "completed", "content": [{**part, "text": text}]},
    ]
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object(response_id, "in_progress", [])},
        {
            "type": "response.in_progress",
            "response": response_object(response_id, "in_progress", []),
        },
        {"type": "response.output_item.added", "output_index": 0, "item": reasoning},
    ]
    events += [
        {
            "type": "response.reasoning_text.delta",
            "item_id": "rs_1",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
        }
        for delta in REASONING
    ]
    events += [
        {
            "type": "response.reasoning_text.done",
            "item_id": "rs_1",
            "output_index": 0,
            "content_index": 0,
            "text": "".join(REASONING),
        },
        {"type": "response.output_item.done", "output_index": 0, "item": done_items[0]},
        {"type": "response.output_item.added", "output_index": 1, "item": call},
    ]
    events += [
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "fc_1",
            "output_index": 1,
            "delta": delta,
        }
        for delta in ARGUMENTS
    ]
    events += [
        {
            "type": "response.function_call_arguments.done",
            "item_id": "fc_1",
            "output_index": 1,
            "name": "get_weather",
            "arguments": "".join(ARGUMENTS),
        },
        {"type": "response.output_item.done", "output_index": 1, "item": done_items[1]},
        {"type": "response.output_item.added", "output_index": 2, "item": message},
        {
            "type": "response.content_part.added",
            "item_id": "msg_1",
            "output_index": 2,
            "content_index": 0,
            "part": part,
        },
    ]
    events += [
        {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 2,
            "content_index": 0,
            "delta": delta,
            "logprobs": [],
        }
        for delta in ANSWER
    ]
    completed = response_object(response_id, "completed", done_items)
    completed["usage"] = {"input_tokens": 12, "output_tokens": 40, "total_tokens": 52}
    events += [
        {
            "type": "response.output_text.done",
            "item_id": "msg_1",
            "output_index": 2,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "item_id": "msg_1",
            "output_index": 2,
            "content_index": 0,
            "part": {**part, "text": text},
        },
        {"type": "response.output_item.done", "output_index": 2, "item": done_items[2]},
        {"type": "response.completed", "response": completed},
    ]
    return [(e["type"], {**e, "sequence_number": n}) for n, e in enumerate(events)]


def chat_run(completion_id: str) -> list[dict[str, Any]]:
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "fake-model",
    }
    chunks = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
    ]
    chunks += [
        {**base, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
        for delta in ANSWER * 3
    ]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return chunks


def sse(event: str | None, data: str) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


@dataclass
class Call:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    body: bytes
    finished: threading.Event = field(default_factory=threading.Event)
    client_left: threading.Event = field(default_factory=threading.Event)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class FakeUpstream:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.gate = threading.Event()
        self.stopping = threading.Event()
        self.redirect_to = ""
        self.next_id = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        self.gate.set()

    def new_id(self, prefix: str) -> str:
        with self._lock:
            self.next_id += 1
            return f"{prefix}{self.next_id:04d}"

    def sent_responses_run(self, response_id: str) -> list[tuple[str, str]]:
        """The events as sent on the wire: (event name, data text)."""
        return [(name, json.dumps(data)) for name, data in responses_run(response_id)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                call = Call(self.path, dict(self.headers.items()), self.rfile.read(length))
                fake.calls.append(call)
                try:
                    self._answer(call)
                except (BrokenPipeError, ConnectionResetError):
                    call.client_left.set()
                finally:
                    call.finished.set()

            def _answer(self, call: Call) -> None:
                model = call.json.get("model", "ok")
                if model == "refuse":
                    body = {
                        "error": {
                            "message": "no such model",
                            "type": "invalid_request_error",
                            "param": "model",
                            "code": "model_not_found",
                        }
                    }
                    return self._json(400, body)
                if model == "redirect":
                    self.send_response(307)
                    self.send_header("Location", fake.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if not call.json.get("stream"):
                    return self._json(200, {"id": "resp_plain", "object": "response", "output": []})
                if call.path.endswith("/chat/completions"):
                    frames = [sse(None, json.dumps(c)) for c in chat_run(fake.new_id("chatcmpl-"))]
                    return self._stream(model, frames, sse(None, "[DONE]"), call)
                run = fake.sent_responses_run(fake.new_id("resp_"))
                return self._stream(model, [sse(name, data) for name, data in run], None, call)

            def _json(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _stream(
                self, model: str, frames: list[bytes], last: bytes | None, call: Call
            ) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                head, rest = (frames, []) if model == "ok" else (frames[:GATE_AT], frames[GATE_AT:])
                for frame in head:
                    self._chunk(frame)
                if model == "fails":
                    # Mid-body, without the chunked terminator: a broken connection.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if model == "error":
                    self._chunk(
                        sse(
                            "error",
                            json.dumps(
                                {
                                    "type": "error",
                                    "code": "server_error",
                                    "message": "the GPU fell over",
                                    "param": None,
                                    "sequence_number": GATE_AT,
                                }
                            ),
                        )
                    )
                    rest, last = [], None
                elif model in ("gated", "silent"):
                    gate = fake.gate if model == "gated" else fake.stopping
                    if not self._wait(gate, call):
                        return
                for frame in rest:
                    self._chunk(frame)
                if last is not None:
                    self._chunk(last)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _wait(self, gate: threading.Event, call: Call) -> bool:
                """Wait for the gate, watching for the client hanging up meanwhile."""
                for _ in range(int(WAIT_LIMIT_SECONDS / 0.02)):
                    if gate.wait(0.02):
                        return True
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                        call.client_left.set()
                        return False
                return False

        return Handler
