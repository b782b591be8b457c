"""The choices of a response: the engine's chunks, tagged with their choice index, as OpenAI choices.

A choice's tool calls come as fragments (id and name first, then pieces of the arguments), in a
stream passed on as they come (`call_deltas`), in a whole response joined into `ToolCall`s.

A request with `n` > 1 streams the chunks of its n choices interleaved; each chunk's `completion_tokens`
is the running total over all choices (so usage counts the prompt once and every choice's tokens).
Logprobs become OpenAI's chat shape (token, logprob, bytes, top_logprobs) or the completions shape
(tokens, token_logprobs, top_logprobs, text_offset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.api import GenerationChunk, TokenLogprob, ToolCallFragment
from serve_app.ingress.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    TokenLogprobEntry,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(items: tuple[TokenLogprob, ...]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprobEntry(
            token=_text(item.token), logprob=item.logprob, bytes=list(item.token),
            top_logprobs=[TopLogprob(token=_text(t), logprob=lp, bytes=list(t)) for t, lp in item.top],
        )
        for item in items
    ])


def completion_logprobs(items: tuple[TokenLogprob, ...], offset: int) -> CompletionLogprobs:
    """Completions' logprobs; `offset` is where the first token's text starts in the choice's text."""
    tokens = [_text(item.token) for item in items]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[{_text(t): lp for t, lp in item.top} for item in items],
        text_offset=offsets,
    )


def call_deltas(fragments: tuple[ToolCallFragment, ...]) -> list[ToolCallDelta]:
    """Call fragments as OpenAI stream deltas: index, id, type and name on a call's first, then arguments."""
    return [
        ToolCallDelta(index=f.index, id=f.id, type="function" if f.id else None,
                      function=FunctionCallDelta(name=f.name, arguments=f.arguments))
        for f in fragments
    ]


@dataclass
class Choice:
    """One choice as collected so far."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    offset: int = 0  # characters of text streamed so far (completions' text_offset)
    calls: list[ToolCall] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def content(self) -> str | None:
        """The message text: null when the model made calls and wrote nothing else (as OpenAI)."""
        return self.text if self.text or not self.calls else None

    def add_calls(self, fragments: tuple[ToolCallFragment, ...]) -> None:
        for fragment in fragments:
            if fragment.index == len(self.calls):
                self.calls.append(ToolCall(id=fragment.id or "", function=FunctionCall(name=fragment.name or "",
                                                                                       arguments="")))
            self.calls[fragment.index].function.arguments += fragment.arguments


class Choices:
    """Every choice of one response, filled chunk by chunk; done when all n have finished."""

    def __init__(self, n: int) -> None:
        self.items = [Choice() for _ in range(n)]
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    def add(self, chunk: GenerationChunk) -> Choice:
        choice = self.items[chunk.index]
        choice.parts.append(chunk.text)
        choice.logprobs.extend(chunk.logprobs)
        choice.add_calls(chunk.tool_calls)
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        self.prompt_tokens, self.cached_tokens = chunk.prompt_tokens, chunk.cached_tokens
        self.completion_tokens = max(self.completion_tokens, chunk.completion_tokens)
        return choice

    @property
    def done(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.items)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))
