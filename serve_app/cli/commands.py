"""`modelserve`: run the app on local Ray, validate a Serve config, mint tokens, move weights, render manifests."""

from __future__ import annotations

import argparse

from serve_app.cli.serve_file import validated_config


def cmd_validate(args: argparse.Namespace) -> int:
    if (validated := validated_config(args.config)) is None:
        return 1
    _, apps = validated
    for app, _ in apps.ingress:
        print(f"ok  ingress  application={app['name']}  route_prefix={app.get('route_prefix', '/')}")
    for _, spec in apps.models:
        print(f"ok  {spec.name}  backend={spec.backend}  source={spec.source}  deployment={spec.deployment_name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The subcommand modules are imported here, not at the top: `import serve_app.cli` stays cheap.
    from serve_app.cli import local, render, tokens, usage, weights

    parser = argparse.ArgumentParser(prog="modelserve", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    local.register(subparsers)
    validate = subparsers.add_parser("validate", help="check a Serve config without deploying it")
    validate.add_argument("config", nargs="?", default="serve_config.yaml")
    validate.set_defaults(func=cmd_validate)
    for module in (tokens, weights, render, usage):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
