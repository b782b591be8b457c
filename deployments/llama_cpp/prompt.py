"""A request into the prompt tokens one sequence decodes: rendered, tokenized and checked against its window.

Also what decoding needs to know up front: the stop strings, the token budget and the grammar the output
must match. Runs on the decode thread at admission (`deployments.llama_cpp.scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_cpp._internals import LlamaModel

from deployments.api import ContextLengthExceeded, GenerationRequest, InvalidGenerationRequest, default_max_tokens
from deployments.llama_cpp.chat_prompt import ChatTemplate
from deployments.llama_cpp.grammar import grammar_for
from deployments.llama_cpp.tools import check_grammar, tool_grammar


@dataclass(frozen=True)
class Prompt:
    """A tokenized request known to fit one sequence window, with its stop strings and token budget."""

    tokens: list[int]
    stops: tuple[str, ...]
    max_new_tokens: int
    grammar: str | None = None  # GBNF the output must match: the response_format, or a required tool call


def prepare_prompt(
    request: GenerationRequest, model: LlamaModel, template: ChatTemplate, window: int, default_budget: int | None
) -> Prompt:
    """Tokenize the request and check it against the `window` tokens a sequence may hold.

    A request without max_tokens gets `default_budget` (engine.default_max_tokens) within its tenant's cap,
    cut to what the window leaves. Logit bias token ids are checked against the vocabulary, and a
    response_format becomes its grammar (a schema that cannot be enforced is refused).
    """
    sampling = request.sampling
    n_vocab = model.n_vocab()
    if bad := [token for token, _ in sampling.logit_bias if not 0 <= token < n_vocab]:
        raise InvalidGenerationRequest(
            f"logit_bias: token ids {bad[:5]} are not in this model's vocabulary (0 to {n_vocab - 1})",
            param="logit_bias",
        )
    grammar = grammar_for(sampling.response_format, model.vocab) if sampling.response_format else None
    if request.messages is not None:
        text, has_bos, template_stops = template.render(request.messages, request.tools)
        tokens = model.tokenize(text.encode("utf-8"), add_bos=not has_bos, special=True)
        param = "messages"
        if request.tools is not None and (calls := tool_grammar(request.tools, template.hermes_calls)):
            check_grammar(model.vocab, calls)
            grammar = calls
    else:
        tokens = model.tokenize((request.prompt or "").encode("utf-8"), add_bos=True, special=False)
        template_stops, param = [], "prompt"
    n_prompt = len(tokens)
    if n_prompt == 0:
        raise InvalidGenerationRequest("the prompt is empty", param=param)
    if n_prompt >= window:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens, but the prompt has {n_prompt} tokens.",
            param=param,
        )
    budget = window - n_prompt
    if sampling.max_tokens is not None:
        if sampling.max_tokens > budget:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens; the prompt has {n_prompt} tokens "
                f"and max_tokens is {sampling.max_tokens}. Reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        budget = sampling.max_tokens
    elif (default := default_max_tokens(sampling, default_budget)) is not None:
        budget = min(budget, default)
    return Prompt(tokens, (*sampling.stop, *template_stops), budget, grammar)
