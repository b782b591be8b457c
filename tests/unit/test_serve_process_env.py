"""The Ray settings modelserve ships, against what the installed libraries do."""

import json
import subprocess
import sys
from pathlib import Path

from serve_app.cli.serve_file import SERVE_PROCESS_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_serve_grpc_plane_stays_off_while_grpcio_leaks_per_cancelled_stream() -> None:
    """Every client disconnect cancels a stream on each hop; with grpc/grpc#43360 unfixed, Serve's gRPC
    plane would keep native memory for each one in the proxy, the ingress and the model replicas."""
    probe = [sys.executable, str(ROOT / "bench" / "grpc_cancel_leak.py"), "--calls", "1000"]
    report = json.loads(subprocess.run(probe, check=True, capture_output=True, text=True, timeout=120).stdout)
    leaks = report["cancelled_bytes_per_call"] > 10 * max(report["completed_bytes_per_call"], 8.0)
    if leaks:
        assert SERVE_PROCESS_ENV["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0", report
