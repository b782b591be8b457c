"""llama.cpp building blocks for GGUF models: loading, weight repacking, context parameters, token pieces.

They hold no scheduling (`deployments.llama_cpp.scheduler` runs the model). llama.cpp's own log
lines go to the `llama_cpp` Python logger (warnings and errors) instead of the replica's stderr.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp._internals import LlamaModel

from deployments.api import EngineUnavailable
from deployments.settings import EngineSettings
from deployments.spec import ModelSpec
from deployments.weights.cache import WeightCache

_llama_logger = logging.getLogger("llama_cpp")
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level (ggml.h): 3 = warn, 4 = error
_load_errors: deque[str] = deque(maxlen=8)  # llama.cpp's error lines: why a load failed (its exception does not say)


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
    # Sliding-window layers otherwise drop cells older than the window, and a prefix whose early cells
    # are gone cannot be reused (another conversation's shared system prompt, say).
    params.swa_full = settings.prefix_reuse
    for name, value in split_engine_kwargs(settings.engine_kwargs)[1].items():
        setattr(params, name, value)
    return params


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
