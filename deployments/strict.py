"""The base of every config model and how a config that fails validation is reported.

Shared by the model spec here and the app, policy and deploy settings in serve_app, so every
config error reads alike: one line per bad field, named by its dotted path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Base for every config section: unknown keys are typos, not extensions."""

    model_config = ConfigDict(extra="forbid")



class ConfigError(ValueError):
    """A configuration that cannot be deployed, with a message naming each bad field."""


def describe_validation_error(error: ValidationError, data: Any = None) -> str:
    """One line per problem: dotted field path (model names where known), message and bad value."""
    lines = []
    for err in error.errors():
        parts: list[str] = []
        node = data
        for loc in err["loc"]:
            if isinstance(loc, int):
                name = node[loc].get("name") if isinstance(node, list) and isinstance(node[loc], dict) else None
                parts[-1:] = [f"{parts[-1] if parts else ''}[{loc}]" + (f" ({name})" if name else "")]
            else:
                parts.append(str(loc))
            try:
                node = node[loc]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                node = None
        where = ".".join(parts) or "args"
        whole_entry = isinstance(err["input"], (dict, list))  # a model-level check: the message names the field
        value = "" if err["type"] == "missing" or whole_entry else f" (got {err['input']!r})"
        lines.append(f"{where}: {err['msg']}{value}")
    return "\n".join(lines)
