"""`modelserve usage`: the token usage table from `GET /v1/admin/usage` (an admin token is needed)."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from typing import Any

from serve_app.cli.local import call_api

COLUMNS = ("period", "tenant", "key", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens")
NUMERIC = frozenset(COLUMNS[4:])


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns, numbers right-aligned, with a total line when there is more than one row."""
    if len(rows) > 1:
        rows = [*rows, {"period": "total", **{c: sum(int(r[c]) for r in rows) for c in NUMERIC}}]
    cells = [list(COLUMNS)] + [[str(row.get(c, "")) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.rjust(w) if c in NUMERIC and n else cell.ljust(w) for c, cell, w in zip(COLUMNS, line, widths))
        for n, line in enumerate(cells)
    ]
    return "\n".join(line.rstrip() for line in lines)


def _usage(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("MODELSERVE_TOKEN") or os.environ.get("OPENAI_API_KEY")
    if not token:
        print("error: an admin token is needed: --token, MODELSERVE_TOKEN or OPENAI_API_KEY "
              "(e.g. `modelserve token --tenant ops --role admin`)", file=sys.stderr)
        return 2
    query = {"tenant": args.tenant, "key": args.key, "model": args.model, "from": args.start, "to": args.end,
             "group_by": args.group_by}
    url = f"{args.url.rstrip('/')}/v1/admin/usage?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
    status, body = call_api(url, token, None, args.timeout)
    if status != 200:
        print(f"error: {status or 'no answer'}: {(body.get('error') or {}).get('message', body)}", file=sys.stderr)
        return 1
    print(table(body["data"]) if body["data"] else "no usage recorded for this filter")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    usage = subparsers.add_parser("usage", help="token usage per day or month, tenant, key and model (admin)")
    usage.add_argument("--url", default=os.environ.get("MODELSERVE_URL", "http://127.0.0.1:8000"),
                       help="the app's base URL (MODELSERVE_URL; default http://127.0.0.1:8000)")
    usage.add_argument("--token", help="admin JWT or API key (default MODELSERVE_TOKEN, then OPENAI_API_KEY)")
    usage.add_argument("--tenant")
    usage.add_argument("--key", help="subject, e.g. api-key:<name>")
    usage.add_argument("--model")
    usage.add_argument("--from", dest="start", help="first UTC day, YYYY-MM-DD")
    usage.add_argument("--to", dest="end", help="last UTC day, YYYY-MM-DD")
    usage.add_argument("--group-by", choices=("day", "month", "total"), default="day")
    usage.add_argument("--timeout", type=float, default=30.0)
    usage.set_defaults(func=_usage)
