"""Chat messages into a prompt that carries every one of them, or a refusal naming the one it cannot.

`ChatTemplate` picks the model's formatter (an explicit template, a named llama.cpp format or the GGUF's
own) and renders tool offers the template's way or deployments.tool_use's.

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
from llama_cpp import llama_chat_format
from llama_cpp._internals import LlamaModel

from deployments.api import InvalidGenerationRequest, UnsupportedGenerationRequest
from deployments.tool_use import HERMES_OPEN, ToolUse, generic_messages, native_messages

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


class ChatTemplate:
    """Renders chat messages into a prompt: explicit template, named llama.cpp format, or the GGUF's own."""

    def __init__(self, model: LlamaModel, chat_format: str | None, chat_template: str | None) -> None:
        if chat_template is None and chat_format is None:
            chat_template = model.metadata().get("tokenizer.chat_template")
        # A template that mentions `tools` renders them (and tool turns) itself; any other gets deployments.tool_use's.
        self.renders_tools = chat_template is not None and "tools" in chat_template
        self.hermes_calls = self.renders_tools and HERMES_OPEN in (chat_template or "")
        if chat_template is not None:
            self._format = llama_chat_format.Jinja2ChatFormatter(
                template=chat_template,
                eos_token=model.token_get_text(model.token_eos()),
                bos_token=model.token_get_text(model.token_bos()),
            )
        elif chat_format is not None:
            formatter = getattr(llama_chat_format, "format_" + chat_format.replace("-", "_"), None)
            if formatter is None:
                raise ValueError(f"unknown chat_format {chat_format!r} (llama-cpp-python has no format_{chat_format})")
            self._format = formatter
        else:
            self._format = None

    def render(
        self, messages: tuple[dict[str, Any], ...], tools: ToolUse | None = None
    ) -> tuple[str, bool, list[str]]:
        """Return (prompt, whether it already holds BOS, template stop strings)."""
        if self._format is None:
            raise InvalidGenerationRequest(
                "this model has no chat template; use /v1/completions or configure engine.chat_format",
                param="messages",
            )
        if self.renders_tools:
            offered = [{"type": "function", "function": f} for f in tools.functions] if tools else None
            result = render_all(self._format, native_messages(messages), tools=offered)
        else:
            result = render_all(self._format, generic_messages(messages, tools))
        stops = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
        return result.prompt, result.added_special, stops
