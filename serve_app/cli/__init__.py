"""The `modelserve` operator commands; `main` is the console script's entry point (pyproject.toml)."""

from serve_app.cli.commands import main

__all__ = ["main"]
