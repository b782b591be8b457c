"""A model's chunk stream as the ingress reads it: metered on the request's account, its phases timed by spans.

The account's running usage feeds the request's rate-limit lease and audit line; the spans (`StreamSpans`)
time the wait for a slot and the generation, whether the stream ends, fails or the client leaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentResponseGenerator

from deployments.api import GenerationChunk
from serve_app.access.gate import RequestAccount
from serve_app.ingress.backpressure import Ticket
from serve_app.ingress.tracing import StreamSpans


class MeteredStream:
    """A model's chunk stream that keeps the running usage on the request's account as chunks pass, and its spans."""

    def __init__(self, stream: DeploymentResponseGenerator, account: RequestAccount, spans: StreamSpans,
                 ticket: Ticket) -> None:
        self._stream = stream
        self._account = account
        self._spans = spans
        self._ticket = ticket
        self._chunks = 0

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        chunk = await self._stream.__anext__()
        self._account.record(chunk)
        if not self._chunks:
            self._spans.first_chunk()
        self._chunks += 1
        return chunk

    async def started(self) -> None:
        """Wait for the replica's STARTED item: it took the request into a free slot."""
        await self._stream.__anext__()
        self._spans.started()

    def cancel(self) -> None:
        """Best effort: Serve's cancel() re-raises the call's own failure (e.g. back-pressure), already handled."""
        self._spans.end(self._account.prompt_tokens, self._account.completion_tokens)
        self._ticket.done()
        with contextlib.suppress(Exception):
            self._stream.cancel()
