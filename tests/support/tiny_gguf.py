"""Generate tiny random-weight GGUF models so engine tests run without downloading weights.

The files are deterministic for a given seed, with an SPM (`llama`) tokenizer holding the special tokens, all
256 byte-fallback tokens and a few hundred English pieces, so llama.cpp can load them and tokenize any text: a
`llama` architecture with a small Jinja chat template, and a `gemma3` one whose layers but every sixth attend
over a sliding window (llama.cpp then saves and restores only the window of a sequence's KV in those layers).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
RMS_NORM_EPS = 1e-5
WEIGHT_SCALE = 0.02
# The Gemma 3 variant: six layers, the last one global, the others over the sliding window (llama.cpp's Gemma 3
# pattern); a token's K and V take 2 KiB a layer (f16): a 100-token prompt's saved state is ~0.9 MB.
GEMMA3_EMBD = 128
GEMMA3_LAYERS = 6
GEMMA3_HEADS = 4
GEMMA3_HEADS_KV = 4
GEMMA3_HEAD_DIM = 128
GEMMA3_FF = 256
GEMMA3_CTX_TRAIN = 4096

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
SPM_SPACE = "\u2581"

_COMMON_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal "
    "point mother world near build self earth father hello model test quick brown fox jumps lazy "
    "dog story once upon Hello The This What How"
).split()
_PUNCTUATION = list(".,!?;:'\"-()[]{}<>/\\|@#$%^&*_+=~`")


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Build the SPM token list: specials, byte fallback, characters, then every word prefix.

    llama.cpp's SPM tokenizer only forms a piece through merges whose intermediate pieces are in the
    vocab, so each `▁word` comes with all its prefixes; longer pieces score higher to win merges.
    """
    tokens: list[str] = list(SPECIAL_TOKENS)
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    pieces: list[str] = [SPM_SPACE]
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    characters += [c.upper() for c in characters] + [str(d) for d in range(10)] + _PUNCTUATION
    for character in characters:
        pieces += [character, SPM_SPACE + character]
    for word in _COMMON_WORDS:
        spaced = SPM_SPACE + word
        pieces += [spaced[:end] for end in range(2, len(spaced) + 1)]
        pieces += [word[:end] for end in range(2, len(word) + 1)]
    unique_pieces = list(dict.fromkeys(pieces))
    tokens += unique_pieces
    types += [gguf.TokenType.NORMAL] * len(unique_pieces)

    scores = [0.0] * (len(SPECIAL_TOKENS) + 256)
    scores += [float(len(piece)) for piece in unique_pieces]
    return tokens, scores, [int(t) for t in types]


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Small random weights: activations stay in range through the layers."""
    return (rng.standard_normal((rows, cols)) * WEIGHT_SCALE).astype(np.float32)


def _random_tensors(rng: np.random.Generator, n_vocab: int) -> dict[str, np.ndarray]:
    """Llama tensors in numpy (rows, cols) order; gguf reverses them to ggml's (ne0, ne1)."""

    def matrix(rows: int, cols: int) -> np.ndarray:
        return _matrix(rng, rows, cols)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    tensors = {"token_embd.weight": matrix(n_vocab, N_EMBD)}
    head_dim = N_EMBD // N_HEAD
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        tensors[f"{prefix}.attn_norm.weight"] = norm()
        tensors[f"{prefix}.attn_q.weight"] = matrix(N_EMBD, N_EMBD)
        tensors[f"{prefix}.attn_k.weight"] = matrix(N_HEAD_KV * head_dim, N_EMBD)
        tensors[f"{prefix}.attn_v.weight"] = matrix(N_HEAD_KV * head_dim, N_EMBD)
        tensors[f"{prefix}.attn_output.weight"] = matrix(N_EMBD, N_EMBD)
        tensors[f"{prefix}.ffn_norm.weight"] = norm()
        tensors[f"{prefix}.ffn_gate.weight"] = matrix(N_FF, N_EMBD)
        tensors[f"{prefix}.ffn_up.weight"] = matrix(N_FF, N_EMBD)
        tensors[f"{prefix}.ffn_down.weight"] = matrix(N_EMBD, N_FF)
    tensors["output_norm.weight"] = norm()
    tensors["output.weight"] = matrix(n_vocab, N_EMBD)
    return tensors


def _random_gemma3_tensors(rng: np.random.Generator, n_vocab: int) -> dict[str, np.ndarray]:
    """Gemma 3 tensors (its output is the token embedding, as in Gemma 3 270M) in numpy (rows, cols) order."""

    def matrix(rows: int, cols: int) -> np.ndarray:
        return _matrix(rng, rows, cols)

    def norm(size: int = GEMMA3_EMBD) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    tensors = {"token_embd.weight": matrix(n_vocab, GEMMA3_EMBD), "output_norm.weight": norm()}
    heads, kv = GEMMA3_HEADS * GEMMA3_HEAD_DIM, GEMMA3_HEADS_KV * GEMMA3_HEAD_DIM
    for layer in range(GEMMA3_LAYERS):
        prefix = f"blk.{layer}"
        tensors |= {
            f"{prefix}.attn_norm.weight": norm(), f"{prefix}.attn_q.weight": matrix(heads, GEMMA3_EMBD),
            f"{prefix}.attn_k.weight": matrix(kv, GEMMA3_EMBD), f"{prefix}.attn_v.weight": matrix(kv, GEMMA3_EMBD),
            f"{prefix}.attn_q_norm.weight": norm(GEMMA3_HEAD_DIM), f"{prefix}.attn_k_norm.weight": norm(GEMMA3_HEAD_DIM),
            f"{prefix}.attn_output.weight": matrix(GEMMA3_EMBD, heads), f"{prefix}.post_attention_norm.weight": norm(),
            f"{prefix}.ffn_norm.weight": norm(), f"{prefix}.ffn_gate.weight": matrix(GEMMA3_FF, GEMMA3_EMBD),
            f"{prefix}.ffn_up.weight": matrix(GEMMA3_FF, GEMMA3_EMBD),
            f"{prefix}.ffn_down.weight": matrix(GEMMA3_EMBD, GEMMA3_FF), f"{prefix}.post_ffw_norm.weight": norm(),
        }
    return tensors


def write_tiny_llama_gguf(path: str | Path, *, seed: int = 0, n_ctx_train: int = 512) -> Path:
    """Write a deterministic tiny llama GGUF to `path` atomically (temp file + rename)."""
    if n_ctx_train <= 0:
        raise ValueError(f"n_ctx_train must be positive, got {n_ctx_train}")

    def hyperparameters(writer: gguf.GGUFWriter) -> None:
        writer.add_name("tiny-random-llama")
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)

    return _write(path, "llama", hyperparameters, _random_tensors, seed, TINY_CHAT_TEMPLATE)


def write_tiny_gemma3_gguf(path: str | Path, *, seed: int = 0, sliding_window: int = 64) -> Path:
    """Write a deterministic tiny Gemma 3 GGUF (no chat template: use chat_format `gemma`) to `path` atomically."""

    def hyperparameters(writer: gguf.GGUFWriter) -> None:
        writer.add_name("tiny-random-gemma3")
        writer.add_context_length(GEMMA3_CTX_TRAIN)
        writer.add_embedding_length(GEMMA3_EMBD)
        writer.add_block_count(GEMMA3_LAYERS)
        writer.add_feed_forward_length(GEMMA3_FF)
        writer.add_head_count(GEMMA3_HEADS)
        writer.add_head_count_kv(GEMMA3_HEADS_KV)
        writer.add_key_length(GEMMA3_HEAD_DIM)
        writer.add_value_length(GEMMA3_HEAD_DIM)
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
        writer.add_rope_freq_base(10000.0)
        writer.add_sliding_window(sliding_window)

    return _write(path, "gemma3", hyperparameters, _random_gemma3_tensors, seed)


def _write(
    path: str | Path,
    arch: str,
    hyperparameters: Callable[[gguf.GGUFWriter], None],
    random_tensors: Callable[[np.random.Generator, int], dict[str, np.ndarray]],
    seed: int,
    chat_template: str | None = None,
) -> Path:
    """The GGUF of `arch` with the tiny tokenizer, its hyperparameters, random tensors (for the vocabulary's size)
    and chat template, written to a temp file renamed to `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, token_types = _vocabulary()
    weights = random_tensors(np.random.default_rng(seed), len(tokens))

    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(temp_name, arch=arch)
        hyperparameters(writer)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(token_types)
        writer.add_unk_token_id(UNK_TOKEN_ID)
        writer.add_bos_token_id(BOS_TOKEN_ID)
        writer.add_eos_token_id(EOS_TOKEN_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for name, tensor in weights.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def broken_ggufs(good: bytes, seed: int = 0) -> dict[str, bytes]:
    """Weights llama.cpp must refuse, by kind: a GGUF cut in half, random bytes after a valid GGUF
    header, and a well-formed GGUF of an architecture llama.cpp does not know."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "unknown-arch.gguf")
        writer = gguf.GGUFWriter(path, arch="tinyfoo")
        writer.add_context_length(64)
        writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        unknown_arch = Path(path).read_bytes()
    header = 24  # magic, version, tensor count, metadata count
    return {
        "truncated": good[: len(good) // 2],
        "garbage": good[:header] + rng.integers(0, 256, len(good) - header, dtype=np.uint8).tobytes(),
        "unknown-arch": unknown_arch,
    }
