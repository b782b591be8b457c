"""The Grafana dashboard in kuberay/: every panel queries metrics the app (or Ray Serve itself) really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ray.serve
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "kuberay" / "grafana-dashboard.json"
# Ray exports metric `name` as `ray_<name>`, counters with `_total`, histograms as `_bucket`/`_sum`/`_count`.
EXPORTED = re.compile(r"\bray_([a-z_]+?)(?:_total|_bucket|_sum|_count)?\b")
DEFINED = re.compile(r"metrics\.(?:Counter|Gauge|Histogram)\(\s*\"([a-z_]+)\"")


def defined_names(*roots: Path) -> set[str]:
    """Metric names created through ray.serve.metrics / ray.util.metrics anywhere under `roots`."""
    return {name for root in roots for path in root.rglob("*.py") for name in DEFINED.findall(path.read_text())}


def serve_builtin(name: str) -> bool:
    """Ray Serve's own metrics (replica slots, queued requests) are named in its source as plain strings."""
    source = Path(ray.serve.__file__).parent / "_private"
    return any(f'"{name}"' in path.read_text() for path in source.glob("*.py"))


def panel_metrics() -> dict[str, set[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    return {title: set(EXPORTED.findall(expr)) for title, expr in queries.items()}


def test_every_panel_queries_only_metrics_that_are_exported() -> None:
    ours = defined_names(ROOT / "serve_app", ROOT / "deployments")
    assert {"modelserve_requests", "modelserve_time_to_first_token_seconds"} <= ours  # the scan finds them
    panels = panel_metrics()
    assert len(panels) >= 9 and all(panels.values()), panels
    unknown = {title: sorted(name for name in names if name not in ours and not serve_builtin(name))
               for title, names in panels.items()}
    assert not any(unknown.values()), unknown


def test_dashboard_covers_requests_errors_ttft_tokens_slots_queue_and_tenants() -> None:
    used = set().union(*panel_metrics().values())
    assert {"modelserve_requests", "modelserve_time_to_first_token_seconds", "modelserve_completion_tokens",
            "modelserve_prompt_tokens", "modelserve_policy_rejections", "serve_replica_processing_queries",
            "serve_deployment_queued_queries"} <= used


def test_render_ships_the_dashboard_as_a_grafana_configmap() -> None:
    rendered = yaml.safe_load((ROOT / "kuberay" / "grafana-dashboard.yaml").read_text())
    assert rendered["kind"] == "ConfigMap" and rendered["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(rendered["data"]["modelserve.json"]) == json.loads(DASHBOARD.read_text())
