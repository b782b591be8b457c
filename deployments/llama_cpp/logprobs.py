"""Log probabilities of generated tokens, from the logits llama.cpp computed for the sampled row.

As OpenAI and vLLM report them: the log-softmax of the model's raw logits (before logit bias, penalties,
temperature or a grammar), for the sampled token and the `top` most likely tokens at its position.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deployments.api import TokenLogprob


def token_logprob(logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The sampled `token`'s logprob under the row's distribution, with the `top` most likely alternatives."""
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    alternatives: tuple[tuple[bytes, float], ...] = ()
    if top > 0:
        best = np.argpartition(logits, -top)[-top:]
        best = best[np.argsort(-logits[best], kind="stable")]
        alternatives = tuple((piece(int(i)), float(logits[i]) - log_z) for i in best)
    return TokenLogprob(piece(token), float(logits[token]) - log_z, alternatives)
