"""A private Ray cluster of one or more nodes on this machine, for tests and benches that stop nodes or processes.

Each node is a `ray start --block` process with ports of its own and its own environment (so its own
weight cache directory), all under one temp dir of the cluster's own: nothing else on the machine
connects to it by accident, and stopping it signals only those processes, then sweeps anything left
that carries the temp dir. Applications go on with `serve deploy`, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.cli.serve_file import use_serve_process_env


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def cluster_env(**extra: str) -> dict[str, str]:
    """This process's environment as a private cluster's nodes get it: modelserve's Ray settings, no outside cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MODELSERVE_JWT_SECRET")}
    use_serve_process_env(env)  # the Ray settings modelserve ships with
    return env | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster; keeps us off the user's Ray token
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain at teardown
        **extra,
    }


class RayNode:
    """One `ray start --block` process: the head (with the dashboard) or a worker joining `head_address`."""

    def __init__(
        self,
        name: str,
        root: Path,
        temp_dir: Path,
        env: dict[str, str],
        num_cpus: float,
        head_address: str | None = None,
    ) -> None:
        self.name, self.env, self.log = name, env, root / f"ray-start-{name}.log"
        agent, metrics = free_ports(2)
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        args = [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            str(temp_dir),
            "--dashboard-agent-listen-port",
            str(agent),
            "--metrics-export-port",
            str(metrics),
            "--disable-usage-stats",
            "--block",
        ]
        if head_address is None:
            gcs, dashboard, client = free_ports(3)
            self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
            args += [
                "--head",
                "--port",
                str(gcs),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard),
                "--ray-client-server-port",
                str(client),
            ]
        else:
            self.address, self.dashboard = head_address, ""
            args += ["--address", head_address]
        self.process = subprocess.Popen(
            ["ray", "start", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            start_new_session=True,
        )

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"ray start ({self.name}) exited: {self.log.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM the `ray start --block` process, which stops what it started on this node."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()


class PrivateCluster:
    """A head node and any worker nodes added later, all under one private temp dir; Serve driven by its CLI."""

    def __init__(self, root: Path, env: dict[str, str], num_cpus: float = 4) -> None:
        self.root = root
        self.temp_dir = Path(tempfile.mkdtemp(prefix="msray-", dir="/tmp"))  # short: Ray puts sockets here
        self.head = RayNode("head", root, self.temp_dir, env, num_cpus)
        self.workers: list[RayNode] = []
        self.dashboard = self.head.dashboard

    def add_worker(self, name: str, env: dict[str, str], num_cpus: float) -> RayNode:
        node = RayNode(name, self.root, self.temp_dir, env, num_cpus, head_address=self.head.address)
        self.workers.append(node)
        return node

    def wait_ready(self, nodes: int = 1, timeout_s: float = 120) -> None:
        """Wait until the dashboard answers and `nodes` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in (self.head, *self.workers):
                node.check_running()
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if len(self.alive_nodes()) >= nodes:
                    return
            time.sleep(1)
        raise AssertionError(f"{nodes} Ray nodes not up after {timeout_s}s")

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Alive nodes, by the State API behind the dashboard."""
        reply = httpx.get(f"{self.dashboard}/api/v0/nodes", params={"detail": "true"}, timeout=10).json()
        return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def serve(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the `serve` CLI against this cluster; fail with its output if it fails."""
        result = subprocess.run(
            ["serve", *argv, "--address", self.dashboard],
            check=False,
            text=True,
            capture_output=True,
            env={**self.head.env, "RAY_ADDRESS": self.head.address},
            timeout=timeout_s,
        )
        assert result.returncode == 0, f"serve {' '.join(argv)}: {result.stdout}\n{result.stderr}"
        return result

    def deploy(self, config: dict[str, Any]) -> None:
        """`serve deploy` this config (written next to the logs); does not wait."""
        path = self.root / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.serve("deploy", str(path))

    def details(self) -> dict[str, Any]:
        return httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=10).json()

    def wait_running(self, apps: set[str], timeout_s: float = 180) -> dict[str, Any]:
        """Wait until exactly `apps` run with every deployment healthy; fail at once on DEPLOY_FAILED."""
        deadline = time.monotonic() + timeout_s
        details: dict[str, Any] = {}
        while time.monotonic() < deadline:
            details = self.details()
            running = details.get("applications", {})
            if failed := [a.get("message") for a in running.values() if a.get("status") == "DEPLOY_FAILED"]:
                raise AssertionError(f"deploy failed: {failed}")
            if set(running) == apps and all(a.get("status") == "RUNNING" for a in running.values()):
                return details
            time.sleep(0.5)
        raise AssertionError(f"{sorted(apps)} not running after {timeout_s}s: {json.dumps(details)[:3000]}")

    def replicas(self, app: str, deployment: str) -> list[dict[str, Any]]:
        return self.details()["applications"][app]["deployments"][deployment]["replicas"]

    def stop(self) -> None:
        """Stop the workers, then the head, then sweep what is left."""
        for node in (*self.workers, self.head):
            node.stop()
        sweep(self.temp_dir, self.root)

    def leftover_pids(self) -> list[int]:
        return processes_carrying(self.temp_dir)


def processes_carrying(temp_dir: Path) -> list[int]:
    """Processes whose command line names this cluster's temp dir (Ray's own daemons, and workers before setproctitle)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def sweep(temp_dir: Path, root: Path) -> None:
    """After `ray start` stopped: SIGKILL anything left carrying the temp dir, keep Serve's logs in `root`, remove it."""
    for pid in processes_carrying(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    serve_logs = temp_dir / "session_latest" / "logs" / "serve"
    if serve_logs.is_dir():  # kept in the caller's dir for post-mortems
        shutil.copytree(serve_logs, root / "serve-logs", dirs_exist_ok=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
