"""Soak: a mixed load for a set time, with policy reloads and one replica kill, on a private Ray cluster.

A one-node cluster of its own (free ports, its own temp dir: no lock needed) runs the app with the tiny
test model (two replicas, one ingress with the shipped ingress's runtime_env) under a policy with one
tenant. Closed-loop clients send a mix of chat, completions, streamed chat and completions, and streams
cancelled after their first token. Every
`--reload-every` seconds `serve deploy` changes the tenant's requests_per_minute (and back next time);
at the middle of the run one model replica is killed with SIGKILL.

Reported: open fds, threads and RSS of every process of the cluster at start (after a warm-up) and end,
and its RSS every `--sample-every` seconds (does growth level off?);
requests sent and their outcomes (completed + cancelled + refused with a reason must equal sent: nothing
lost, no hang, no truncated 200); 5xx, stream error events and connection errors outside the kill's
window (must be 0), each with when it ended; when the kill and the reloads came and how long they took;
requests ended in each minute (the rate must hold over the run).

    python bench/bench_soak.py [--minutes 20] [--clients 4] [--reload-every 120] [--sample-every 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from harness import PROMPTS, ROOT, process_env

from serve_app.cli.serve_file import application_entries, ingress_applications, model_applications
from serve_app.cli.tokens import mint_token
from tests.support.ray_nodes import PrivateCluster, cluster_env, free_ports
from tests.support.tiny_gguf import write_tiny_llama_gguf

MODEL, APP, TENANT = "tiny-soak", "soak", "soak"
LIMITS = (100_000, 99_999)  # requests per minute, never reached: a reload changes the policy, not the outcome
KINDS = ("chat", "completion", "chat_stream", "completion_stream", "cancel")
FAULT_GRACE_S = 5.0  # after the replacement replica runs, requests already routed may still fail


def policy(rpm: int) -> dict[str, Any]:
    return {"tenants": {TENANT: {"models": ["*"], "requests_per_minute": rpm}}}


def serve_config(http_port: int, model_path: Path, rpm: int) -> dict[str, Any]:
    # The shipped ingress's and model replicas' process environments (their malloc arenas), so the soak's RSS
    # is what a deployment gets.
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ingress_env = ingress_applications(shipped)[0]["args"]["ingress"]["deployment"]["ray_actor_options"]["runtime_env"]
    model_env = model_applications(shipped)[0]["args"]["model_defaults"]["deployment"]["ray_actor_options"]["runtime_env"]
    model = {
        "name": MODEL,
        "source": str(model_path),
        "engine": {"n_ctx": 2048, "n_threads": 1, "stream_interval_ms": 20, "parallel": 4},
        "deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1, "runtime_env": model_env}},
    }
    ingress = {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25, "runtime_env": ingress_env}}}
    apps = application_entries([model], {"ingress": ingress}, name=APP, policy=policy(rpm))
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": apps,
    }


@dataclass
class Ledger:
    """Every request's outcome with when it ended; the kill's window."""

    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (ended at, outcome) of 5xx and errors
    fault: tuple[float, float] | None = None
    started: float = field(default_factory=time.monotonic)
    per_minute: Counter = field(default_factory=Counter)  # requests ended in each minute of the run: a steady rate
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.sent += 1
            self.outcomes[outcome] += 1
            self.per_minute[int((now - self.started) // 60)] += 1
            if outcome.startswith(("refused:5", "stream_error", "connection_error", "lost")):
                self.failures.append((now, outcome))


def error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"] or json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def send(http: httpx.Client, kind: str, rng: random.Random) -> str:
    """One request of this kind; its outcome: completed, cancelled, refused:<status>:<code>, stream_error:<code>,
    connection_error, or lost:<why> (no reason given, truncated, a malformed event, or no answer in time)."""
    chat = kind.startswith("chat")
    prompt = rng.choice(PROMPTS)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(8, 48), "temperature": 0.7}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    body["stream"] = kind != "chat" and kind != "completion"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                code = error_code(response.read())
                return f"refused:{response.status_code}:{code}" if code else f"lost:{response.status_code}-no-reason"
            if not body["stream"]:
                reply = json.loads(response.read())
                return "completed" if reply["choices"][0]["finish_reason"] else "lost:no-finish-reason"
            return read_stream(response, cancel=kind == "cancel")
    except httpx.TimeoutException:
        return "lost:timeout"
    except json.JSONDecodeError:
        return "lost:malformed-event"  # an event cut in two (its JSON broken across lines) is lost to the client
    except httpx.TransportError:
        return "connection_error"


def read_stream(response: httpx.Response, cancel: bool) -> str:
    finished, done = False, False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return f"stream_error:{chunk['error'].get('code')}"
        if cancel and chunk.get("choices"):
            return "cancelled"  # leaving the `with` closes the connection: the server must free the slot
        finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
    return "completed" if finished and done else "lost:truncated"


def client_loop(base_url: str, token: str, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
        while not stop.is_set():
            ledger.record(send(http, rng.choice(KINDS), rng))


def process_stats(root_pid: int) -> dict[int, dict[str, Any]]:
    """RSS (MB), threads and open fds of `root_pid` and every process under it."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    stats = {}
    for pid in tree:
        try:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
            )
            stats[pid] = {
                "name": process_name(Path(f"/proc/{pid}/cmdline").read_bytes()),
                "rss_mb": round(int(status.get("VmRSS", "0 kB").split()[0]) / 1024, 1),
                "threads": int(status["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd")),
            }
        except (OSError, KeyError, ValueError):
            continue
    return stats


def process_name(cmdline: bytes) -> str:
    """Ray's process title (ray::...), else the program, or the Python script or module it runs."""
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if not args or not Path(args[0]).name.startswith("python"):
        return Path(args[0]).name[:60] if args else "?"
    for i, arg in enumerate(args[1:], 1):
        if arg.endswith(".py"):
            return Path(arg).name
        if arg in ("-m", "-c") and i + 1 < len(args):
            return f"python {arg} {args[i + 1][:40]}"
    return Path(args[0]).name


def kill_a_replica(cluster: PrivateCluster, ledger: Ledger) -> float:
    """SIGKILL one model replica; return the seconds until Serve runs two replicas again."""
    deployment = f"model-{MODEL}"
    before = {r["pid"] for r in cluster.replicas(MODEL, deployment)}
    started = time.monotonic()
    os.kill(min(before), signal.SIGKILL)
    while time.monotonic() - started < 300:
        running = {r["pid"] for r in cluster.replicas(MODEL, deployment) if r["state"] == "RUNNING"}
        if len(running) == 2 and running != before:
            recovered = time.monotonic()
            ledger.fault = (started, recovered + FAULT_GRACE_S)
            return recovered - started
        time.sleep(0.5)
    ledger.fault = (started, float("inf"))
    raise RuntimeError("the killed replica was not replaced within 300 s")


def reload_policy(cluster: PrivateCluster, http_port: int, model_path: Path, rpm: int) -> float:
    """`serve deploy` with the tenant's limit at `rpm`; the seconds until the ingress runs it."""
    started = time.monotonic()
    cluster.deploy(serve_config(http_port, model_path, rpm))
    while time.monotonic() - started < 120:
        ingress = cluster.details()["applications"][APP]["deployments"]["ingress"]
        if ingress["status"] == "HEALTHY" and ingress["deployment_config"].get("user_config") == policy(rpm):
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"policy with requests_per_minute={rpm} not applied within 120 s")


def compare(start: dict[int, dict[str, Any]], end: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for pid in sorted(set(start) | set(end)):
        a, b = start.get(pid), end.get(pid)
        row: dict[str, Any] = {"pid": pid, "name": (a or b)["name"]}  # type: ignore[index]
        for key in ("rss_mb", "threads", "fds"):
            row[key] = f"{a[key] if a else '-'} -> {b[key] if b else '-'}"
        rows.append(row)
    return rows


def rss_over_time(samples: list[tuple[float, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Each process's RSS at every sample (minutes into the run): whether growth levels off or keeps on."""
    pids = sorted({pid for _, stats in samples for pid in stats})
    series: dict[str, Any] = {"minute": [round(at / 60, 1) for at, _ in samples]}
    for pid in pids:
        name = next(stats[pid]["name"] for _, stats in samples if pid in stats)
        series[f"{name} ({pid})"] = [stats[pid]["rss_mb"] if pid in stats else None for _, stats in samples]
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reload-every", type=float, default=120, help="seconds between policy reloads")
    parser.add_argument("--sample-every", type=float, default=300, help="seconds between RSS samples of every process")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="soak-"))
    secret = secrets.token_urlsafe(32)
    model_path = write_tiny_llama_gguf(root / "tiny.gguf", n_ctx_train=2048)
    (http_port,) = free_ports(1)
    cluster = PrivateCluster(root, cluster_env(MODELSERVE_JWT_SECRET=secret, MODELSERVE_CACHE_DIR=str(root / "cache")))
    ledger, stop = Ledger(), threading.Event()
    try:
        cluster.wait_ready()
        cluster.deploy(serve_config(http_port, model_path, LIMITS[0]))
        cluster.wait_running({APP, MODEL})
        base_url, token = f"http://127.0.0.1:{http_port}", mint_token(secret, TENANT, [], 24 * 3600)
        warm = Ledger()
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            for i in range(20):
                warm.record(send(http, KINDS[i % len(KINDS)], random.Random(i)))
        start_stats = process_stats(cluster.head.process.pid)
        arena_caps = {
            f"{stats['name']} ({pid})": process_env(pid).get("MALLOC_ARENA_MAX", "glibc default")
            for pid, stats in start_stats.items()
            if stats["name"].startswith("ray::")
        }
        started = ledger.started = time.monotonic()
        ledger.per_minute.clear()
        threads = [
            threading.Thread(target=client_loop, args=(base_url, token, ledger, stop, seed), daemon=True)
            for seed in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        duration, reloads, recovery_s, next_reload, killed = args.minutes * 60, [], None, args.reload_every, False
        samples, next_sample = [(0.0, start_stats)], args.sample_every
        while (elapsed := time.monotonic() - started) < duration:
            if elapsed >= next_sample:
                samples.append((elapsed, process_stats(cluster.head.process.pid)))
                next_sample += args.sample_every
            if not killed and elapsed >= duration / 2:
                recovery_s, killed = kill_a_replica(cluster, ledger), True
            elif elapsed >= next_reload:
                reloads.append((elapsed, reload_policy(cluster, http_port, model_path, LIMITS[(len(reloads) + 1) % 2])))
                next_reload += args.reload_every
            time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        hung = sum(thread.is_alive() for thread in threads)
        time.sleep(5)  # let cancelled streams' slots and the limiter settle before the last look
        end_stats = process_stats(cluster.head.process.pid)
    finally:
        stop.set()
        cluster.stop()
    window = ledger.fault or (float("inf"), float("inf"))
    outside = [(round(t - ledger.started, 1), o) for t, o in ledger.failures if not window[0] <= t <= window[1]]
    accounted = sum(n for o, n in ledger.outcomes.items() if not o.startswith("lost"))
    report = {
        "minutes": args.minutes,
        "clients": args.clients,
        "sent": ledger.sent,
        "outcomes": dict(ledger.outcomes.most_common()),
        "accounted_for": f"{accounted}/{ledger.sent}",
        "client_threads_hung": hung,
        "failures_in_kill_window": len(ledger.failures) - len(outside),
        "5xx_or_errors_outside_kill_window": outside,
        "kill_at_s": round(window[0] - ledger.started, 1),
        "kill_recovery_s": recovery_s and round(recovery_s, 1),
        "policy_reloads_at_s_took_s": [(round(at), round(took, 1)) for at, took in reloads],
        "requests_per_minute": [ledger.per_minute[m] for m in sorted(ledger.per_minute)],
        "warm_up": dict(warm.outcomes),
        "malloc_arena_max": arena_caps,
        "processes": compare(start_stats, end_stats),
        "rss_mb_every_sample": rss_over_time(samples + [(time.monotonic() - started, end_stats)]),
        "logs": str(root),  # ray start and Serve logs, the config deployed last
    }
    print(json.dumps(report, indent=1))
    ok = accounted == ledger.sent and not outside and not hung and killed
    print("SOAK", "PASSED" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
