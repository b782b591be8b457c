"""llama.cpp building blocks for GGUF models: loading, chat template, token pieces and prompt checks.

They hold no scheduling (`deployments.llama_cpp.scheduler` runs the model). llama.cpp's own log
lines go to the `llama_cpp` Python logger (warnings and errors) instead of the replica's stderr.
"""

from __future__ import annotations

import ctypes
import logging
import random
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format
from llama_cpp._internals import LlamaModel

from deployments.api import (
    ContextLengthExceeded,
    EngineUnavailable,
    GenerationRequest,
    InvalidGenerationRequest,
    SamplingParams,
    default_max_tokens,
)
from deployments.llama_cpp.chat_prompt import render_all
from deployments.llama_cpp.grammar import grammar_for
from deployments.llama_cpp.tools import check_grammar, tool_grammar
from deployments.spec import EngineSettings, ModelSpec
from deployments.tool_use import HERMES_OPEN, ToolUse, generic_messages, native_messages
from deployments.weights.cache import WeightCache

_llama_logger = logging.getLogger("llama_cpp")
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level (ggml.h): 3 = warn, 4 = error
_load_errors: deque[str] = deque(maxlen=8)  # llama.cpp's error lines: why a load failed (its exception does not say)
_PENALTY_LAST_N = 64  # generated tokens the presence/frequency penalties look back over (llama-cpp-python's)


@llama_cpp.llama_log_callback
def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """Forward llama.cpp warnings and errors to Python logging (module-level: llama.cpp keeps the pointer)."""
    python_level = _LOG_LEVELS.get(level)
    if python_level is not None:
        line = text.decode("utf-8", "replace").rstrip()
        _llama_logger.log(python_level, "%s", line)
        if python_level == logging.ERROR:
            _load_errors.append(line)


def _scalar_fields(struct: type[ctypes.Structure]) -> set[str]:
    return {
        name
        for name, ctype, *_ in struct._fields_
        if issubclass(ctype, ctypes._SimpleCData) and ctype not in (ctypes.c_void_p, ctypes.c_char_p)
    }


def split_engine_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort `engine_kwargs` into llama.cpp model and context parameters; an unknown name is a config error."""
    model_fields = _scalar_fields(llama_cpp.llama_model_params)
    context_fields = _scalar_fields(llama_cpp.llama_context_params)
    unknown = sorted(set(kwargs) - model_fields - context_fields)
    if unknown:
        raise ValueError(
            f"engine_kwargs {unknown} are not llama.cpp model or context parameters "
            f"(known: {', '.join(sorted(model_fields | context_fields))})"
        )
    return (
        {k: v for k, v in kwargs.items() if k in model_fields},
        {k: v for k, v in kwargs.items() if k in context_fields},
    )


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU reports AMX (Intel Sapphire Rapids and later), from the kernel's CPU flags."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_int8" in line.split() for line in text.splitlines())


@dataclass(frozen=True)
class RepackChoice:
    """Whether llama.cpp repacks weights into the CPU's extra buffer types, and why."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


def choose_repack(setting: str, has_amx: bool | None = None) -> RepackChoice:
    """The weight repacking that is safe here: off on AMX CPUs unless the config says otherwise.

    llama.cpp's AMX buffer type crashes in ggml_backend_amx_mul_mat on the first decode
    (ggml-org/llama.cpp#20824), and repacking is all-or-nothing (`use_extra_bufts`).
    """
    if setting != "auto":
        return RepackChoice(setting == "on", f"engine.repack: {setting}")
    if cpu_has_amx() if has_amx is None else has_amx:
        return RepackChoice(False, "auto: this CPU has AMX, whose repacked path crashes (llama.cpp#20824)")
    return RepackChoice(True, "auto: no AMX on this CPU")


def load_model(path: Path, settings: EngineSettings, repack: RepackChoice) -> LlamaModel:
    """Load GGUF weights (raises ValueError if llama.cpp cannot)."""
    llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = repack.enabled
    for name, value in split_engine_kwargs(settings.engine_kwargs)[0].items():
        setattr(params, name, value)
    # verbose=True only stops llama-cpp-python from swapping the process's stdout/stderr during the load.
    return LlamaModel(path_model=str(path), params=params, verbose=True)


def open_model(spec: ModelSpec, cache: WeightCache, resources: ExitStack, repack: RepackChoice) -> LlamaModel:
    """Fetch the model's GGUF into the node's weight cache and load it; `resources` holds the lease and the model.

    A replica leases the file for its whole life, so cache eviction never removes weights in use.
    """
    path = cache.fetch(spec.source, spec.storage, label=spec.name)
    resources.enter_context(cache.lease(path))
    _load_errors.clear()
    try:
        model = load_model(path, spec.engine, repack)
    except (ValueError, RuntimeError) as exc:
        why = "; ".join(line for line in _load_errors if "failed to load model" not in line) or str(exc)
        raise EngineUnavailable(f"model {spec.name!r}: llama.cpp could not load {path.name}: {why}") from exc
    resources.callback(model.close)
    return model


def context_params(settings: EngineSettings, *, n_seq: int, n_batch: int) -> llama_cpp.llama_context_params:
    """Context parameters: `n_seq` separate KV windows of `settings.n_ctx` tokens each.

    Decode and prompt steps both run `n_threads` threads: the CPUs Ray reserves for the replica
    (ModelSpec makes them equal), so replicas sharing a node never share cores.
    """
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = settings.n_ctx * n_seq
    params.n_seq_max = n_seq
    # One KV stream per sequence: a sequence's cells never mix with another's, so its numerics do not
    # depend on where other sequences sit (with a unified cache, flash-attention tiles do).
    params.kv_unified = False
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = settings.n_threads or 1
    for name, value in split_engine_kwargs(settings.engine_kwargs)[1].items():
        setattr(params, name, value)
    return params


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


def sampler_chain(sampling: SamplingParams, n_vocab: int) -> Any:
    """A request's own llama.cpp sampler chain (free it with llama_sampler_free).

    Same stages as llama-cpp-python's `Llama.generate` uses, after the request's logit bias: penalties
    on the generated tokens, then greedy at temperature 0, else top-p, temperature and a seeded draw.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    stages = []
    if sampling.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))(*sampling.logit_bias)
        stages.append(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(sampling.logit_bias), biases))
    if sampling.presence_penalty or sampling.frequency_penalty:
        stages.append(llama_cpp.llama_sampler_init_penalties(
            n_vocab, _PENALTY_LAST_N, 1.0, sampling.frequency_penalty, sampling.presence_penalty
        ))
    if sampling.temperature <= 0:
        stages.append(llama_cpp.llama_sampler_init_greedy())
    else:
        if sampling.top_p < 1.0:
            stages.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
        stages.append(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        stages.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    for stage in stages:
        llama_cpp.llama_sampler_chain_add(chain, stage)
    return chain


class TokenPieces:
    """Token id -> bytes and end-of-generation checks, memoized (llama-cpp-python's own caps pieces at 32 bytes)."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._pieces: dict[int, bytes] = {}

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
                if n >= 0:
                    break
                size = -n
            cached = self._pieces[token] = buffer.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
