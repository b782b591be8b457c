"""Chat messages into a prompt that carries every one of them, or a refusal naming the one it cannot.

Chat formats drop what they do not know: llama-cpp-python's `gemma` keeps only user and assistant
turns, most named formats keep one system message, some Jinja templates raise on a system role. So
each rendering is checked: every message's text must appear in the prompt, in order. When one is
missing, system messages are folded into the next user turn the way Gemma's official template does
("{system}\\n\\n{user}"), which any format with user turns carries; if even that loses a message,
the request is refused with 400 naming it. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jinja2

from deployments.api import InvalidGenerationRequest, UnsupportedGenerationRequest

Messages = Sequence[dict[str, Any]]
Formatter = Callable[..., Any]  # a llama-cpp-python chat formatter: messages -> ChatFormatterResponse


def missing_message(prompt: str, messages: Messages) -> int | None:
    """The index of the first message whose text is not in `prompt` after the previous one's, else None."""
    position = 0
    for index, message in enumerate(messages):
        text = message["content"].strip()
        if not text:
            continue
        found = prompt.find(text, position)
        if found < 0:
            return index
        position = found + len(text)
    return None


def fold_system_messages(messages: Messages) -> list[dict[str, Any]]:
    """System messages prepended to the next user turn ("{system}\\n\\n{user}"), or a user turn of their own."""
    folded: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
        elif message["role"] == "user" and pending:
            folded.append({**message, "content": "\n\n".join(t for t in (*pending, message["content"]) if t)})
            pending = []
        else:
            folded.append(dict(message))
    if pending:
        folded.append({"role": "user", "content": "\n\n".join(t for t in pending if t)})
    return folded


def render_all(formatter: Formatter, messages: Messages, **context: Any) -> Any:
    """Render `messages` so that every one reaches the model (ChatFormatterResponse), or raise a 400 error.

    `context` goes to the formatter as is (a template's `tools`)."""
    attempts = [list(messages)]
    if any(m["role"] == "system" for m in messages):
        attempts.append(fold_system_messages(messages))
    lost: int | None = None
    failure: Exception | None = None
    for attempt in attempts:
        try:
            result = formatter(messages=[dict(m) for m in attempt], **context)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:  # raise_exception() of a Jinja template
            failure = failure or exc
            continue
        missing = missing_message(result.prompt, attempt)
        if missing is None:
            return result
        if attempt is attempts[0]:
            lost = missing
    if lost is not None:
        role = messages[lost]["role"]
        raise UnsupportedGenerationRequest(
            f"This model's chat format cannot carry messages[{lost}] (role '{role}'); it would be dropped.",
            param=f"messages[{lost}].role",
        )
    raise InvalidGenerationRequest(f"This model's chat template refused the messages: {failure}", param="messages")
