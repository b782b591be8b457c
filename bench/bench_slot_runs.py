"""What a decode step costs when its sequences sit in consecutive slots vs scattered ones.

The replica's llama.cpp context keeps one KV stream per slot (`kv_unified = false`, for numerics that do not
depend on other sequences). llama.cpp then splits a batch into one micro-batch per run of consecutive
sequence ids (`split_equal` with `sequential`), each a full pass over the weights. This times
`llama_decode` of one token for each of 8 sequences on the shipped engine settings (slots, threads,
context per slot, weight repacking as `auto` picks it), with the 8 sequences in slots 0-7 (one run),
in two runs of 4 and in every other slot (8 runs). `PrefixPolicy` places sequences so that they add
no run; before it, the least recently used free slot was taken, which scatters them.

    python bench/bench_slot_runs.py [--prompt-tokens 100] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llama_cpp
from harness import demo_model, shipped_model

from deployments.llama_cpp.model import choose_repack, context_params, load_model

LAYOUTS = {
    "one run (slots 0-7)": list(range(8)),
    "two runs (0-3, 8-11)": [0, 1, 2, 3, 8, 9, 10, 11],
    "eight runs (0, 2, ... 14)": list(range(0, 16, 2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=100, help="tokens already in each slot's KV")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per layout (median counts)")
    args = parser.parse_args()
    settings = shipped_model().engine
    repack = choose_repack(settings.repack)
    model = load_model(Path(demo_model()[0]), settings, repack)
    ctx = llama_cpp.llama_init_from_model(model.model, context_params(settings, n_seq=16, n_batch=512))
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    positions = [0] * 16

    def decode(rows: list[tuple[int, int]]) -> float:
        """One llama_decode of (sequence id, token) rows at each sequence's next position; its seconds."""
        batch.n_tokens = len(rows)
        for i, (seq, token) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, positions[seq], 1, True
            batch.seq_id[i][0] = seq
            positions[seq] += 1
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    for seq in range(16):  # every slot holds a prompt, as in a replica that has served a while
        for start in range(0, args.prompt_tokens, 256):
            decode([(seq, 100 + (start + i) % 1000) for i in range(min(256, args.prompt_tokens - start))])
    medians = {}
    for name, seqs in LAYOUTS.items():
        decode([(seq, 200) for seq in seqs])  # warm-up
        medians[name] = statistics.median(decode([(seq, 200) for seq in seqs]) for _ in range(args.steps)) * 1000
        print(f"{name:28s} {medians[name]:7.1f} ms per step of 8 tokens", flush=True)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    first = next(iter(medians.values()))
    print(f"machine: weight repacking {repack.describe()}; {settings.n_threads} threads; "
          f"{args.prompt_tokens} tokens cached per slot")
    print("step time vs one run: " + "; ".join(f"{name} {ms / first:.2f}x" for name, ms in list(medians.items())[1:]))


if __name__ == "__main__":
    main()
