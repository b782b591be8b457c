"""Server-sent events as line-based clients read them: one event per `data:` line, whatever the text holds (no Ray)."""

from __future__ import annotations

import json

import httpx

from serve_app.ingress.protocol import OpenAIError
from serve_app.ingress.responses import CompletionChoice, CompletionResponse
from serve_app.ingress.serving import sse

# str.splitlines() ends a line at each; JSON leaves them raw inside strings.
TEXT = "a\u2028b\u2029c\x85d\nе"


def events(body: str) -> list[dict]:
    """The events of a stream as httpx's iter_lines (what many SSE clients use) reads them."""
    lines = httpx.Response(200, content=body.encode()).iter_lines()
    return [json.loads(line.removeprefix("data: ")) for line in lines if line]


def test_a_chunk_whose_text_holds_unicode_line_separators_is_one_event() -> None:
    chunk = CompletionResponse(id="cmpl-1", created=0, model="m", choices=[CompletionChoice(text=TEXT)])
    frame = sse(chunk)
    assert [event["choices"][0]["text"] for event in events(frame)] == [TEXT]
    assert frame.isascii() is False  # other non-ASCII text travels as UTF-8, unescaped


def test_an_error_event_is_one_line_too() -> None:
    error = OpenAIError(400, f"bad {TEXT}", param="prompt")
    assert [event["error"]["message"] for event in events(sse(error.body))] == [f"bad {TEXT}"]
