"""One tenant floods a model while another chats: FIFO against fair admission.

The shipped serve_config.yaml brought up by `modelserve up`, its model pinned to one replica, deployed
twice with `serve deploy`:

- fifo: `engine.max_waiting: 0`, so waiting requests queue in Serve's router, first come first served
  (what every release before fair scheduling did);
- fair: the shipped `engine.max_waiting`, so the replica holds them and admits by tenant share.

In each: tenant B's solo TTFT (short streamed completions, one at a time); then tenant A keeps
`--flood` closed-loop 64-token streams going (more than the replica's slots: the rest wait) for
`--seconds` while B sends its short requests one at a time. Reported per mode: B's TTFT p50/p95 and
its ratio to solo (fair's target: <= 10), and both tenants' completions and tokens per second.

    flock /tmp/modelserve-e2e.lock python bench/bench_fairness.py [--seconds 60] [--flood 24] [--modes fifo,fair]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx
import yaml
from bench_shipped import modelserve_up, replicas
from harness import PROMPTS, ROOT, percentile, retried

from serve_app.cli import tokens as cli_auth

FLOOD_TOKENS = 64
CHAT_TOKENS = 8


@dataclass
class Tenant:
    ttfts: list[float] = field(default_factory=list)
    completions: int = 0
    tokens: int = 0  # completion tokens, from the streams' usage


def stream_once(client: httpx.Client, model: str, prompt: str, max_tokens: int, into: Tenant) -> None:
    """One streamed completion (resent after a refusal's advised wait, as the OpenAI SDK does): its TTFT (first
    text, the waits included) and usage added to the tenant's tally."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    asked, first = time.perf_counter(), None
    with retried(lambda: client.stream("POST", "/v1/completions", json=body)) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices"):
                first = time.perf_counter() - asked
            if event.get("usage"):
                into.tokens += event["usage"]["completion_tokens"]
    into.ttfts.append(first if first is not None else time.perf_counter() - asked)
    into.completions += 1


def tenant_client(base: str, tenant: str) -> httpx.Client:
    token = cli_auth.mint_token(cli_auth.dev_secret(cli_auth.state_dir()), tenant, ["admin"], 3600)
    return httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Bearer {token}"})


def deploy(mode: str, model: str, base: str) -> None:
    """The shipped config with the model at one replica; fifo: nothing waits in the replica, all in Serve's queue."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == model)
    entry = copy.deepcopy(app["args"]["model"])
    entry.setdefault("deployment", {}).update(num_replicas=1, max_queued_requests=-1)
    if mode == "fifo":
        entry.setdefault("engine", {})["max_waiting"] = 0
    app["args"]["model"] = entry
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(config, file)
    deployed = subprocess.run(["serve", "deploy", file.name], check=False, capture_output=True, text=True,
                              env={"RAY_AUTH_MODE": "token", **os.environ})  # as `modelserve up` runs the serve CLI
    if deployed.returncode != 0:
        raise RuntimeError(f"serve deploy failed: {deployed.stderr}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(2)
        state = replicas(base, model)
        if state["state"] == "ready" and state["running_replicas"] == 1 and not state.get("starting_replicas"):
            return
    raise RuntimeError(f"{model} not ready in mode {mode}: {state}")


def run(mode: str, model: str, base: str, seconds: float, flood: int) -> dict[str, object]:
    deploy(mode, model, base)
    chatter, flooder = tenant_client(base, "bench-chat"), tenant_client(base, "bench-flood")
    solo = Tenant()
    for prompt in PROMPTS[:10]:
        stream_once(chatter, model, prompt, CHAT_TOKENS, solo)
    a, b, stop = Tenant(), Tenant(), threading.Event()

    def flood_worker(index: int) -> None:
        while not stop.is_set():
            stream_once(flooder, model, PROMPTS[index % len(PROMPTS)], FLOOD_TOKENS, a)

    workers = [threading.Thread(target=flood_worker, args=(i,), daemon=True) for i in range(flood)]
    for worker in workers:
        worker.start()
    time.sleep(3)  # the flood fills the slots and its queue
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        stream_once(chatter, model, PROMPTS[b.completions % len(PROMPTS)], CHAT_TOKENS, b)
    wall = time.perf_counter() - started
    stop.set()
    for worker in workers:
        worker.join()
    solo_p50 = statistics.median(solo.ttfts)
    return {
        "mode": mode, "b_solo_ttft_p50_s": round(solo_p50, 3),
        "b_ttft_p50_s": round(statistics.median(b.ttfts), 3), "b_ttft_p95_s": round(percentile(b.ttfts, 95), 3),
        "b_ratio_p50": round(statistics.median(b.ttfts) / solo_p50, 1),
        "b_completions_per_min": round(b.completions * 60 / wall, 1), "b_tokens_per_s": round(b.tokens / wall, 1),
        "a_completions_per_min": round(a.completions * 60 / wall, 1), "a_tokens_per_s": round(a.tokens / wall, 1),
        "a_ttft_p50_s": round(statistics.median(a.ttfts), 3) if a.ttfts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--flood", type=int, default=24, help="tenant A's concurrent streams (slots + waiting)")
    parser.add_argument("--modes", default="fifo,fair")
    args = parser.parse_args()
    model = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][1]["name"]
    (_, stop), base = modelserve_up(model)
    try:
        rows = [run(mode, model, base, args.seconds, args.flood) for mode in args.modes.split(",")]
    finally:
        stop()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
