"""`modelserve render`: write kuberay/ from serve_config.yaml and kuberay/deploy.yaml, or check it.

`render --check` keeps the committed manifests honest (CI), and `render --dry-run` says
before any apply whether every replica fits a worker pod.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

import yaml

from deployments.strict import ConfigError
from serve_app.cli.deploy_settings import load_deploy_settings
from serve_app.cli.kube import HEADER
from serve_app.cli.manifests import deployable_serve_config, render_manifests
from serve_app.cli.placement import plan_placement
from serve_app.cli.serve_file import load_serve_config


def _is_rendered(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline() == HEADER.splitlines(keepends=True)[0]
    except (OSError, UnicodeDecodeError):
        return False


def _stale_files(files: dict[str, str], out: Path) -> list[Path]:
    """Files render wrote earlier that it no longer produces (e.g. minio.yaml after disabling MinIO)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name not in files and p.is_file() and _is_rendered(p))


def compare_manifests(files: dict[str, str], out: Path) -> list[str]:
    """One message (with a unified diff) per file in `out` that differs from what render produces."""
    differences = []
    for name, text in files.items():
        path = out / name
        if not path.is_file():
            differences.append(f"{path}: missing")
            continue
        current = path.read_text(encoding="utf-8")
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{path} (on disk)",
                f"{path} (rendered)",
            )
            differences.append(f"{path}: differs\n" + "".join(diff).rstrip("\n"))
    differences += [f"{path}: no longer rendered (delete it)" for path in _stale_files(files, out)]
    return differences


def write_manifests(files: dict[str, str], out: Path) -> None:
    """Write each file atomically (temp file + rename), then remove stale rendered files."""
    out.mkdir(parents=True, exist_ok=True)
    stale = _stale_files(files, out)
    for name, text in files.items():
        path = out / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        temporary = out / f".{name}.tmp"
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    for path in stale:
        path.unlink()


def run_render(args: argparse.Namespace) -> int:
    """The `render` subcommand: 0 ok, 1 manifests out of date / plan undeployable, 2 bad input."""
    try:
        serve_config = load_serve_config(args.config)
        settings = load_deploy_settings(args.settings)
        if args.dry_run:
            report, problems = plan_placement(deployable_serve_config(serve_config), settings)
            print(report)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1 if problems else 0
        files = render_manifests(serve_config, settings, args.dashboard.read_text(encoding="utf-8"))
        if args.check:
            differences = compare_manifests(files, args.out)
            for difference in differences:
                print(difference)
            if differences:
                print(f"{len(differences)} file(s) out of date: run `modelserve render`", file=sys.stderr)
            return 1 if differences else 0
        write_manifests(files, args.out)
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"rendered {len(files)} files into {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `render` subcommand to the modelserve CLI."""
    parser = subparsers.add_parser(
        "render",
        help="render the KubeRay/Kubernetes manifests in kuberay/ from serve_config.yaml",
        description="Render kuberay/ manifests from the Serve config and kuberay/deploy.yaml.",
    )
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"), help="Serve config file")
    parser.add_argument("--settings", type=Path, default=Path("kuberay/deploy.yaml"), help="deploy settings file")
    parser.add_argument("--dashboard", type=Path, default=Path("kuberay/grafana-dashboard.json"),
                        help="Grafana dashboard JSON, rendered into a ConfigMap for Grafana's dashboard sidecar")
    parser.add_argument("--out", type=Path, default=Path("kuberay"), help="directory of rendered manifests")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if files in --out differ from a fresh render")
    mode.add_argument(
        "--dry-run", action="store_true", help="print models, replica bounds and worker groups; exit 1 if unplaceable"
    )
    parser.set_defaults(func=run_render)
