"""An in-process OpenAI-compatible chat endpoint, so the HTTP judge is tested over real loopback.

It serves POST /v1/chat/completions, checks the bearer key, records every parsed request body,
and plays one queued fault per request before answering normally.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageStat

FAULTS = ("429", "500", "slow", "malformed", "garbled", "401", "leaky")
"""What a queued fault does: 429 (Retry-After: 0) and 500 error out, slow sleeps `slow_s` then
answers, malformed is a 200 that is not JSON, garbled a 200 naming neither letter, 401 refuses,
and leaky is a 500 whose body echoes the Authorization header, to test the client's scrubbing."""


def request_images(body: dict) -> list[Image.Image]:
    """The images of a chat request's first message, decoded from their data URIs."""
    parts = body["messages"][0]["content"]
    urls = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) for url in urls]


def nearest_colour(body: dict) -> str:
    """A stand-in judge: the grid (image 1 = A, image 2 = B) whose mean colour the query is near."""
    grid_a, grid_b, query = (ImageStat.Stat(im.convert("RGB")).mean for im in request_images(body))
    distance = [
        sum((g - q) ** 2 for g, q in zip(grid, query, strict=True)) for grid in (grid_a, grid_b)
    ]
    return "A" if distance[0] <= distance[1] else "B"


class OpenAIServer:
    """The server's state: tests read `requests`, queue `faults` and set `slow_s`."""

    def __init__(self, api_key: str, answer: Callable[[dict], str]) -> None:
        self.api_key, self.answer, self.url = api_key, answer, ""
        self.requests: list[dict] = []
        self.faults: list[str] = []  # consumed one per request, front first
        self.slow_s = 1.0  # how long a "slow" fault sleeps: set it above the client's timeout
        self.lock = threading.Lock()

    def next_fault(self) -> str | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None


class _Handler(BaseHTTPRequestHandler):
    server_state: OpenAIServer  # set on the per-server subclass made by serve_openai

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        state = self.server_state
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found")
        body = json.loads(raw)
        with state.lock:
            state.requests.append(body)
        fault = state.next_fault()
        if fault == "slow":
            time.sleep(state.slow_s)
        if fault == "429":
            return self._error(
                429, "Rate limit reached", "rate_limit_exceeded", {"Retry-After": "0"}
            )
        if fault == "500":
            return self._error(500, "The server had an error", "server_error")
        if fault == "leaky":
            return self._error(500, f"upstream rejected {self.headers.get('Authorization')}", "")
        if fault == "401" or self.headers.get("Authorization") != f"Bearer {state.api_key}":
            return self._error(401, "Incorrect API key provided.", "invalid_api_key")
        if fault == "malformed":
            return self._send(200, b'{"choices": [{"message": ', "application/json")
        content = "the answer is C or maybe D" if fault == "garbled" else state.answer(body)
        reply = {
            "id": f"chatcmpl-{len(state.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
        self._send(200, json.dumps(reply).encode(), "application/json")

    def _error(self, status: int, message: str, code: str, headers: dict | None = None) -> None:
        error = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        self._send(status, json.dumps(error).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        with suppress(OSError):  # a client that timed out has already hung up
            self.send_response(status)
            for key, value in {"Content-Type": content_type, **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@contextmanager
def serve_openai(
    api_key: str, answer: Callable[[dict], str] = nearest_colour
) -> Iterator[OpenAIServer]:
    """Run an OpenAIServer on a free 127.0.0.1 port for the duration of the block."""
    state = OpenAIServer(api_key, answer)
    handler = type("Handler", (_Handler,), {"server_state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.url = f"http://127.0.0.1:{server.server_port}/v1"
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
